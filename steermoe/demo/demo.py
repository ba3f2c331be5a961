"""``steermoe demo``: the whole pipeline, offline on a CPU, in a minute or two.

1. builds a tiny random Whisper and a tiny random Llama-style LLM (tokenizer trained in code) on disk;
2. loads them through the same ``from_pretrained`` paths as real checkpoints;
3. scores the untrained model (greedy, WER/CER) on the bundled espeak-ng speech (``speech.parquet``);
4. trains the steering tensors and the projector on that speech with the real loop (loss printed as it falls),
   saves a checkpoint, and scores again.

Random frozen bases cannot learn to transcribe: the loss falls only as far as a random LLM lets it, and WER stays
near 100 %. The demo shows the machinery end to end; useful ASR needs pretrained checkpoints
(``configs/whisper-large-v3-qwen2.5-1.5b.yaml``).
"""
import os
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

import torch

from ..config import load_config
from ..evaluate import eval_batches, evaluate, text_normalizer
from ..train import build_model, open_source, read_metrics, seed_everything, train
from .tiny_models import build_tiny_llm, build_tiny_whisper

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(HERE, "demo.yaml")
SPEECH = os.path.join(HERE, "speech.parquet")
TINY_WHISPER = {"d_model": 64, "layers": 2, "heads": 4, "ffn_dim": 128}
TINY_LLM = {"arch": "llama", "hidden_size": 256, "layers": 2, "heads": 4, "ffn_dim": 512}


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
    print("1/4 building tiny random Whisper and LLM checkpoints on disk")
    whisper = build_tiny_whisper(os.path.join(root, "models", "tiny-whisper"), **TINY_WHISPER)
    llm = build_tiny_llm(os.path.join(root, "models", "tiny-llm"), **TINY_LLM)
    cfg = load_config(DEMO_CONFIG, [f"model.whisper={whisper}", f"model.llm={llm}", f"data.train={SPEECH}",
                                    f"data.eval={SPEECH}", f"output_dir={os.path.join(root, 'run')}", *overrides])

    print("2/4 scoring the untrained model (same initialisation as the training run)")
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, torch.device(cfg.train.device if cfg.train.device != "auto" else "cpu"))
    source = open_source(cfg.data, cfg.data.eval, for_eval=True)
    before = evaluate(model, eval_batches(source, cfg.train.eval_batch_size, limit=cfg.train.eval_utterances),
                      normalize=text_normalizer(whisper), max_new_tokens=cfg.model.max_new_tokens)
    print(f"    before training: WER {before['wer']:.1%}  CER {before['cer']:.1%}  loss {before['loss']:.4f} "
          f"on {before['utterances']} utterances; {model.num_trainable_parameters():,} trainable parameters")
    del model

    print(f"3/4 training the steering tensors and projector for {cfg.train.max_steps} steps")
    result = train(cfg, overwrite=True)
    after = result["eval"]
    steps = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    losses = [r["loss"] for r in steps if "loss" in r]
    window = max(1, min(10, len(losses) // 3))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window

    seconds = time.perf_counter() - start
    print("4/4 summary")
    print(f"    training loss (mean of {window} steps): {first:.4f} at the start -> {last:.4f} at the end")
    print(f"    WER {before['wer']:.1%} -> {after['wer']:.1%}   CER {before['cer']:.1%} -> {after['cer']:.1%}")
    print(f"    checkpoint: {result['checkpoint']}")
    print(f"    try: steermoe eval --checkpoint {result['checkpoint']} --data {SPEECH}")
    print(f"    done in {seconds:.0f} s. Random bases cannot transcribe; for real ASR train from pretrained "
          "checkpoints (configs/whisper-large-v3-qwen2.5-1.5b.yaml).")
    return {"wer_before": before["wer"], "wer_after": after["wer"], "cer_before": before["cer"],
            "cer_after": after["cer"], "loss_start": first, "loss_end": last, "checkpoint": result["checkpoint"],
            "output_dir": root, "seconds": seconds}
