"""Tiny random checkpoints, written to disk so the real ``from_pretrained`` paths are exercised.

Used by ``steermoe demo`` and the tests; nothing here is downloaded.
"""
import os
from typing import Sequence, Tuple

import torch


def build_tiny_whisper(path: str, *, d_model: int = 64, layers: int = 2, heads: int = 4, ffn_dim: int = 128,
                       num_mel_bins: int = 80, vocab_size: int = 96, init_std: float = 0.02, seed: int = 0) -> str:
    """A random WhisperForConditionalGeneration (+ its feature extractor) saved at ``path``; returns ``path``.

    Full-length positions (1500 encoder frames = 30 s), so it accepts the same inputs as a real Whisper.
    ``init_std`` is the weights' initializer range: at transformers' default 0.02 the convolutions shrink log-mel
    input to ~1 % of the sinusoidal positions, so ~0.1 % of the output's variance depends on the audio; at 0.2 it
    is ~88 % (measured on the bundled speech), as in a pretrained encoder whose output carries what was said.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=num_mel_bins, d_model=d_model,
        encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn_dim,
        decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=ffn_dim,
        max_source_positions=1500, max_target_positions=64, init_std=init_std,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=num_mel_bins).save_pretrained(path)
    return path


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
GPT2_END = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer(*, chat: bool = True, vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in code on the demo sentences (deterministic).

    ``chat=True``: Llama-style, ``<s>``/``</s>``/``<pad>`` and a chat template whose turns end with ``<|end|>``.
    ``chat=False``: GPT-2-style, ``<|endoftext|>`` as bos/eos/unk, no pad token and no chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .make_speech import SENTENCES

    specials = list(SPECIAL_TOKENS) if chat else [GPT2_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = SENTENCES + [s.lower() for s in SENTENCES] + ["Transcribe the audio."]
    tok.train_from_iterator(corpus, trainer)
    if chat:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token=None, chat_template=CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT2_END, eos_token=GPT2_END,
                                   unk_token=GPT2_END)


def build_tiny_llm(path: str, *, arch: str = "llama", hidden_size: int = 64, layers: int = 2, heads: int = 4,
                   ffn_dim: int = 128, max_positions: int = 1024, init_std: float = 0.02, seed: int = 0) -> str:
    """A random ``AutoModelForCausalLM`` + its tokenizer (``build_tiny_tokenizer``) saved at ``path``; returns ``path``.

    ``init_std`` is the weights' initializer range (larger: sharper attention, outputs that depend more on input).

    ``arch="llama"``: LlamaForCausalLM (grouped-query attention, untied head) with the chat tokenizer; its
    generation_config samples (temperature 0.7, top-p 0.9), as instruct checkpoints ship.
    ``arch="gpt2"``: GPT2LMHeadModel (tied head, learned positions) with the plain tokenizer.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch not in ("llama", "gpt2"):
        raise ValueError(f"arch must be 'llama' or 'gpt2'; got {arch!r}")
    tokenizer = build_tiny_tokenizer(chat=arch == "llama")
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=ffn_dim,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, initializer_range=init_std,
        )
        model_class = LlamaForCausalLM
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=layers, n_head=heads, n_inner=ffn_dim,
            n_positions=max_positions, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            initializer_range=init_std,
        )
        model_class = GPT2LMHeadModel
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if arch == "llama":
        model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.9)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pretrain_tiny_llm(path: str, texts: Sequence[str], *, prompt: str, steps: int = 200, batch_size: int = 32,
                      lr: float = 3e-3, seed: int = 0) -> Tuple[float, float]:
    """Teach the LLM at ``path`` (overwritten in place) to repeat a text, the skill a pretrained LLM brings.

    Each sequence is the chat layout :class:`~steermoe.model.SteerMoEModel` trains with, the text of ``texts``
    standing where the audio goes and again as the answer; the loss is on the answer's tokens (and the end token).
    Returns the mean loss (nats/token) of the first and the last 10 steps.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model import PromptFormat

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    fmt = PromptFormat(tokenizer, prompt)
    pre, post = fmt.around_audio()
    rows = []
    for text in texts:
        context = pre + tokenizer(text, add_special_tokens=False)["input_ids"] + post
        answer = fmt.target(text)
        rows.append((context + answer, [-100] * len(context) + answer))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=generator).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([s + [fmt.pad_token_id] * (width - len(s)) for s, _ in batch])
        labels = torch.tensor([t + [-100] * (width - len(t)) for _, t in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval().save_pretrained(path)
    window = min(10, len(losses))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window
