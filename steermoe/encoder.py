"""``SteeredWhisperEncoder``: a frozen transformers ``WhisperEncoder`` with a steering step after each chosen layer.

Per steered layer l (row r of the parameter tensors), with h the layer's output after its residual add:

    h ← h + layer_scales[r] · softmax(h router_weight[r]ᵀ + router_bias[r]) steering_vectors[r]

computed by :func:`steermoe.steer`. Only the four steering tensors train; the Whisper weights are frozen.
Where the layer is transformers' own ``WhisperEncoderLayer`` the step also takes the layer's last residual add
(``h = residual + fc2(...)``, see :func:`_layer_halves`), so h itself is never written to memory.
"""
import inspect
import json
import logging
import math
import operator
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import WhisperConfig
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperEncoderLayer

from .fileio import atomic_write, atomic_write_json
from .ops import steer

logger = logging.getLogger(__name__)

STEERING_WEIGHTS_NAME = "steering.safetensors"
STEERING_CONFIG_NAME = "steering_config.json"
_STEERING_TENSORS = ("router_weight", "router_bias", "steering_vectors", "layer_scales")
_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")
_WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"))
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")
_MASKING_ATTENTION = ("eager", "sdpa")


@dataclass
class SteeredEncoderOutput(BaseModelOutput):
    """``BaseModelOutput`` plus the steering gates, the router logits and the encoder-frame mask.

    gating: one (B, T_out, E) float32 tensor per steered layer (``return_gating=True`` only); at padded frames
        it holds the gates of padding, so statistics over it should weight frames by ``attention_mask``.
    attention_mask: (B, T_out) long, 1 = real encoder frame (only when padding was masked).
    router_logits: one (B, T_out, E) float32 tensor per steered layer, ``h Wᵀ + b`` before the softmax
        (``return_router_logits=True`` only), e.g. for the router z-loss.
    """

    gating: Optional[Tuple[Tensor, ...]] = None
    attention_mask: Optional[Tensor] = None
    router_logits: Optional[Tuple[Tensor, ...]] = None


