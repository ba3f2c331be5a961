"""``SteerMoEModel``: steered Whisper encoder → downsampler → projector → a frozen causal LM, inside a prompt.

Sequence fed to the LLM as ``inputs_embeds`` (one row per utterance, audio frames padded out of the row):

    [prompt before the audio] [projected audio frames] [prompt after the audio] [transcript] [end token]

With a chat template the audio sits at the start of the user turn, followed by the instruction, and the
transcript is the assistant turn (closed by the template's end-of-turn token); without one the row is
``bos? · audio · "\\n{instruction}\\n" · transcript · eos``. Labels are -100 everywhere except the transcript and
its end token. Training rows are right-padded, generation rows left-padded; padding is masked out.

Only the steering tensors and the projector train (float32); the Whisper encoder and the LLM are frozen, stay in
eval mode (no dropout) and are loaded in ``dtype`` (bfloat16 by default).
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

from .audio import SAMPLE_RATE, LogMel
from .bases import check_base_exists, check_causal_lm, check_tokenizer, check_whisper, loading
from .encoder import SteeredWhisperEncoder
from .fileio import atomic_write, atomic_write_json

TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"
CONFIG_NAME = "steermoe_config.json"
DEFAULT_PROMPT = "Transcribe the audio."
IGNORE_INDEX = -100
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_AUDIO = "<|steermoe:audio|>"          # stands for the audio frames while the prompt text is rendered
_TRANSCRIPT = "<|steermoe:transcript|>"
_STRUCTURE = ("num_experts", "layers", "downsample", "downsample_mode", "projector")
_BASES = ("whisper", "llm")
_BUILD_KEYS = ("whisper", "llm", "dtype", "num_experts", "steering_scale", "layers", "downsample",
               "downsample_mode", "projector", "prompt", "system_prompt", "max_new_tokens", "max_tokens_per_second",
               "device")
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class SteerMoEOutput(ModelOutput):
    """Loss over the transcript tokens of a batch.

    loss: mean over target tokens; loss_sum: float32 sum of the token losses; num_tokens: long scalar (targets
    counted, end tokens included); logits: unused (None); gating: per steered layer (B, T_enc, E) float32 gates
    (``return_gating=True`` only); router_logits: per steered layer (B, T_enc, E) float32 router logits
    (``return_router_logits=True`` only); gating_mask (B, T_enc) long, 1 = real encoder frame (with either).
    """

    loss: Optional[Tensor] = None
    loss_sum: Optional[Tensor] = None
    num_tokens: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    gating: Optional[Tuple[Tensor, ...]] = None
    gating_mask: Optional[Tensor] = None
    router_logits: Optional[Tuple[Tensor, ...]] = None


class Downsampler(nn.Module):
    """(B, T, D) encoder frames → (B, ceil(T / factor), D') by groups of ``factor`` consecutive frames.

    ``stack`` concatenates a group's frames (D' = factor · D), ``avg`` / ``max`` pool them over its real frames
    (D' = D). A group is real when any of its frames is real, so no audio is dropped; its padded frames count as
    zeros (``stack``) or are left out (``avg``, ``max``), exactly as for the utterance alone.
    """

    MODES = ("stack", "avg", "max")

    def __init__(self, factor: int = 4, mode: str = "stack"):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"downsample must be a positive int; got {factor!r}")
        if mode not in self.MODES:
            raise ValueError(f"downsample_mode must be one of {self.MODES}; got {mode!r}")
        self.factor, self.mode = factor, mode

    def extra_repr(self) -> str:
        return f"factor={self.factor}, mode={self.mode}"

    def output_size(self, hidden_size: int) -> int:
        return hidden_size * self.factor if self.mode == "stack" else hidden_size

    def forward(self, h: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``h`` (B, T, D), ``mask`` (B, T) (1 = real; None = all real) → (B, T', D'), group mask (B, T') bool."""
        batch, frames, hidden = h.shape
        mask = torch.ones(batch, frames, dtype=torch.bool, device=h.device) if mask is None else mask.bool()
        pad = -frames % self.factor
        h = F.pad(h * mask[..., None].to(h.dtype), (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad)).view(batch, -1, self.factor)
        groups = h.view(batch, -1, self.factor, hidden)
        real = mask.sum(-1)
        if self.mode == "stack":
            out = groups.reshape(batch, -1, self.factor * hidden)
        elif self.mode == "avg":
            out = groups.sum(2) / real.clamp_min(1)[..., None].to(h.dtype)
        else:
            out = groups.masked_fill(~mask[..., None], float("-inf")).amax(2)
            out = out.masked_fill((real == 0)[..., None], 0.0)
        return out, real > 0


def build_projector(kind: str, in_size: int, out_size: int) -> nn.Module:
    """``linear``: one Linear; ``mlp``: Linear → GELU → Linear (hidden width ``out_size``)."""
    if kind == "linear":
        return nn.Linear(in_size, out_size)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_size, out_size), nn.GELU(), nn.Linear(out_size, out_size))
    raise ValueError(f"projector must be 'linear' or 'mlp'; got {kind!r}")


