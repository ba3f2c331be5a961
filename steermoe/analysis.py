"""What the steering experts do: per-layer usage, entropy and top experts; the router losses.

Inputs are the gates ``SteeredWhisperEncoder(..., return_gating=True).gating``: one (B, T, E) tensor per steered
layer (any (..., E) shape works), and optionally the frame mask (B, T) (1 = real frame, e.g. the output's
``attention_mask``) so padded frames are left out. Entropies are in nats; log(E) is the maximum.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def _layers(gating_per_layer: Sequence[Tensor]) -> List[Tensor]:
    if isinstance(gating_per_layer, Tensor) or not isinstance(gating_per_layer, (list, tuple)) \
            or not gating_per_layer:
        raise TypeError("gating_per_layer must be a non-empty list or tuple of (..., E) tensors, one per layer; "
                        f"got {type(gating_per_layer).__name__}")
    shape = tuple(gating_per_layer[0].shape) if isinstance(gating_per_layer[0], Tensor) else None
    for i, g in enumerate(gating_per_layer):
        if not isinstance(g, Tensor) or g.dim() < 1 or tuple(g.shape) != shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"gating_per_layer[{i}] must be a (..., E) tensor shaped like layer 0's {shape}; "
                             f"got {got}")
    return list(gating_per_layer)


def _frame_weights(gating: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(...,) float weights of gating's frames: the mask (1 = real frame) or all ones."""
    if mask is None:
        return gating.new_ones(gating.shape[:-1], dtype=torch.float32)
    if tuple(mask.shape) != tuple(gating.shape[:-1]):
        raise ValueError(f"mask must have the gating's frame shape {tuple(gating.shape[:-1])}; got {tuple(mask.shape)}")
    return (mask.to(gating.device) != 0).to(torch.float32)


def _loss_frame_weights(first: Tensor, mask: Optional[Tensor], loss: str) -> Tuple[Tensor, Tensor]:
    """(N,) float32 frame weights of ``first``'s frames and their sum; ValueError when no frame is real."""
    w = _frame_weights(first, mask).reshape(-1)
    frames = w.sum()
    if float(frames) == 0:
        raise ValueError(f"mask leaves no real frames for the {loss}")
    return w, frames


def _winners(rows: Tensor) -> Tensor:
    """(N, E) gates → (N, E) one-hot of each row's largest gate, in the gates' dtype."""
    return torch.nn.functional.one_hot(rows.argmax(-1), rows.shape[-1]).to(rows.dtype)