class SteeredWhisperEncoder(nn.Module):
    """A frozen Whisper encoder with trainable per-layer steering; a drop-in for ``WhisperEncoder``.

    Trainable float32 parameters (L = number of steered layers, E = ``num_experts``, D = ``d_model``):
    ``router_weight`` (L, E, D) and ``router_bias`` (L, E), initialised like ``nn.Linear(D, E)``;
    ``steering_vectors`` (L, E, D) ~ N(0, 0.01²); ``layer_scales`` (L,) = ``steering_scale``.

    Args:
        encoder: a transformers ``WhisperEncoder``. Its weights are shared, frozen and kept in eval mode
            (dropout off), also after ``.train()``. Its attention must accept an additive mask (eager or sdpa);
            another implementation is switched to sdpa where transformers allows it.
        num_experts: E, steering vectors per layer.
        steering_scale: initial value of every ``layer_scales`` entry (0 makes the module an exact identity).
        layers: encoder layer indices to steer (default: all), e.g. ``range(16, 32)``.

    The steering tensors are float32 whatever the encoder's dtype or torch's default dtype.

    ``fuse_residual`` (attribute, default True): a steered layer that is transformers' own ``WhisperEncoderLayer``,
    with no hook or instance override, in eval mode and not float16, runs its two halves here and hands the last
    residual add to the steering op (``steer(fc2_out, ..., residual=h_attn)``): the same output, one (B, T, D)
    tensor fewer written and read per steered layer. Otherwise, and with ``output_attentions`` or
    ``return_router_logits`` (the logits need the sum itself), the layer's own
    forward runs and the step follows it. float16 is left to the layer for its overflow clamp after that add.
    """

    main_input_name = "input_features"

    def __init__(self, encoder: WhisperEncoder, num_experts: int = 8, steering_scale: float = 0.1,
                 layers: Optional[Iterable[int]] = None):
        super().__init__()
        if not isinstance(encoder, WhisperEncoder):
            raise TypeError(f"encoder must be a transformers WhisperEncoder; got {type(encoder).__name__}")
        num_experts = _positive_int(num_experts, "num_experts")
        num_layers = len(encoder.layers)
        steered = list(range(num_layers)) if layers is None else _layer_indices(layers, num_layers)
        _use_masking_attention(encoder)
        encoder.requires_grad_(False)
        encoder.eval()

        self.encoder = encoder
        self.config: WhisperConfig = encoder.config
        self.num_experts = num_experts
        self.steered_layers: List[int] = steered
        self.hidden_size = encoder.config.d_model
        self.gradient_checkpointing = False
        self.fuse_residual = True
        self._row_of_layer: Dict[int, int] = {layer: row for row, layer in enumerate(steered)}
        self._layer_takes_head_mask = "layer_head_mask" in inspect.signature(encoder.layers[0].forward).parameters

        n, e, d = len(steered), num_experts, self.hidden_size
        f32 = dict(device=encoder.conv1.weight.device, dtype=torch.float32)
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default init: U(-1/√fan_in, 1/√fan_in) for weight and bias
        self.router_weight = nn.Parameter(torch.empty(n, e, d, **f32).uniform_(-bound, bound))
        self.router_bias = nn.Parameter(torch.empty(n, e, **f32).uniform_(-bound, bound))
        self.steering_vectors = nn.Parameter(torch.randn(n, e, d, **f32) * 0.01)
        self.layer_scales = nn.Parameter(torch.full((n,), float(steering_scale), **f32))

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, num_experts: int = 8, steering_scale: float = 0.1,
                        layers: Optional[Iterable[int]] = None, dtype=None, **kw) -> "SteeredWhisperEncoder":
        """Load only the encoder of a Whisper checkpoint (local directory or hub id) and wrap it.

        Reads the encoder tensors (``model.encoder.*`` or ``encoder.*``) from ``model.safetensors`` (sharded or not)
        or, failing that, memory-maps ``pytorch_model.bin``; the decoder's tensors are never loaded.

        Args:
            dtype: encoder weight dtype: a ``torch.dtype`` or its name; None → float32; ``"auto"`` → as stored.
                ``torch_dtype`` is accepted as its older name, as transformers does.
            kw: ``attn_implementation`` (``"sdpa"`` default, or ``"eager"``) and hub options
                (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``).
        """
        if "torch_dtype" in kw:
            if dtype is not None:
                raise TypeError("pass the weight dtype as dtype or as torch_dtype, not both")
            dtype = kw.pop("torch_dtype")
        attn_implementation = kw.pop("attn_implementation", "sdpa")
        if attn_implementation not in _MASKING_ATTENTION:
            raise ValueError(f"attn_implementation must be one of {_MASKING_ATTENTION} (they take the padding mask); "
                             f"got {attn_implementation!r}")
        unknown = sorted(set(kw) - set(_HUB_KWARGS))
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {unknown}; accepted: "
                            f"attn_implementation, {', '.join(_HUB_KWARGS)}")
        config = WhisperConfig.from_pretrained(name_or_path, **kw)
        config._attn_implementation = attn_implementation
        config.name_or_path = name_or_path  # recorded as the source in steering_config.json
        state = _load_encoder_state(name_or_path, kw)
        weight_dtype = _resolve_dtype(dtype, state)
        with torch.device("meta"):
            encoder = WhisperEncoder(config)
        encoder.load_state_dict({k: v.to(weight_dtype) for k, v in state.items()}, strict=True, assign=True)
        return cls(encoder, num_experts=num_experts, steering_scale=steering_scale, layers=layers)

    # ---------------------------------------------------------------------------------- nn.Module API
    def train(self, mode: bool = True) -> "SteeredWhisperEncoder":
        """Sets the wrapper's mode; the frozen encoder stays in eval mode (no dropout, no layer drop)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def _freeze_parameters(self) -> None:
        """What ``WhisperForConditionalGeneration.freeze_encoder()`` calls: freeze the steering too."""
        self.requires_grad_(False)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each frozen layer in backward instead of keeping its activations (steering grads unchanged)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def conv1(self) -> nn.Conv1d:
        """The encoder's first conv (``WhisperForConditionalGeneration.generate`` reads its stride)."""
        return self.encoder.conv1

    @property
    def conv2(self) -> nn.Conv1d:
        """The encoder's second, stride-2 conv."""
        return self.encoder.conv2

    @property
    def max_mel_frames(self) -> int:
        """Longest accepted mel input: 3000 frames (30 s) for real Whisper checkpoints."""
        return self.encoder.embed_positions.num_embeddings * self.conv1.stride[0] * self.conv2.stride[0]

    def output_lengths(self, mel_lengths: Tensor) -> Tensor:
        """Encoder frames per sample for ``mel_lengths`` mel frames (the stride-2 conv halves them, rounding up)."""
        lengths = mel_lengths
        for conv in (self.conv1, self.conv2):
            reach = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
            lengths = (lengths + 2 * conv.padding[0] - reach) // conv.stride[0] + 1
        return lengths

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"steered_layers={self.steered_layers}")

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, input_features: Tensor, attention_mask: Optional[Tensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                return_gating: bool = False, output_attentions: Optional[bool] = None,
                head_mask: Optional[Tensor] = None, mask_padding: Optional[bool] = None,
                return_router_logits: bool = False, **kwargs) -> Union[SteeredEncoderOutput, Tuple]:
        """Encode log-mel features, steering after each chosen layer.

        Whisper was pretrained on 30 s windows (3000 mel frames, 1500 encoder frames), padding included, and its
        encoder never masks: at that length this module does the same by default, so ``generate()`` of a
        ``WhisperForConditionalGeneration`` (which passes the processor's mask) sees Whisper's encoder. Shorter
        inputs are accepted too (any length up to :attr:`max_mel_frames`) and cost proportionally less. With
        padding masked, each sample of a padded batch gets its output alone: padded mel frames are zeroed, padded
        encoder frames are masked as attention keys, and ``last_hidden_state`` is zero at padded frames.

        Args:
            input_features: (B, n_mels, T_mel) log-mel features (cast to the encoder's dtype).
            attention_mask: (B, T_mel), 1 = real mel frame; right padding only.
            mask_padding: apply ``attention_mask``: None (default) → only for inputs shorter than
                :attr:`max_mel_frames` (at the full window it is ignored, as Whisper's encoder does); True → always
                (a padded batch whose longest clip fills the window); False → never.
            output_hidden_states: also return, as transformers does, each layer's input (the embeddings, then
                the previous layer's steered output) and the final layer-normed output: n_layers + 1 tensors.
            output_attentions: also return each layer's self-attention weights (B, heads, T_out, T_out), as
                transformers does: from eager attention; from sdpa, eager's in transformers 4 and none in 5 (an
                empty tuple and a warning).
            return_dict: False returns a tuple (last_hidden_state, [hidden_states], [attentions], [gating],
                [attention_mask], [router_logits]).
            return_gating: return the per-steered-layer gates, each (B, T_out, E) float32.
            return_router_logits: return the per-steered-layer router logits, each (B, T_out, E) float32. The op
                does not return them, so they cost one extra (B·T_out, D) × (D, E) product per layer (and its
                backward): about E / (12 D) of a layer's work.
            head_mask: accepted for transformers' callers; only None is supported.
            kwargs: other transformers keyword arguments (e.g. from ``WhisperModel.forward``); they do not apply.

        Returns:
            :class:`SteeredEncoderOutput`; ``last_hidden_state`` is (B, T_out, D), T_out = ``output_lengths(T_mel)``.
        """
        if head_mask is not None:
            raise ValueError("head_mask is not supported by SteeredWhisperEncoder; pass None")
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        return_dict = True if return_dict is None else return_dict

        encoder = self.encoder
        features = self._check_features(input_features)
        if mask_padding is None:
            mask_padding = features.shape[-1] < self.max_mel_frames
        frame_mask = out_mask = layer_mask = returned_mask = None
        if mask_padding and attention_mask is not None and not _is_generate_placeholder(attention_mask, features):
            frame_mask, out_mask = self._frame_masks(attention_mask, features)
            returned_mask = out_mask.long()
            if bool(out_mask.all()):          # nothing padded: the unmasked (faster) path is exact
                frame_mask = out_mask = None

        if frame_mask is not None:            # where, not a product: padding may hold inf or NaN
            features = torch.where(frame_mask[:, None, :], features, 0)
        h = nn.functional.gelu(encoder.conv1(features))
        if frame_mask is not None:            # zeros where the sample alone would see conv2's zero padding
            h = torch.where(frame_mask[:, None, :], h, 0)
        h = nn.functional.gelu(encoder.conv2(h)).permute(0, 2, 1)
        h = h + encoder.embed_positions.weight[: h.shape[1]]
        if out_mask is not None:
            layer_mask = _additive_key_mask(out_mask, h.dtype)

        all_states: Tuple[Tensor, ...] = ()
        attentions: List[Tensor] = []
        gating: List[Tensor] = []
        router_logits: List[Tensor] = []
        for idx, layer in enumerate(encoder.layers):
            if output_hidden_states:
                all_states += (h,)
            row = self._row_of_layer.get(idx)
            residual = None
            if (row is not None and self.fuse_residual and not (output_attentions or return_router_logits)
                    and _fusable(layer, h)):
                residual, h = self._checkpointed(_layer_halves, layer, h, layer_mask)
            else:
                h, weights = self._checkpointed(_call_layer, layer, h, layer_mask, self._layer_takes_head_mask,
                                                bool(output_attentions))
                if weights is not None:
                    attentions.append(weights)
            if row is not None:
                if return_router_logits:
                    router_logits.append(h.float() @ self.router_weight[row].t() + self.router_bias[row])
                out = steer(h, self.router_weight[row], self.router_bias[row], self.steering_vectors[row],
                            self.layer_scales[row], residual=residual, return_gating=return_gating)
                if return_gating:
                    h, g = out
                    gating.append(g)
                else:
                    h = out
        h = encoder.layer_norm(h)
        if out_mask is not None:
            h = h * out_mask[..., None].to(h.dtype)
        if output_hidden_states:
            all_states += (h,)

        if output_attentions and not attentions:
            logger.warning("%s attention does not return attention weights; load the encoder with "
                           "attn_implementation='eager' for output_attentions", self.config._attn_implementation)
        output = SteeredEncoderOutput(last_hidden_state=h, hidden_states=all_states or None,
                                      attentions=tuple(attentions) if output_attentions else None,
                                      gating=tuple(gating) if return_gating else None,
                                      attention_mask=returned_mask,
                                      router_logits=tuple(router_logits) if return_router_logits else None)
        return output if return_dict else output.to_tuple()

    def _checkpointed(self, fn, layer: nn.Module, h: Tensor, *args):
        """fn(layer, h, *args), recomputed in backward instead of keeping its activations when checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled() and h.requires_grad:
            return checkpoint(fn, layer, h, *args, use_reentrant=False)
        return fn(layer, h, *args)

    def _check_features(self, input_features: Tensor) -> Tensor:
        n_mels = self.config.num_mel_bins
        if not isinstance(input_features, Tensor) or input_features.dim() != 3 or input_features.shape[1] != n_mels:
            got = tuple(input_features.shape) if isinstance(input_features, Tensor) else type(input_features).__name__
            raise ValueError(f"input_features must have shape (B, {n_mels}, T_mel); got {got}")
        if input_features.shape[0] == 0:
            raise ValueError("input_features must hold at least one sample; got B = 0")
        if not 1 <= input_features.shape[-1] <= self.max_mel_frames:
            raise ValueError(f"input_features must have 1..{self.max_mel_frames} mel frames "
                             f"(Whisper's 30 s window); got {input_features.shape[-1]}")
        return input_features.to(self.conv1.weight.dtype)

    def _frame_masks(self, attention_mask: Tensor, features: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, T_mel) mel mask → (frame mask (B, T_mel) bool, encoder-frame mask (B, T_out) bool)."""
        batch, _, t_mel = features.shape
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (batch, t_mel):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have shape (B, T_mel) = ({batch}, {t_mel}); got {got}")
        mask = attention_mask.to(device=features.device) != 0
        lengths = mask.sum(-1)
        frame_mask = torch.arange(t_mel, device=mask.device) < lengths[:, None]
        if not torch.equal(mask, frame_mask) or bool((lengths == 0).any()):
            raise ValueError("attention_mask must mark each sample's real mel frames as a non-empty prefix of 1s "
                             "followed by 0s (right padding)")
        t_out = int(self.output_lengths(torch.tensor(t_mel)))
        out_mask = torch.arange(t_out, device=mask.device) < self.output_lengths(lengths)[:, None]
        return frame_mask, out_mask

    # ------------------------------------------------------------------------------------- weights I/O
    def save_steering(self, directory: str) -> None:
        """Write the four steering tensors (``steering.safetensors``) and ``steering_config.json`` atomically."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in _STEERING_TENSORS}
        config = {"num_experts": self.num_experts, "steered_layers": self.steered_layers,
                  "hidden_size": self.hidden_size, "num_encoder_layers": len(self.encoder.layers),
                  "source": getattr(self.config, "name_or_path", None) or None}
        atomic_write(os.path.join(directory, STEERING_WEIGHTS_NAME),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_json(os.path.join(directory, STEERING_CONFIG_NAME), config)

    def load_steering(self, directory: str) -> None:
        """Load tensors written by :meth:`save_steering`; raises ValueError naming both shapes on a mismatch."""
        from safetensors.torch import load_file

        path = os.path.join(directory, STEERING_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {STEERING_WEIGHTS_NAME} in {directory}")
        tensors = load_file(path)
        missing = [name for name in _STEERING_TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"{path} lacks the steering tensors {missing}")
        for name in _STEERING_TENSORS:
            here, there = tuple(getattr(self, name).shape), tuple(tensors[name].shape)
            if here != there:
                raise ValueError(f"{name} in {path} has shape {there} but this encoder's is {here} "
                                 f"(L steered layers, E experts, D hidden size: L={len(self.steered_layers)}, "
                                 f"E={self.num_experts}, D={self.hidden_size})")
        config_path = os.path.join(directory, STEERING_CONFIG_NAME)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                saved_layers = json.load(f).get("steered_layers")
            if saved_layers is not None and list(saved_layers) != self.steered_layers:
                raise ValueError(f"{config_path} steers encoder layers {saved_layers} but this encoder steers "
                                 f"{self.steered_layers}")
        with torch.no_grad():
            for name in _STEERING_TENSORS:
                getattr(self, name).copy_(tensors[name])


# ----------------------------------------------------------------------------------------- layer calls
def _call_layer(layer: nn.Module, h: Tensor, mask: Optional[Tensor], takes_head_mask: bool,
                output_attentions: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """One frozen ``WhisperEncoderLayer`` → (output, its attention weights if asked for and produced).

    transformers 4.x takes a head mask and ``output_attentions`` and returns a tuple; 5.x takes neither, returns
    the hidden states alone and leaves the weights to be read off its ``self_attn`` (second output)."""
    if takes_head_mask:
        out = layer(h, mask, layer_head_mask=None, output_attentions=output_attentions)
        return out[0], out[1] if output_attentions else None
    if not output_attentions:
        return layer(h, mask), None
    seen: List[Optional[Tensor]] = []
    hook = layer.self_attn.register_forward_hook(lambda module, args, out: seen.append(out[1]))
    try:
        return layer(h, mask), seen[0]
    finally:
        hook.remove()


def _fusable(layer: nn.Module, h: Tensor) -> bool:
    """Whether ``_layer_halves`` computes what ``layer(h, mask)`` would, with its last residual add left out: the
    layer is transformers' own class with nothing hooked in or overridden, dropout is off (eval), and h is not
    float16 (the layer clamps its float16 output after that add: only when it overflowed in transformers 4,
    always in 5)."""
    return (type(layer) is WhisperEncoderLayer and "forward" not in vars(layer) and not layer.training
            and h.dtype != torch.float16
            and not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                     or layer._backward_pre_hooks))


def _layer_halves(layer: WhisperEncoderLayer, h: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``WhisperEncoderLayer.forward`` in eval mode (transformers 4.45 … 5.x) up to its last residual add:
    (residual, branch), the layer's output being ``residual + branch``. The attention's first output is its result
    in both versions (4.x also returns the weights and a cache, 5.x the weights)."""
    attended = layer.self_attn(hidden_states=layer.self_attn_layer_norm(h), attention_mask=mask)[0]
    residual = h + attended
    return residual, layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(residual))))


