"""A tiny transformer-like stack quantized W4A4 with the project's API, for the reconstruction tests."""
from __future__ import annotations

import torch
from torch import nn

from ahcq.quantization.api import QuantSpec, build_quantizer, calibrating, quantize
from ahcq.quantization.granularity import ChannelGroups, PerChannel
from ahcq.quantization.layers import QuantMatMul
from ahcq.quantization.quantizers import Role

DIM, HIDDEN, TOKENS = 16, 32, 12
ACT = QuantSpec(quantizer="lsq", observer="avg_minmax", bits=4)
WEIGHT = QuantSpec(quantizer="adaround", observer="mse", bits=4, granularity=PerChannel(0))
CAG_OVERRIDES = [("*.qkv", {"act": {"quantizer": "cag", "granularity": ChannelGroups(2)}}),
                 ("*.fc1", {"act": {"quantizer": "cag", "granularity": ChannelGroups(2)}})]


class TinyBlock(nn.Module):
    """Pre-norm attention (with a quantized q·kᵀ matmul) and MLP, both residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.scores = QuantMatMul()
        self.proj = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = (self.scores(q, k.transpose(-2, -1)) / DIM**0.5).softmax(dim=-1)
        x = x + self.proj(attn @ v)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyNet(nn.Module):
    """A stem (kept float unless asked) and three blocks: the units are ``blocks.0..2``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(DIM, DIM)
        self.blocks = nn.Sequential(*(TinyBlock() for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def calibration_data(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, TOKENS, DIM, generator=g) * 2 for _ in range(n)]


def make_model(cag: bool = False, quantize_stem: bool = False, seed: int = 0,
               calibrate: bool = True) -> TinyNet:
    """A (calibrated) W4A4 TinyNet (same weights and calibration for the same ``seed``)."""
    torch.manual_seed(seed)
    model = TinyNet()
    quantize(model, ACT, WEIGHT, overrides=CAG_OVERRIDES if cag else (),
             skip=() if quantize_stem else ("stem",))
    for i, block in enumerate(model.blocks):
        block.scores.a_quantizer = build_quantizer(ACT, Role.QUERY, f"blocks.{i}.scores.a_quantizer")
        block.scores.b_quantizer = build_quantizer(ACT, Role.KEY, f"blocks.{i}.scores.b_quantizer")
    model.eval()
    if not calibrate:
        return model
    with torch.no_grad(), calibrating(model):
        for x in calibration_data():
            model(x)
    return model