class PromptFormat:
    """The token ids around the audio and after it, from the tokenizer's chat template or a plain prefix.

    ``system_prompt`` (chat templates only) is sent as the system message; None keeps the template's default
    (SmolLM2's puts 24 tokens before the audio, 8 with ``system_prompt=""``). Attributes: ``chat`` (a chat
    template is used), ``end_token_id`` (closes the transcript: the template's end-of-turn token, else eos),
    ``stop_token_ids`` (end generation), ``pad_token_id``.
    """

    def __init__(self, tokenizer, instruction: str = DEFAULT_PROMPT, system_prompt: Optional[str] = None):
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"prompt must be a non-empty instruction string; got {instruction!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None; got {system_prompt!r}")
        self.tokenizer, self.instruction, self.system_prompt = tokenizer, instruction, system_prompt
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if system_prompt is not None and not self.chat:
            raise ValueError("system_prompt needs a tokenizer with a chat template; this one has none (leave "
                             "system_prompt unset)")
        eos = tokenizer.eos_token_id
        self.end_token_id = self._turn_end_id() if self.chat else eos
        if self.end_token_id is None:
            raise ValueError("the tokenizer has no eos token to end a transcript with (and no chat template)")
        self.stop_token_ids = sorted({self.end_token_id} | ({eos} if eos is not None else set()))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_token_id
        self._around: Dict[str, Tuple[List[int], List[int]]] = {}

    def _ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _render(self, instruction: str, answer: Optional[str] = None) -> str:
        messages = [{"role": "user", "content": f"{_AUDIO}\n{instruction}"}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)

    def _turn_end_id(self) -> Optional[int]:
        rendered = self._render(self.instruction, _TRANSCRIPT)
        if _TRANSCRIPT not in rendered:
            raise ValueError("the tokenizer's chat template drops the assistant message; cannot place the transcript")
        tail = self._ids(rendered.split(_TRANSCRIPT, 1)[1].lstrip())
        return tail[0] if tail else self.tokenizer.eos_token_id

    def around_audio(self, instruction: Optional[str] = None) -> Tuple[List[int], List[int]]:
        """(ids before the audio, ids after it up to where the transcript starts) for ``instruction``."""
        instruction = instruction or self.instruction
        if instruction not in self._around:
            if self.chat:
                rendered = self._render(instruction)
                if rendered.count(_AUDIO) != 1:
                    raise ValueError("the tokenizer's chat template does not keep the user message verbatim; "
                                     "cannot place the audio in it")
                before, after = rendered.split(_AUDIO)
            else:
                before, after = self.tokenizer.bos_token or "", f"\n{instruction}\n"
            self._around[instruction] = (self._ids(before), self._ids(after))
        return self._around[instruction]

    def target(self, text: str) -> List[int]:
        """Transcript ids followed by the end token."""
        return self._ids(text) + [self.end_token_id]