def _positive_int(value, name: str) -> int:
    """value as an int ≥ 1 (numpy integers too); ValueError naming the argument otherwise."""
    if not isinstance(value, bool):
        try:
            if operator.index(value) >= 1:
                return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be a positive int; got {value!r}")


def _layer_indices(layers: Iterable[int], num_layers: int) -> List[int]:
    """Sorted distinct layer indices in [0, num_layers); ValueError naming ``layers`` otherwise."""
    given = list(layers)
    try:
        indices = sorted({operator.index(i) for i in given})
    except TypeError:
        indices = []
    if any(isinstance(i, bool) for i in given) or not indices or indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"layers must be a non-empty set of int encoder layer indices in [0, {num_layers}); "
                         f"got {given}")
    return indices


def _is_generate_placeholder(attention_mask: Tensor, features: Tensor) -> bool:
    """transformers 4.x ``generate()`` passes all-ones of shape features.shape[:2] = (B, n_mels): no padding."""
    return (isinstance(attention_mask, Tensor) and tuple(attention_mask.shape) == tuple(features.shape[:2])
            and features.shape[1] != features.shape[2] and bool((attention_mask != 0).all()))


def _additive_key_mask(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) bool, True = real frame → (B, 1, T, T) additive mask: 0 at real keys, dtype's minimum at padded ones."""
    batch, t = key_mask.shape
    additive = torch.zeros(batch, t, dtype=dtype, device=key_mask.device)
    additive = additive.masked_fill(~key_mask, torch.finfo(dtype).min)
    return additive[:, None, None, :].expand(batch, 1, t, t)


