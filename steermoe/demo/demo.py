"""``steermoe demo``: the whole pipeline, offline on a CPU, in a few minutes.

1. builds a tiny random Whisper (initialised so that its output depends on the audio, as a pretrained encoder's
   does) and a tiny Llama-style LLM (tokenizer trained in code) on disk, and gives the LLM a few seconds of
   pretraining: repeating the bundled transcripts' sentences placed where the audio goes (the skill a pretrained
   LLM brings; it never hears audio);
2. loads them through the same ``from_pretrained`` paths as real checkpoints;
3. scores the untrained adapter (greedy, WER/CER) on the bundled espeak-ng speech (``speech.parquet``): on the
   utterances it will train on and on held-out ones (sentences whose audio it never trains on);
4. trains the steering tensors and the projector on the training utterances with the real loop (loss printed as it
   falls), saves a checkpoint, and scores both sets again.

The adapter learns the utterances it trains on; 48 synthetic clips cannot teach tiny random bases to transcribe new
sentences (the measured numbers, which differ between CPUs, are in README.md, "Quick start"). Useful ASR needs
pretrained checkpoints (``configs/whisper-large-v3-qwen2.5-1.5b.yaml``).
"""
import os
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

import torch

from ..config import load_config
from ..evaluate import eval_batches, evaluate, text_normalizer
from ..train import build_model, open_source, read_metrics, seed_everything, train
from .make_speech import SENTENCES
from .tiny_models import build_tiny_llm, build_tiny_whisper, pretrain_tiny_llm

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(HERE, "demo.yaml")
SPEECH = os.path.join(HERE, "speech.parquet")
TINY_WHISPER = {"d_model": 64, "layers": 2, "heads": 4, "ffn_dim": 128, "init_std": 0.2}
TINY_LLM = {"arch": "llama", "hidden_size": 256, "layers": 2, "heads": 4, "ffn_dim": 512}
LLM_PRETRAINING = {"steps": 1000, "batch_size": 16, "lr": 3e-3}
HELD_OUT = 12                    # the bundled set's last utterances (one sentence each) are never trained on


def split_speech(directory: str) -> Dict[str, str]:
    """``{"train": path, "held-out": path}``: the bundled speech split into two parquet files in ``directory``."""
    import pyarrow.parquet as pq

    table = pq.read_table(SPEECH)
    paths = {"train": os.path.join(directory, "train.parquet"), "held-out": os.path.join(directory, "held-out.parquet")}
    pq.write_table(table.slice(0, table.num_rows - HELD_OUT), paths["train"])
    pq.write_table(table.slice(table.num_rows - HELD_OUT), paths["held-out"])
    return paths


def score(model, cfg, paths: Dict[str, str], normalize) -> Dict[str, Dict[str, Any]]:
    """Greedy WER/CER/loss of ``model`` on the first ``train.eval_utterances`` of each set of ``paths``."""
    return {name: evaluate(model, eval_batches(open_source(cfg.data, [path], for_eval=True), cfg.train.eval_batch_size,
                                               limit=cfg.train.eval_utterances),
                           normalize=normalize, max_new_tokens=cfg.model.max_new_tokens)
            for name, path in paths.items()}


def _rates(scores: Dict[str, Dict[str, Any]]) -> str:
    return "   ".join(f"{name} ({s['utterances']} utterances): WER {s['wer']:.1%} CER {s['cer']:.1%}"
                      for name, s in scores.items())


def run_demo(output_dir: Optional[str] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Run the demo in ``output_dir`` (default: a new temporary directory; a rerun replaces the previous one's run).

    ``overrides``: ``section.key=value`` pairs applied on top of ``demo.yaml``. Returns the WERs, losses, the
    checkpoint path and the wall time.
    """
    start = time.perf_counter()
    root = os.path.abspath(output_dir) if output_dir else tempfile.mkdtemp(prefix="steermoe-demo-")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()               # keep the output to the demo's own lines and training bar
    print(f"steermoe demo: working in {root}")
    print("1/4 building tiny random Whisper and LLM checkpoints on disk; pretraining the LLM to repeat sentences")
    whisper = build_tiny_whisper(os.path.join(root, "models", "tiny-whisper"), **TINY_WHISPER)
    llm = build_tiny_llm(os.path.join(root, "models", "tiny-llm"), **TINY_LLM)
    paths = split_speech(root)
    cfg = load_config(DEMO_CONFIG, [f"model.whisper={whisper}", f"model.llm={llm}", f"data.train={paths['train']}",
                                    f"output_dir={os.path.join(root, 'run')}", *overrides])
    lm_first, lm_last = pretrain_tiny_llm(llm, SENTENCES, prompt=cfg.model.prompt, seed=cfg.train.seed,
                                          **LLM_PRETRAINING)
    print(f"    LLM pretraining ({LLM_PRETRAINING['steps']} steps, text only): loss {lm_first:.3f} -> {lm_last:.3f}")
    normalize = text_normalizer(whisper)
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else "cpu")

    print("2/4 scoring the untrained adapter (same initialisation as the training run)")
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, device)
    before = score(model, cfg, paths, normalize)
    print(f"    before training: {_rates(before)}; {model.num_trainable_parameters():,} trainable parameters")
    del model

    print(f"3/4 training the steering tensors and projector for {cfg.train.max_steps} steps on the train utterances")
    result = train(cfg, overwrite=True)
    steps = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    losses = [r["loss"] for r in steps if "loss" in r]
    window = max(1, min(10, len(losses) // 3))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    from ..model import SteerMoEModel

    after = score(SteerMoEModel.from_trainable(result["checkpoint"], device=device).eval(), cfg, paths, normalize)

    seconds = time.perf_counter() - start
    print("4/4 summary")
    print(f"    training loss (mean of {window} steps): {first:.4f} at the start -> {last:.4f} at the end")
    for name in paths:
        print(f"    {name:>8} utterances: WER {before[name]['wer']:.1%} -> {after[name]['wer']:.1%}   "
              f"CER {before[name]['cer']:.1%} -> {after[name]['cer']:.1%}")
    print(f"    checkpoint: {result['checkpoint']}")
    print(f"    try: steermoe eval --checkpoint {result['checkpoint']} --data {paths['held-out']}")
    print(f"    done in {seconds:.0f} s. The train WER shows what the adapter memorised; the held-out WER that tiny "
          "random bases trained on 48 synthetic clips do not transcribe new sentences. For real ASR train from "
          "pretrained checkpoints (configs/whisper-large-v3-qwen2.5-1.5b.yaml).")
    return {"before": before, "after": after, "loss_start": first, "loss_end": last,
            "checkpoint": result["checkpoint"], "output_dir": root, "seconds": seconds}
