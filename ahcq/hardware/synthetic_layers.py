"""Quantized SAM-shaped Linear layers exported through ``ahcq.quantization.export``.

Two layers the accelerator is built for, calibrated on random data (no checkpoint needed):
an MLP second linear (lin2, 4·C → C) with an HLUQ input on GELU activations and no output quantizer
(it feeds the residual sum), and a mask-decoder attention q projection (256 → 256) with a CAG input and an
8-bit per-tensor output quantizer (the query quantizer of the attention matmul).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ahcq.quantization.export import export_linear
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.quantizers import CAGQuantizer, FixedQuantizer, HLUQuantizer, LSQQuantizer, Mode, Role


def _calibrate(quantizers, run) -> None:
    for q in quantizers:
        q.set_mode(Mode.CALIBRATE)
    run()
    for q in quantizers:
        q.set_mode(Mode.QUANTIZE)


def export_mlp_lin2(path: Path, bits: int = 4, cin: int = 3072, cout: int = 768, n_tok: int = 16,
                    seed: int = 0, *,
                    level_splits: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)) -> dict[str, np.ndarray]:
    """HLUQ-input lin2 of an encoder MLP (SAM-B shape by default) applied to GELU activations.

    level_splits=(1/2,) forces n_log = 2^(bits-1), the configuration where the code's MSB picks the lane.
    """
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cin, cout)
    with torch.no_grad():
        lin.weight.normal_(0.0, cin**-0.5, generator=gen)
        lin.bias.normal_(0.0, 0.02, generator=gen)
    xq = HLUQuantizer(Role.INPUT, bits, range_splits=(0.1, 0.3, 0.5), level_splits=level_splits, clips=(1.0,),
                      uniform_candidate=False, name="mlp.lin2.input_quantizer")
    wq = LSQQuantizer(Role.WEIGHT, bits, ch_axis=0, observer="minmax", name="mlp.lin2.weight_quantizer")
    layer = QuantLinear.from_float(lin, xq, wq)
    x = nn.functional.gelu(torch.randn(n_tok, cin, generator=gen) * 1.5)
    _calibrate((xq, wq), lambda: layer(x))
    return export_linear(layer, x, path)


def export_decoder_q_proj(path: Path, bits: int = 4, dim: int = 256, n_tok: int = 16, groups: int = 4,
                          seed: int = 1) -> dict[str, np.ndarray]:
    """CAG-input q projection of a mask-decoder attention, followed by a per-tensor 8-bit query quantizer."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(dim, dim)
    with torch.no_grad():
        lin.weight.normal_(0.0, dim**-0.5, generator=gen)
        lin.bias.normal_(0.0, 0.02, generator=gen)
    xq = CAGQuantizer(Role.INPUT, bits, groups=groups, name="decoder.q_proj.input_quantizer")
    wq = LSQQuantizer(Role.WEIGHT, bits, ch_axis=0, observer="minmax", name="decoder.q_proj.weight_quantizer")
    layer = QuantLinear.from_float(lin, xq, wq)
    channel_spread = torch.exp(torch.randn(dim, generator=gen))
    x = torch.randn(n_tok, dim, generator=gen) * channel_spread + torch.randn(dim, generator=gen)
    _calibrate((xq, wq), lambda: layer(x))
    xq.regroup(groups)
    oq = FixedQuantizer(Role.QUERY, 8, observer="minmax", name="decoder.q_proj.output_quantizer")
    _calibrate((oq,), lambda: oq(layer(x)))
    return export_linear(layer, x, path, next_quantizer=oq)
