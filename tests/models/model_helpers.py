"""Helpers shared by the SAM and SAM2 model tests: the W8A8 recipe, quantizer kinds, a recording slot."""
from __future__ import annotations

import torch
from torch import nn

from ahcq.quantization import api
from ahcq.quantization.quantizers import Role

W8A8 = {"a_qconfig": {"bit": 8}, "w_qconfig": {"bit": 8, "quantizer": "fixed", "observer": "minmax"}}


def kinds(model: nn.Module) -> dict[str, tuple[str, Role]]:
    """``{quantizer name: (quantizer class name, role)}`` of every quantizer of ``model``."""
    return {name: (type(q).__name__, q.role) for name, q in api.iter_quantizers(model)}


class IdentitySlot(nn.Module):
    """An identity module in a quantizer slot (accepts the side inputs quantizers take); unlike an empty
    slot it is a module that runs."""

    def forward(self, x: torch.Tensor, **ctx) -> torch.Tensor:
        return x


class Recorder(IdentitySlot):
    """Identity slot that records what it sees (shape and side inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], tuple[str, ...]]] = []

    def forward(self, x: torch.Tensor, **ctx) -> torch.Tensor:
        self.seen.append((tuple(x.shape), tuple(sorted(ctx))))
        return x
