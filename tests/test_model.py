"""SteerMoEModel with a tiny random Whisper and tiny Llama-style / GPT-2-style LLMs loaded from disk."""
import io
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from steermoe.demo.tiny_models import build_tiny_llm, build_tiny_whisper
from steermoe.model import CONFIG_NAME, TRAINABLE_WEIGHTS_NAME, Downsampler, SteerMoEModel

SPEECH = os.path.join(os.path.dirname(__file__), "..", "steermoe", "demo", "speech.parquet")
# what the tiny tokenizers' formats put around the audio (see steermoe/demo/tiny_models.py)
AROUND = {"llama": ("<s><|user|>\n", "\n{}<|end|>\n<|assistant|>\n", "<|end|>"),
          "gpt2": ("<|endoftext|>", "\n{}\n", "<|endoftext|>")}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"whisper": build_tiny_whisper(str(root / "whisper"), d_model=48, layers=3, heads=4, ffn_dim=96),
            # init_std 0.2: sharp enough attention that the random LLMs' outputs depend on the audio
            "llama": build_tiny_llm(str(root / "llama"), arch="llama", hidden_size=40, heads=4, ffn_dim=80,
                                    init_std=0.2),
            "gpt2": build_tiny_llm(str(root / "gpt2"), arch="gpt2", hidden_size=40, heads=4, ffn_dim=80,
                                   init_std=0.2)}


@pytest.fixture(scope="module")
def speech():
    """Three utterances of the bundled espeak-ng set (waveforms (3, S) zero-padded, lengths, texts)."""
    import soundfile as sf

    table = pq.read_table(SPEECH).slice(0, 3)
    waves = [sf.read(io.BytesIO(a["bytes"]), dtype="float32")[0] for a in table.column("audio").to_pylist()]
    waves[1] = waves[1][: len(waves[1]) // 2 + 77]            # spread the lengths
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for row, w in zip(batch, waves):
        row[: len(w)] = torch.from_numpy(w)
    return batch, lengths, table.column("text").to_pylist()


def _model(bases, arch, **kw):
    torch.manual_seed(0)
    kw.setdefault("dtype", "float32")
    return SteerMoEModel.from_pretrained(bases["whisper"], bases[arch], **kw)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, bases):
    m = _model(bases, request.param, num_experts=4, layers=[0, 2])
    with torch.no_grad():   # move the steering off its identity-like init so it matters
        m.encoder.steering_vectors.normal_(0, 0.5)
    m.arch = request.param
    return m