def _use_masking_attention(encoder: WhisperEncoder) -> None:
    """Make sure the encoder's self-attention applies an additive 4-D mask (eager or sdpa)."""
    impl = getattr(encoder.config, "_attn_implementation", None) or "eager"
    if impl in _MASKING_ATTENTION:
        return
    attn_class = type(encoder.layers[0].self_attn).__name__
    if attn_class != "WhisperAttention":   # transformers 4.x fixes the attention class when the layer is built
        raise ValueError(f"the encoder uses {attn_class} ({impl}), which ignores padding masks; load it with "
                         f"attn_implementation='sdpa' or 'eager'")
    logger.warning("Switching the Whisper attention implementation from %r to 'sdpa' so padding masks apply "
                   "(the config may be shared with a decoder).", impl)
    encoder.config._attn_implementation = "sdpa"


# ------------------------------------------------------------------------------------- checkpoint reading
def _resolve_file(name_or_path: str, filename: str, hub_kw: dict) -> Optional[str]:
    """Local path of ``filename`` in a directory or hub repo, or None when the checkpoint has no such file."""
    subfolder = hub_kw.get("subfolder") or ""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, subfolder, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return hf_hub_download(name_or_path, filename, **{k: v for k, v in hub_kw.items() if k in _HUB_KWARGS})
    except EntryNotFoundError:
        return None


