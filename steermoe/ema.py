"""An exponential moving average of the trainable parameters (Polyak averaging), for evaluation and saving.

After optimizer step ``n`` (0-based, counting only the steps taken) every average moves as
``avg = r · avg + (1 − r) · p`` with ``r = min(decay, (1 + n) / (10 + n))``: the warm-up of the rate keeps the
start-up parameters from dominating a long average (``r`` is 0.1 at the first step, 0.5 at the ninth). The averages
are float32 tensors beside the parameters, on their device: ``4 · P`` bytes for ``P`` trainable parameters.
"""
import contextlib
from typing import Dict, Iterator, List, Sequence

import torch


class ParameterEMA:
    """Moving averages of ``params`` (trainable tensors, updated in place by an optimizer) at ``decay`` in [0, 1).

    :meth:`update` after each optimizer step; :meth:`swapped` puts the averages in the parameters for a while
    (evaluation, saving) and the trained values back after. :meth:`state_dict` holds the trained values and the
    update count, for a checkpoint whose saved weights are the averages (``load_state_dict`` then restores both).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.params: List[torch.nn.Parameter] = list(params)
        self.decay = decay
        self.updates = 0
        self.averages = [p.detach().float().clone() for p in self.params]

    def rate(self) -> float:
        """The weight the next :meth:`update` keeps of the averages."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        keep = self.rate()
        for avg, p in zip(self.averages, self.params):
            avg.lerp_(p.detach().float(), 1.0 - keep)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The averages in the parameters inside the block; the trained values back after it, bit for bit."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, avg in zip(self.params, self.averages):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, trained):
                    p.copy_(value)

    def state_dict(self) -> Dict[str, object]:
        """The update count and the trained values (CPU copies), in the order of ``params``."""
        return {"updates": self.updates, "trained": [p.detach().cpu().clone() for p in self.params]}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Resume from a checkpoint whose weights (now in the parameters) are the averages: they become the
        averages again, and the saved trained values go back into the parameters."""
        trained = state["trained"]
        if len(trained) != len(self.params):
            raise ValueError(f"the moving-average state holds {len(trained)} tensors, this model trains "
                             f"{len(self.params)}")
        for p, value in zip(self.params, trained):
            if value.shape != p.shape:
                raise ValueError(f"a moving-average tensor of shape {tuple(value.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
        self.averages = [p.detach().float().clone() for p in self.params]
        for p, value in zip(self.params, trained):
            p.copy_(value)
        self.updates = int(state["updates"])