def _audio_positions(lengths: torch.Tensor, k: int = 4) -> list:
    """LLM audio positions per sample from its sample count: mel frames, the stride-2 conv, groups of k."""
    mel = lengths // 160
    enc = (mel + 1) // 2
    return ((enc + k - 1) // k).tolist()


# --------------------------------------------------------------------------------------------- structure
def test_frozen_parts_and_trainable_groups(bases):
    m = _model(bases, "llama", dtype="bfloat16", projector="mlp")
    groups = m.trainable_parameter_groups()
    assert set(groups) == {"router", "vectors", "scales", "projector"}
    trainable = {id(p) for ps in groups.values() for p in ps}
    assert {id(p) for p in m.parameters() if p.requires_grad} == trainable
    assert all(p.dtype == torch.float32 for ps in groups.values() for p in ps)
    frozen = [p for p in m.parameters() if id(p) not in trainable]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    m.train()
    assert not m.llm.training and not m.encoder.encoder.training and m.projector.training
    d, e, layers, h = 48, 8, 3, 40
    assert m.num_trainable_parameters() == 2 * layers * e * d + layers * e + layers + (4 * d * h + h + h * h + h)
    assert m.config["whisper"] == bases["whisper"] and m.config["llm"] == bases["llama"]
    json.dumps(m.config)


@pytest.mark.parametrize("mode", ["stack", "avg", "max"])
def test_downsampler_matches_a_loop_over_groups(mode):
    torch.manual_seed(1)
    h, lengths, k = torch.randn(3, 11, 5), [11, 6, 1], 4
    mask = torch.arange(11)[None] < torch.tensor(lengths)[:, None]
    out, keep = Downsampler(k, mode)(h, mask)
    assert keep.tolist() == [[j * k < n for j in range(3)] for n in lengths]
    for i, n in enumerate(lengths):
        for j in range(3):
            frames = h[i, j * k: min((j + 1) * k, n)]
            if mode == "stack":
                expected = F.pad(frames, (0, 0, 0, k - len(frames))).reshape(-1) if len(frames) else 0 * out[i, j]
            elif not len(frames):
                expected = torch.zeros(5)
            else:
                expected = frames.mean(0) if mode == "avg" else frames.amax(0)
            torch.testing.assert_close(out[i, j], expected)


# ----------------------------------------------------------------------------------------- prompt, labels
def test_sequences_and_label_masks_token_by_token(model, speech):
    wave, lengths, texts = speech
    tok = model.tokenizer
    before, after, end = AROUND[model.arch]
    prompts = ["What is said here?", None, ""]
    features, mel_mask = model.features(wave, lengths)
    audio, audio_len, _ = model._audio(features, mel_mask, False)
    assert audio_len.tolist() == _audio_positions(lengths)
    embeds, mask, labels = model._sequences(audio, audio_len, prompts, texts, left_pad=False)
    table = model.llm.get_input_embeddings().weight
    for i in range(3):
        n_audio = int(audio_len[i])
        instruction = prompts[i] or "Transcribe the audio."
        pre = tok(before, add_special_tokens=False)["input_ids"]
        post = tok(after.format(instruction), add_special_tokens=False)["input_ids"]
        target = tok(texts[i], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(end)]
        n = len(pre) + n_audio + len(post) + len(target)
        assert mask[i].tolist() == [1] * n + [0] * (mask.shape[1] - n)          # right padding
        assert labels[i].tolist() == [-100] * (n - len(target)) + target + [-100] * (mask.shape[1] - n)
        assert tok.decode(target) == texts[i] + end
        text_positions = list(range(len(pre))) + list(range(len(pre) + n_audio, n))
        ids = pre + post + target
        torch.testing.assert_close(embeds[i, text_positions], table[ids])      # teacher forcing: input = token
        torch.testing.assert_close(embeds[i, len(pre): len(pre) + n_audio], audio[i, :n_audio])
        assert bool((embeds[i, n:] == 0).all())
    left, left_mask, no_labels = model._sequences(audio, audio_len, prompts, None, left_pad=True)
    assert no_labels is None
    for i in range(3):
        n = int(left_mask[i].sum())
        assert left_mask[i].tolist() == [0] * (left_mask.shape[1] - n) + [1] * n   # left padding
        right, _, _ = model._sequences(audio[i:i + 1, : audio_len[i]], audio_len[i:i + 1], prompts[i:i + 1], None,
                                       left_pad=False)
        torch.testing.assert_close(left[i, left.shape[1] - n:], right[0])


# ------------------------------------------------------------------------------------------------- loss
def test_loss_matches_full_logits_reference_and_is_batch_independent(model, speech):
    wave, lengths, texts = speech
    features, mel_mask = model.features(wave, lengths)
    out = model(features, mel_mask, texts=texts, return_gating=True)
    audio, audio_len, _ = model._audio(features, mel_mask, False)
    embeds, mask, labels = model._sequences(audio, audio_len, None, texts, left_pad=False)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                          reduction="sum")
    assert int(out.num_tokens) == int((labels != -100).sum()) and out.num_tokens.dtype == torch.long
    torch.testing.assert_close(out.loss_sum, ref)
    torch.testing.assert_close(out.loss, ref / out.num_tokens)
    assert out.loss_sum.dtype == torch.float32
    assert len(out.gating) == 2 and out.gating[0].shape[-1] == 4
    assert out.gating_mask.sum(-1).tolist() == ((lengths // 160 + 1) // 2).tolist()
    singles = []
    for i in range(3):
        f, m = model.features(wave[i: i + 1, : lengths[i]], lengths[i: i + 1])
        singles.append(model(f, m, texts=texts[i: i + 1]).loss_sum)
    torch.testing.assert_close(out.loss_sum, torch.stack(singles).sum(), rtol=1e-5, atol=1e-4)


def test_a_batch_filling_whisper_window_still_masks_the_shorter_clips(model, speech):
    """With a 30 s clip in the batch the input is the full window, where the encoder alone would ignore padding."""
    wave, lengths, texts = speech
    full = wave[0, : lengths[0]].repeat(30 * 16000 // int(lengths[0]) + 1)[: 30 * 16000]
    batch = torch.zeros(2, full.numel())
    batch[0], batch[1, : lengths[1]] = full, wave[1, : lengths[1]]
    both = torch.tensor([full.numel(), int(lengths[1])])
    features, mel_mask = model.features(batch, both)
    assert features.shape[-1] == model.encoder.max_mel_frames
    out = model(features, mel_mask, texts=texts[:2])
    singles = [model(*model.features(batch[i: i + 1, : both[i]], both[i: i + 1]), texts=texts[i: i + 1]).loss_sum
               for i in range(2)]
    torch.testing.assert_close(out.loss_sum, torch.stack(singles).sum(), rtol=1e-5, atol=1e-4)


def test_gradients_reach_only_the_trainable_tensors(model, speech):
    wave, lengths, texts = speech
    model.zero_grad(set_to_none=True)
    model.train()
    model(*model.features(wave, lengths), texts=texts).loss.backward()
    for name, group in model.trainable_parameter_groups().items():
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in group), name
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.encoder.encoder.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()
    with pytest.raises(ValueError, match="texts"):
        model(*model.features(wave, lengths))


# ------------------------------------------------------------------------------------------- generation
def _greedy_reference(model, features, mel_mask, max_new_tokens, min_new_tokens):
    """Token-by-token argmax with full recomputation (no KV cache), one utterance at a time."""
    stops = model.prompt_format.stop_token_ids
    outs = []
    for i in range(features.shape[0]):
        frames = int(mel_mask[i].sum())
        audio, audio_len, _ = model._audio(features[i:i + 1, :, :frames], mel_mask[i:i + 1, :frames], False)
        embeds, _, _ = model._sequences(audio, audio_len, None, None, left_pad=False)
        table = model.llm.get_input_embeddings()
        ids = []
        for step in range(max_new_tokens):
            logits = model.llm(inputs_embeds=embeds).logits[0, -1]
            if step < min_new_tokens:
                logits[stops] = float("-inf")
            nxt = int(logits.argmax())
            if nxt in stops:
                break
            ids.append(nxt)
            embeds = torch.cat([embeds, table(torch.tensor([[nxt]]))], 1)
        outs.append(model.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return outs


def test_generate_is_greedy_batched_equals_one_by_one(model, speech):
    wave, lengths, _ = speech
    features, mel_mask = model.features(wave, lengths)
    kw = {"max_new_tokens": 6, "min_new_tokens": 3}
    torch.manual_seed(1)
    batched = model.generate(features, mel_mask, **kw)
    torch.manual_seed(2)
    assert model.generate(features, mel_mask, **kw) == batched   # the llama checkpoint's config samples
    with torch.no_grad():
        assert batched == _greedy_reference(model, features, mel_mask, 6, 3)
    for i in range(3):
        f, m = model.features(wave[i: i + 1, : lengths[i]], lengths[i: i + 1])
        assert model.generate(f, m, **kw) == batched[i: i + 1]
    assert len(set(batched)) == 3                               # the transcripts depend on the audio
    sampled = set()
    for seed in range(3):
        torch.manual_seed(seed)
        sampled.add(tuple(model.generate(features, mel_mask, do_sample=True, temperature=2.0, **kw)))
    assert len(sampled) > 1                                     # sampling when asked


def test_max_tokens_per_second_cuts_each_row_at_its_own_budget(model, speech):
    wave, lengths, _ = speech
    features, mel_mask = model.features(wave, lengths)
    kw = {"max_new_tokens": 12, "min_new_tokens": 12}               # rows run on: the cut decides where they end
    uncapped = model.generate(features, mel_mask, **kw)
    assert model.decoding_budgets(features, mel_mask, 12) == [12, 12, 12]    # no cap by default
    model.config["max_tokens_per_second"] = 2.5
    try:
        budgets = model.decoding_budgets(features, mel_mask, 12)
        assert model.log_mel.hop_length == 160
        assert budgets == [min(12, -(-n // 40)) for n in mel_mask.sum(-1).tolist()]   # ceil(2.5 × n × 160 / 16000)
        assert len(set(budgets)) > 1 and max(budgets) < 12           # the rows' lengths differ; the cap binds
        assert model.decoding_budgets(features, mel_mask, 3) == [min(3, b) for b in budgets]
        whole = -(-features.shape[-1] // 40)
        assert model.decoding_budgets(features, None, 12) == [min(12, whole)] * 3   # no mask: every frame counts
        capped = model.generate(features, mel_mask, max_new_tokens=12, min_new_tokens=max(budgets))
        with torch.no_grad():
            for i, budget in enumerate(budgets):
                one = _greedy_reference(model, features[i:i + 1], mel_mask[i:i + 1], budget, budget)
                assert capped[i] == one[0] != uncapped[i]
    finally:
        model.config["max_tokens_per_second"] = None


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "6"])
def test_max_tokens_per_second_rejects_bad_values(bases, bad):
    with pytest.raises(ValueError, match=f"max_tokens_per_second must be None or a number > 0; got {bad!r}"):
        _model(bases, "llama", max_tokens_per_second=bad)


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_only_trainables_and_round_trips(bases, speech, tmp_path):
    from safetensors.torch import load_file

    wave, lengths, _ = speech
    model = _model(bases, "gpt2", projector="mlp", layers=[1, 2])
    with torch.no_grad():
        for group in model.trainable_parameter_groups().values():
            for p in group:
                p.normal_(0, 0.3)
    model.save_trainable(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted([CONFIG_NAME, TRAINABLE_WEIGHTS_NAME])
    tensors = load_file(str(tmp_path / "ckpt" / TRAINABLE_WEIGHTS_NAME))
    assert sum(t.numel() for t in tensors.values()) == model.num_trainable_parameters()
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert set(tensors) == {"encoder.router_weight", "encoder.router_bias", "encoder.steering_vectors",
                            "encoder.layer_scales", "projector.0.weight", "projector.0.bias", "projector.2.weight",
                            "projector.2.bias"}
    restored = SteerMoEModel.from_trainable(str(tmp_path / "ckpt"))
    assert restored.config == model.config
    for (name, a), b in zip(model._named_trainable().items(), restored._named_trainable().values()):
        assert torch.equal(a, b), name
    features, mask = model.features(wave, lengths)
    assert restored.generate(features, mask, max_new_tokens=4, min_new_tokens=4) == \
        model.generate(features, mask, max_new_tokens=4, min_new_tokens=4)


def test_checkpoint_mismatches_are_errors_naming_both_sides(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(bases, "llama")
    ckpt = str(tmp_path / "ckpt")
    model.save_trainable(ckpt)
    with pytest.raises(ValueError, match=r"num_experts is 8 but this model's is 4"):
        _model(bases, "llama", num_experts=4).load_trainable(ckpt)
    with pytest.raises(ValueError, match=r"llm is .*llama' but this model's is .*gpt2'"):
        _model(bases, "gpt2").load_trainable(ckpt)
    other = SteerMoEModel.from_trainable(ckpt, llm=bases["gpt2"], dtype="float32")   # moved bases: not checked
    assert other.config["llm"] == bases["gpt2"]
    tensors = load_file(os.path.join(ckpt, TRAINABLE_WEIGHTS_NAME))
    tensors["projector.weight"] = tensors["projector.weight"][:, :-1].contiguous()
    save_file(tensors, os.path.join(ckpt, TRAINABLE_WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"projector.weight .* shape \(40, 191\) but this model's is \(40, 192\)"):
        model.load_trainable(ckpt)
    with pytest.raises(FileNotFoundError, match="not a SteerMoE checkpoint"):
        model.load_trainable(str(tmp_path))
    with pytest.raises(TypeError, match="num_expert"):
        SteerMoEModel.from_trainable(ckpt, num_expert=3)


def test_system_prompt_replaces_the_templates_system_message(bases):
    from steermoe.demo.tiny_models import build_tiny_tokenizer
    from steermoe.model import PromptFormat

    tok = build_tiny_tokenizer(chat=True)
    before, after = PromptFormat(tok, "Transcribe.", system_prompt="Be brief.").around_audio()
    assert tok.decode(before) == "<s><|system|>\nBe brief.<|end|>\n<|user|>\n"
    assert tok.decode(after) == "\nTranscribe.<|end|>\n<|assistant|>\n"
    assert tok.decode(PromptFormat(tok, "Transcribe.").around_audio()[0]) == "<s><|user|>\n"
    with pytest.raises(ValueError, match="system_prompt needs a tokenizer with a chat template"):
        PromptFormat(build_tiny_tokenizer(chat=False), system_prompt="")
    with pytest.raises(ValueError, match="system_prompt must be a string or None"):
        PromptFormat(tok, system_prompt=3)
    model = _model(bases, "llama", system_prompt="")
    assert model.config["system_prompt"] == ""
    assert model.prompt_format.around_audio()[0] == tok("<s><|system|>\n<|end|>\n<|user|>\n",
                                                          add_special_tokens=False)["input_ids"]
