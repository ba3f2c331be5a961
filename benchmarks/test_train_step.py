"""Train step: samples/s (and peak CUDA memory) of one optimizer step of ``SteerMoEModel`` against an emulation of
the original pipeline on the same clips and transcripts.

The original pipeline, as its code did it: features padded to 30 s, transcripts padded to 448 tokens, seed-style
eager steering after every frozen encoder layer (one ``nn.Linear(D, L·E)`` router evaluated and sliced per layer,
here attached as forward hooks), all 1500 encoder frames projected into the LLM, the LLM's own loss over
full-vocabulary logits of every position, fp16 autocast on a GPU. Both use AdamW over their trainable tensors.
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

from benchmarks.impls import DTYPE_NAMES, seed_steer
from benchmarks.models import SETUP, causal_lm, mel_batch, whisper_encoder
from benchmarks.timing import DEVICE, measure

pytest.importorskip("steermoe.model", reason="steermoe.model (SteerMoEModel) is not available")

EXPERTS = 8
TEXT_PAD = 448                               # the original padded every transcript to Whisper's 448 tokens
IGNORE_INDEX = -100
ORIGINAL_DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


class SeedPipeline(nn.Module):
    """The original model's training forward over a frozen encoder and LLM (both used as given)."""

    def __init__(self, encoder, llm, num_experts: int):
        super().__init__()
        layers, dim = len(encoder.layers), encoder.config.d_model
        self.encoder, self.llm = encoder, llm
        self.router = nn.Linear(dim, layers * num_experts, device=DEVICE)
        self.steering_vectors = nn.Parameter(torch.randn(layers, num_experts, dim, device=DEVICE) * 0.01)
        self.layer_scales = nn.Parameter(torch.full((layers,), 0.1, device=DEVICE))
        self.prompt_proj = nn.Linear(dim, llm.get_input_embeddings().embedding_dim, device=DEVICE)
        for index, layer in enumerate(encoder.layers):
            layer.register_forward_hook(self._steering_hook(index))

    def _steering_hook(self, index: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = seed_steer(h, self.router, self.steering_vectors, self.layer_scales, index)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    def forward(self, features, input_ids, labels):
        prompts = self.prompt_proj(self.encoder(features).last_hidden_state)
        embeds = torch.cat([prompts, self.llm.get_input_embeddings()(input_ids)], dim=1)
        labels = torch.cat([labels.new_full(prompts.shape[:2], IGNORE_INDEX), labels], dim=1)
        return self.llm(inputs_embeds=embeds, labels=labels).loss


@pytest.fixture(scope="module")
def pipelines():
    """{name: (model, loss closure, autocast context factory, padding description)} on the same batch."""
    from steermoe import SteeredWhisperEncoder, SteerMoEModel
    from steermoe.demo.make_speech import SENTENCES
    from steermoe.demo.tiny_models import build_tiny_tokenizer
    from steermoe.train import autocast_for

    tokenizer = build_tiny_tokenizer()
    encoder, llm = whisper_encoder(), causal_lm(tokenizer)
    texts = [" ".join(SENTENCES[3 * i:3 * i + 3]) for i in range(len(SETUP.seconds))]
    n_mels = encoder.config.num_mel_bins

    ours = SteerMoEModel(SteeredWhisperEncoder(encoder, num_experts=EXPERTS), llm, tokenizer).train()
    features, mask = mel_batch(n_mels, padded_30s=False)

    seed = SeedPipeline(copy.deepcopy(encoder).to(ORIGINAL_DTYPE), copy.deepcopy(llm).to(ORIGINAL_DTYPE), EXPERTS)
    padded = tokenizer(texts, padding="max_length", max_length=TEXT_PAD, return_tensors="pt")
    input_ids = padded["input_ids"].to(DEVICE)
    labels = input_ids.masked_fill(padded["attention_mask"].to(DEVICE) == 0, IGNORE_INDEX)
    features_30s, _ = mel_batch(n_mels, padded_30s=True)
    seed_autocast = (lambda: torch.autocast("cuda", dtype=ORIGINAL_DTYPE)) if DEVICE.type == "cuda" \
        else contextlib.nullcontext
    return {
        "steermoe": (ours, lambda: ours(features, attention_mask=mask, texts=texts).loss, lambda: autocast_for(ours),
                     f"{DTYPE_NAMES[SETUP.dtype]}, clips padded to {max(SETUP.seconds)} s, text unpadded"),
        "original": (seed, lambda: seed(features_30s.to(ORIGINAL_DTYPE), input_ids, labels), seed_autocast,
                     f"{DTYPE_NAMES[ORIGINAL_DTYPE]}, 30 s padding, text padded to {TEXT_PAD}"),
    }


@pytest.mark.parametrize("pipeline", ["steermoe", "original"])
def test_train_step(benchmark, results, pipelines, pipeline):
    model, loss_of, autocast, padding = pipelines[pipeline]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step(_):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_of()
        loss.backward()
        optimizer.step()

    benchmark.group = f"train step {SETUP.name}"
    ms = measure(benchmark, step, rounds=1, min_reps=3, budget_s=0.3)
    missing = [tuple(p.shape) for p in trainable if p.grad is None]
    assert not missing, f"the {pipeline} step left trainable tensors without gradient: {missing}"
    peak_mb = None
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        step(None)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - resting) / 1e6
    batch = len(SETUP.seconds)
    results.add("train", dict(pipeline=pipeline, config=SETUP.name, padding=padding, batch=batch, ms=ms,
                              samples_per_s=batch * 1e3 / ms, peak_mb=peak_mb,
                              trainable=sum(p.numel() for p in trainable)), benchmark)