def _encoder_key_prefix(keys: Sequence[str], where: str) -> str:
    for prefix in _ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in keys:
            return prefix
    raise ValueError(f"{where} holds no Whisper encoder weights (looked for "
                     f"{', '.join(p + 'conv1.weight' for p in _ENCODER_PREFIXES)})")


def _load_encoder_state(name_or_path: str, hub_kw: dict) -> Dict[str, Tensor]:
    """The encoder's tensors, keys relative to ``WhisperEncoder``; reads no decoder tensor."""
    for index_name, single_name in _WEIGHT_FILES:
        index_path = _resolve_file(name_or_path, index_name, hub_kw)
        if index_path is not None:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            prefix = _encoder_key_prefix(list(weight_map), index_path)
            files = sorted({file for key, file in weight_map.items() if key.startswith(prefix)})
        elif _resolve_file(name_or_path, single_name, hub_kw) is not None:
            files, prefix = [single_name], None
        else:
            continue
        state: Dict[str, Tensor] = {}
        for filename in files:
            path = _resolve_file(name_or_path, filename, hub_kw)
            if path is None:
                raise FileNotFoundError(f"{filename}, listed in the index of {name_or_path}, is missing")
            state.update(_read_tensors(path, prefix))
        return state
    raise FileNotFoundError(f"{name_or_path} has none of {[n for pair in _WEIGHT_FILES for n in pair]}")


def _read_tensors(path: str, prefix: Optional[str]) -> Dict[str, Tensor]:
    """The encoder tensors of one weights file (``prefix`` found from its keys when None)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            prefix = _encoder_key_prefix(keys, path) if prefix is None else prefix
            return {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # mmap: untouched tensors stay on disk
    prefix = _encoder_key_prefix(list(state), path) if prefix is None else prefix
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _resolve_dtype(dtype, state: Dict[str, Tensor]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return next(iter(state.values())).dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, its name, 'auto' or None; got {dtype!r}")
    return resolved