def usage_sums(gating_per_layer: Sequence[Tensor], mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(L, E) float64 sums over the real frames of each layer's gates, and the real-frame count (0-dim float64).

    Sums, not means, so that micro-batches and processes add up before :func:`router_health` divides.
    """
    layers = _layers(gating_per_layer)
    w = _frame_weights(layers[0], mask).double().reshape(-1, 1)
    sums = torch.stack([(g.detach().double().reshape(-1, g.shape[-1]) * w).sum(0) for g in layers])
    return sums, w.sum()


def router_health(usage: Tensor) -> Dict[str, List[float]]:
    """Per-layer health of the mean gates ``usage`` (L, E) (each row sums to 1 over the real frames):

    ``usage_entropy``: entropy of the row in nats (log E: all experts used equally; 0: one expert takes all);
    ``top_share``: the largest expert's share of the gate mass (1/E ... 1).
    """
    usage = usage.double()
    return {"usage_entropy": (-torch.xlogy(usage, usage).sum(-1)).tolist(), "top_share": usage.amax(-1).tolist()}


class GatingAccumulator:
    """Sums gate statistics over batches (e.g. a whole evaluation) and reports them like :func:`gating_statistics`."""

    def __init__(self, layer_ids: Optional[Sequence[int]] = None, top_k: int = 3):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int; got {top_k!r}")
        self.layer_ids = None if layer_ids is None else list(layer_ids)
        self.top_k = top_k
        self.num_frames = 0.0
        self._usage_sums: Optional[Tensor] = None     # (L, E) float64: Σ over real frames of the gates
        self._entropy_sums: Optional[Tensor] = None   # (L,) float64: Σ over real frames of each frame's entropy
        self._win_counts: Optional[Tensor] = None     # (L, E) float64: real frames whose largest gate is expert e

    @torch.no_grad()
    def update(self, gating_per_layer: Sequence[Tensor], mask: Optional[Tensor] = None) -> "GatingAccumulator":
        """Add one batch: the (..., E) gates of each layer and their frame mask (1 = real frame) or None."""
        layers = _layers(gating_per_layer)
        if self.layer_ids is not None and len(self.layer_ids) != len(layers):
            raise ValueError(f"got gates for {len(layers)} layers but layer_ids names {len(self.layer_ids)}")
        if self._usage_sums is not None and self._usage_sums.shape != (len(layers), layers[0].shape[-1]):
            raise ValueError(f"gates of shape (L, E) = ({len(layers)}, {layers[0].shape[-1]}) do not match the "
                             f"earlier updates' {tuple(self._usage_sums.shape)}")
        usage, frames = usage_sums(layers, mask)
        w = _frame_weights(layers[0], mask).double().reshape(-1, 1)
        entropy, wins = [], []
        for g in layers:
            rows = g.detach().double().reshape(-1, g.shape[-1])
            entropy.append(-(torch.xlogy(rows, rows).sum(-1) * w[:, 0]).sum())
            wins.append((_winners(rows) * w).sum(0))
        sums = [usage.cpu()] + [torch.stack(t).cpu() for t in (entropy, wins)]
        if self._usage_sums is None:
            self._usage_sums, self._entropy_sums, self._win_counts = sums
        else:
            for total, new in zip((self._usage_sums, self._entropy_sums, self._win_counts), sums):
                total += new
        self.num_frames += float(frames)
        return self

    def result(self) -> Dict:
        """``{"num_experts", "num_frames", "layers": [{"layer", "usage", "entropy", "usage_entropy", "top_share",
        "top1_share", "top_experts"}]}``, plain Python numbers and lists (JSON-serialisable). Per layer:

        usage: mean gate per expert over the real frames (sums to 1); entropy: mean per-frame gate entropy (low =
        each frame picks few experts); usage_entropy, top_share: see :func:`router_health`; top1_share: fraction
        of frames whose largest gate is each expert; top_experts: the ``top_k`` experts by usage, most used first.
        """
        if self._usage_sums is None or self.num_frames == 0:
            raise ValueError("no real frames seen yet: call update() with gates and a mask that keeps some frames")
        usage = self._usage_sums / self.num_frames
        entropy = self._entropy_sums / self.num_frames
        health = router_health(usage)
        num_layers, num_experts = usage.shape
        ids = self.layer_ids if self.layer_ids is not None else list(range(num_layers))
        k = min(self.top_k, num_experts)
        return {
            "num_experts": num_experts,
            "num_frames": int(self.num_frames),
            "layers": [{"layer": ids[i], "usage": usage[i].tolist(), "entropy": float(entropy[i]),
                        "usage_entropy": health["usage_entropy"][i], "top_share": health["top_share"][i],
                        "top1_share": (self._win_counts[i] / self.num_frames).tolist(),
                        "top_experts": torch.argsort(usage[i], descending=True, stable=True)[:k].tolist()}
                       for i in range(num_layers)],
        }


def gating_statistics(gating_per_layer: Sequence[Tensor], mask: Optional[Tensor] = None, *,
                      layer_ids: Optional[Sequence[int]] = None, top_k: int = 3) -> Dict:
    """Per-layer expert usage, entropies and top experts of one batch of gates (see :meth:`GatingAccumulator.result`).

    Args:
        gating_per_layer: one (..., E) tensor per steered layer, e.g. the encoder output's ``gating``.
        mask: the frames' 1 = real / 0 = padding mask (shape ``gating.shape[:-1]``), or None for all frames.
        layer_ids: labels for the layers in the result (e.g. ``encoder.steered_layers``); default 0..L-1.
        top_k: how many experts to list per layer.
    """
    return GatingAccumulator(layer_ids, top_k).update(gating_per_layer, mask).result()


def load_balancing_loss(gating_per_layer: Sequence[Tensor], mask: Optional[Tensor] = None) -> Tensor:
    """Switch-Transformer load-balancing loss, averaged over layers; a scalar float32 tensor.

    For each layer with E experts, over the real frames t:

        f_e = fraction of frames whose largest gate is expert e     (no gradient)
        P_e = mean gate of expert e
        loss_layer = E · Σ_e f_e · P_e

    It is 1 when the experts are used equally and E when one expert takes every frame; its gradient lowers the
    gates of the experts that win most often. Not used unless the caller adds ``weight · loss`` to its objective.
    """
    layers = _layers(gating_per_layer)
    w, frames = _loss_frame_weights(layers[0], mask, "load-balancing loss")
    w = w.reshape(-1, 1)
    losses = []
    for g in layers:
        rows = g.reshape(-1, g.shape[-1]).float()
        num_experts = rows.shape[-1]
        f = (_winners(rows.detach()) * w).sum(0) / frames
        p = (rows * w).sum(0) / frames
        losses.append(num_experts * (f * p).sum())
    return torch.stack(losses).mean()


def router_z_loss(logits_per_layer: Sequence[Tensor], mask: Optional[Tensor] = None) -> Tensor:
    """ST-MoE router z-loss, averaged over layers; a scalar float32 tensor.

    For each layer, over the real frames t of its (..., E) router logits z (the encoder's ``router_logits``):

        loss_layer = mean_t (log Σ_e exp z_te)²

    It keeps the logits near zero, where the softmax is not saturated and its gradient reaches every expert. Not
    used unless the caller adds ``weight · loss`` to its objective.
    """
    layers = _layers(logits_per_layer)
    w, frames = _loss_frame_weights(layers[0], mask, "router z-loss")
    losses = [(torch.logsumexp(z.reshape(-1, z.shape[-1]).float(), -1).square() * w).sum() / frames for z in layers]
    return torch.stack(losses).mean()