class SteerMoEModel(nn.Module):
    """Audio → text through a steered, frozen Whisper encoder and a frozen causal LM.

    Build with :meth:`from_pretrained` (or directly from loaded parts). Attributes: ``encoder``
    (:class:`SteeredWhisperEncoder`), ``downsample`` (:class:`Downsampler`), ``projector``, ``llm``, ``tokenizer``,
    ``log_mel`` (:class:`~steermoe.audio.LogMel`), ``prompt_format`` (:class:`PromptFormat`) and ``config`` (a
    JSON-able dict naming the base checkpoints and the structure, saved with the trainable weights).

    The LLM's ``generation_config`` is replaced by a greedy one (instruct checkpoints ship sampling defaults);
    :meth:`generate` samples only when asked.
    """

    def __init__(self, encoder: SteeredWhisperEncoder, llm: nn.Module, tokenizer, *, log_mel: Optional[LogMel] = None,
                 downsample: int = 4, downsample_mode: str = "stack", projector: str = "linear",
                 prompt: str = DEFAULT_PROMPT, system_prompt: Optional[str] = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_tokens_per_second: Optional[float] = None):
        super().__init__()
        from transformers import GenerationConfig

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
        if max_tokens_per_second is not None and (isinstance(max_tokens_per_second, bool) or not isinstance(
                max_tokens_per_second, (int, float)) or not 0 < max_tokens_per_second < math.inf):
            raise ValueError(f"max_tokens_per_second must be None or a number > 0; got {max_tokens_per_second!r}")
        llm.requires_grad_(False)
        self.encoder = encoder
        self.log_mel = log_mel if log_mel is not None else LogMel(encoder.config.num_mel_bins)
        self.downsample = Downsampler(downsample, downsample_mode)
        llm_hidden = llm.get_input_embeddings().embedding_dim
        self.projector = build_projector(projector, self.downsample.output_size(encoder.hidden_size), llm_hidden)
        self.projector.to(encoder.router_weight.device)
        self.llm = llm.eval()
        self.tokenizer = tokenizer
        self.prompt_format = PromptFormat(tokenizer, prompt, system_prompt)
        fmt = self.prompt_format
        llm.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, use_cache=True, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=fmt.stop_token_ids, pad_token_id=fmt.pad_token_id)
        self.config = {
            "whisper": encoder.config._name_or_path, "llm": llm.config._name_or_path,
            "dtype": str(llm.get_input_embeddings().weight.dtype).replace("torch.", ""),
            "num_experts": encoder.num_experts, "steering_scale": float(encoder.layer_scales[0].detach()),
            "layers": list(encoder.steered_layers), "downsample": downsample, "downsample_mode": downsample_mode,
            "projector": projector, "prompt": prompt, "system_prompt": system_prompt,
            "max_new_tokens": max_new_tokens, "max_tokens_per_second": max_tokens_per_second,
            "encoder_hidden_size": encoder.hidden_size, "llm_hidden_size": llm_hidden,
            "trainable_parameters": self.num_trainable_parameters(),
        }

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, whisper: str, llm: str, *, dtype="bfloat16", num_experts: int = 8,
                        steering_scale: float = 0.1, layers: Optional[Sequence[int]] = None, downsample: int = 4,
                        downsample_mode: str = "stack", projector: str = "linear", prompt: str = DEFAULT_PROMPT,
                        system_prompt: Optional[str] = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                        max_tokens_per_second: Optional[float] = None, device=None) -> "SteerMoEModel":
        """Load the frozen bases (Whisper's encoder only; any ``AutoModelForCausalLM`` and its tokenizer).

        Args:
            whisper, llm: checkpoint directories or hub ids.
            dtype: frozen-weight dtype, ``bfloat16`` | ``float16`` | ``float32`` (trainables stay float32).
            num_experts, steering_scale, layers: the steering (see :class:`SteeredWhisperEncoder`).
            downsample, downsample_mode: frames per LLM position and how they merge (see :class:`Downsampler`).
            projector: ``linear`` or ``mlp``.  prompt: the default instruction.
            system_prompt: the chat template's system message (None: the template's default; see :class:`PromptFormat`).
            max_new_tokens: the default decoding budget of :meth:`generate` (saved with the trainable weights).
            max_tokens_per_second: caps each utterance's budget at ``ceil(rate × its seconds)`` tokens (None: no cap;
                saved with the trainable weights; see :meth:`decoding_budgets`).
            device: where to put the model.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor

        torch_dtype = DTYPES.get(dtype, dtype)
        if torch_dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {dtype!r}")
        check_base_exists("whisper", whisper)
        check_base_exists("llm", llm)
        with loading("whisper", whisper):
            check_whisper(whisper)
            encoder = SteeredWhisperEncoder.from_pretrained(whisper, num_experts=num_experts,
                                                            steering_scale=steering_scale, layers=layers,
                                                            dtype=torch_dtype)
        try:
            log_mel = LogMel(WhisperFeatureExtractor.from_pretrained(whisper))
        except OSError:   # a checkpoint without preprocessor_config.json: Whisper's defaults
            log_mel = LogMel(encoder.config.num_mel_bins)
        if log_mel.n_mels != encoder.config.num_mel_bins:
            raise ValueError(f"{whisper}: the feature extractor makes {log_mel.n_mels} mel bins but the encoder "
                             f"takes {encoder.config.num_mel_bins}")
        with loading("llm", llm):
            check_causal_lm(llm)
            lm = AutoModelForCausalLM.from_pretrained(llm, **{_dtype_kwarg(): torch_dtype})
            tokenizer = AutoTokenizer.from_pretrained(llm)
        check_tokenizer(llm, tokenizer)
        model = cls(encoder, lm, tokenizer, log_mel=log_mel, downsample=downsample,
                    downsample_mode=downsample_mode, projector=projector, prompt=prompt,
                    system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                    max_tokens_per_second=max_tokens_per_second)
        model.config["steering_scale"] = steering_scale
        return model.to(device) if device is not None else model

    @classmethod
    def from_trainable(cls, directory: str, **overrides) -> "SteerMoEModel":
        """Rebuild a model from :meth:`save_trainable`'s config (bases reloaded by name) and load its weights.

        ``overrides`` replace :meth:`from_pretrained` arguments (e.g. ``device``, ``dtype``, or ``whisper`` /
        ``llm`` when the base checkpoints moved: then their names are not checked).
        """
        unknown = sorted(set(overrides) - set(_BUILD_KEYS))
        if unknown:
            raise TypeError(f"from_trainable got unexpected arguments {unknown}; accepted: {', '.join(_BUILD_KEYS)}")
        saved = _read_config(directory)
        kwargs = {k: saved[k] for k in _BUILD_KEYS if k in saved}
        kwargs.update(overrides)
        model = cls.from_pretrained(**kwargs)
        model.load_trainable(directory, check_base=not set(_BASES) & set(overrides))
        return model

    # ---------------------------------------------------------------------------------- nn.Module API
    def train(self, mode: bool = True) -> "SteerMoEModel":
        """Sets the trainable parts' mode; the frozen encoder and LLM stay in eval mode."""
        super().train(mode)
        self.llm.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.encoder.router_weight.device

    def trainable_parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``router`` (weight, bias), ``vectors``, ``scales``, ``projector``: float32 parameters, for per-group LRs."""
        e = self.encoder
        return {"router": [e.router_weight, e.router_bias], "vectors": [e.steering_vectors],
                "scales": [e.layer_scales], "projector": list(self.projector.parameters())}

    def decayed_parameters(self) -> List[nn.Parameter]:
        """The trainable weight matrices, which get weight decay: router weights, steering vectors, projector
        weights. The router bias (L, E), the layer scales and the projector biases get none."""
        linears = [m.weight for m in self.projector.modules() if isinstance(m, nn.Linear)]
        return [self.encoder.router_weight, self.encoder.steering_vectors, *linears]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for group in self.trainable_parameter_groups().values() for p in group)

    def _named_trainable(self) -> Dict[str, nn.Parameter]:
        wanted = {id(p) for group in self.trainable_parameter_groups().values() for p in group}
        return {name: p for name, p in self.named_parameters() if id(p) in wanted}

    # ------------------------------------------------------------------------------------------ inputs
    def features(self, batch_or_waveforms, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Log-mel features on the model's device: ``(input_features (B, n_mels, T_mel) float32, mask (B, T_mel))``.

        Takes a batch with ``waveforms`` (B, S) and ``lengths`` (B,) (e.g. a ``SpeechBatch``), or both tensors.
        """
        if lengths is None:
            if not hasattr(batch_or_waveforms, "waveforms"):
                raise TypeError("features() takes a batch with .waveforms/.lengths, or (waveforms, lengths)")
            batch_or_waveforms, lengths = batch_or_waveforms.waveforms, batch_or_waveforms.lengths
        return self.log_mel(batch_or_waveforms.to(self.device), lengths.to(self.device))

    def _audio(self, input_features: Tensor, attention_mask: Optional[Tensor], return_gating: bool,
               return_router_logits: bool = False):
        """Projected audio (B, T', H_llm), real positions per row (B,), and the encoder output."""
        enc = self.encoder(input_features, attention_mask=attention_mask, return_gating=return_gating,
                           return_router_logits=return_router_logits, mask_padding=True)  # also when the longest clip fills Whisper's 30 s window
        h, keep = self.downsample(enc.last_hidden_state, enc.attention_mask)
        audio = self.projector(h.to(self.projector_dtype))
        return audio, keep.sum(-1), enc

    @property
    def window_samples(self) -> int:
        """The longest waveform one encoder window takes, in samples (Whisper: 3000 mel frames = 30 s)."""
        return self.encoder.max_mel_frames * self.log_mel.hop_length

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def _sequences(self, audio: Tensor, audio_lengths: Tensor, prompts: Optional[Sequence[Optional[str]]],
                   texts: Optional[Sequence[str]], left_pad: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Rows of prompt + real audio frames (+ transcript): (inputs_embeds, attention_mask, labels or None)."""
        batch = audio.shape[0]
        prompts = _per_row(prompts, batch, "prompts")
        texts = _per_row(texts, batch, "texts") if texts is not None else None
        fmt = self.prompt_format
        before, after, targets = [], [], []
        for i in range(batch):
            pre, post = fmt.around_audio(prompts[i])
            target = fmt.target(texts[i]) if texts is not None else []
            before.append(pre)
            after.append(post + target)
            targets.append(target)
        embed = self.llm.get_input_embeddings()
        flat = [ids for pair in zip(before, after) for ids in pair]
        text_embeds = embed(torch.tensor([t for ids in flat for t in ids], dtype=torch.long, device=audio.device))
        text_embeds = text_embeds.split([len(ids) for ids in flat])
        audio = audio.to(text_embeds[0].dtype)
        lengths = audio_lengths.tolist()
        rows = [torch.cat([text_embeds[2 * i], audio[i, : lengths[i]], text_embeds[2 * i + 1]]) for i in range(batch)]
        width = max(len(r) for r in rows)
        embeds = audio.new_zeros(batch, width, audio.shape[-1])
        mask = torch.zeros(batch, width, dtype=torch.long, device=audio.device)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=audio.device)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left_pad else slice(0, len(row))
            embeds[i, span] = row
            mask[i, span] = 1
            if targets[i]:
                labels[i, span.start + len(row) - len(targets[i]): span.start + len(row)] = torch.tensor(targets[i])
        return embeds, mask, labels if texts is not None else None

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, input_features: Tensor, attention_mask: Optional[Tensor] = None,
                texts: Optional[Sequence[str]] = None, prompts: Optional[Sequence[Optional[str]]] = None,
                return_gating: bool = False, return_router_logits: bool = False) -> SteerMoEOutput:
        """Teacher-forced transcript loss.

        Args:
            input_features: (B, n_mels, T_mel) log-mel features; attention_mask: (B, T_mel), 1 = real frame.
            texts: B transcripts (required).  prompts: B instructions or None (None entries: the default).
            return_gating: also return the steering gates and the encoder-frame mask.
            return_router_logits: also return the router logits (e.g. for the z-loss) and the encoder-frame mask.
        """
        if texts is None:
            raise ValueError("forward() needs texts (the transcripts) for the loss; use generate() to transcribe")
        audio, audio_lengths, enc = self._audio(input_features, attention_mask, return_gating, return_router_logits)
        embeds, mask, labels = self._sequences(audio, audio_lengths, prompts, texts, left_pad=False)
        hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        logits = self._logits(hidden[:, :-1][select])
        loss_sum = F.cross_entropy(logits.float(), targets[select], reduction="sum")
        num_tokens = select.sum()
        gating_mask = None
        if return_gating or return_router_logits:
            gating_mask = enc.attention_mask if enc.attention_mask is not None else torch.ones(
                enc.last_hidden_state.shape[:2], dtype=torch.long, device=embeds.device)
        return SteerMoEOutput(loss=loss_sum / num_tokens.clamp_min(1), loss_sum=loss_sum, num_tokens=num_tokens,
                              gating=enc.gating, gating_mask=gating_mask, router_logits=enc.router_logits)

    def _logits(self, hidden: Tensor) -> Tensor:
        """The LLM head on (N, H) hidden states only where a target is predicted (a full-vocabulary logits tensor
        for every position would cost B · L · V), with the output scalings some architectures apply."""
        logits = self.llm.get_output_embeddings()(hidden)
        config = self.llm.config
        if getattr(config, "logit_scale", None):           # Cohere
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None):        # Granite
            logits = logits / config.logits_scaling
        if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3
            cap = config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def generate(self, input_features: Tensor, attention_mask: Optional[Tensor] = None,
                 prompts: Optional[Sequence[Optional[str]]] = None, max_new_tokens: Optional[int] = None,
                 **generate_kwargs) -> List[str]:
        """Transcribe a batch: greedy (unless ``generate_kwargs`` ask otherwise), batched, with the KV cache.

        ``max_new_tokens`` None: the model's own (``config["max_new_tokens"]``, saved with its trainable weights);
        each row is cut at its own budget (:meth:`decoding_budgets`).

        Returns B strings (special tokens removed, stripped); a row's output never depends on the rest of its batch.
        """
        budgets = self.decoding_budgets(input_features, attention_mask, max_new_tokens)
        audio, audio_lengths, _ = self._audio(input_features, attention_mask, return_gating=False)
        embeds, mask, _ = self._sequences(audio, audio_lengths, prompts, None, left_pad=True)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max(budgets),
                                **generate_kwargs)
        stops = set(self.prompt_format.stop_token_ids)
        texts = []
        for row, budget in zip(out.tolist(), budgets):
            row = row[:budget]      # greedy: the same tokens a generate() stopped at this row's budget gives
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return texts

    def decoding_budgets(self, input_features: Tensor, attention_mask: Optional[Tensor] = None,
                         max_new_tokens: Optional[int] = None) -> List[int]:
        """New tokens each row may generate: ``max_new_tokens`` (None: ``config["max_new_tokens"]``), and with
        ``config["max_tokens_per_second"]`` = r at most ``max(1, ceil(r × seconds))`` for a row of that many
        seconds of audio (its real mel frames × hop / 16 kHz): a transcript cannot outrun its audio, and a run-on
        generation (the LLM continuing past the transcript) is cut there. (B,) ints."""
        if max_new_tokens is None:
            max_new_tokens = self.config["max_new_tokens"]
        rate = self.config.get("max_tokens_per_second")
        batch, _, frames = input_features.shape
        if rate is None:
            return [max_new_tokens] * batch
        mel = attention_mask.sum(-1).tolist() if attention_mask is not None else [frames] * batch
        hop = self.log_mel.hop_length
        # rounded first: 1.1 tokens/s × 3000 frames × 160 / 16000 is 33.00000000000001 in floats (33 tokens, not 34)
        return [min(max_new_tokens, max(1, math.ceil(round(rate * n * hop / SAMPLE_RATE, 6)))) for n in mel]

    # ------------------------------------------------------------------------------------ weights I/O
    def save_trainable(self, directory: str) -> None:
        """Write the trainable tensors (``trainable.safetensors``, float32) and ``steermoe_config.json``, each
        atomically. Megabytes: the frozen bases are referenced by name, never copied."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {name: p.detach().float().contiguous().cpu() for name, p in self._named_trainable().items()}
        atomic_write(os.path.join(directory, TRAINABLE_WEIGHTS_NAME),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_json(os.path.join(directory, CONFIG_NAME), self.config)

    def load_trainable(self, directory: str, *, check_base: bool = True) -> None:
        """Load :meth:`save_trainable`'s tensors. Raises ValueError when the saved structure (experts, layers,
        downsampling, projector; base checkpoint names with ``check_base``) or a tensor shape differs, naming both."""
        from safetensors.torch import load_file

        saved = _read_config(directory)
        config_path = os.path.join(directory, CONFIG_NAME)
        for key in _STRUCTURE + (_BASES if check_base else ()):
            if saved.get(key) != self.config[key]:
                raise ValueError(f"{config_path}: {key} is {saved.get(key)!r} but this model's is "
                                 f"{self.config[key]!r}")
        path = os.path.join(directory, TRAINABLE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no {TRAINABLE_WEIGHTS_NAME}")
        tensors = load_file(path)
        params = self._named_trainable()
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(f"{path} does not match this model: missing {missing}, unexpected {unexpected}")
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"{name} in {path} has shape {tuple(tensors[name].shape)} but this model's is "
                                 f"{tuple(p.shape)}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])


def _per_row(values: Optional[Sequence], batch: int, name: str) -> list:
    if values is None:
        return [None] * batch
    if isinstance(values, str) or len(values) != batch:
        raise ValueError(f"{name} must be a sequence of {batch} entries (one per utterance); got {values!r}")
    return list(values)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a SteerMoE checkpoint: it has no {CONFIG_NAME}")
    with open(path) as f:
        return json.load(f)


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
