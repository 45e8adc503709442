"""Exponential moving average of named parameters, kept outside the modules and copied in at the end."""

from __future__ import annotations

import torch


class Ema:
    """EMA with the usual warm-up decay min(decay, (1 + step) / (10 + step)).

    The warm-up matters for short runs: with a fixed 0.999 the average would still remember the
    random initialisation after a thousand steps. State is keyed by "module/parameter" names.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.modules, self.decay, self.updates = modules, decay, 0
        self.shadow = {name: p.detach().clone() for name, p in self._named()}

    def _named(self):
        for key, module in self.modules.items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    yield f"{key}/{name}", p

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self._named():
            self.shadow[name].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to_modules(self) -> None:
        for name, p in self._named():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights plus the update count (as a tensor), for exact resume."""
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.updates = int(state.pop("__updates__"))
        if state.keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the trained parameters")
        for name, value in state.items():
            self.shadow[name].copy_(value)
