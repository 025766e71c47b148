"""Float fallback and mixed precision: the allocation is the exact optimum of its integer program (checked by
enumerating every assignment), the config turns it into per-site widths that quantize_sam builds and the
integer export carries, and bad inputs are refused by name."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sensitivity_helpers import write_sensitivity
from torch import nn

from ahcq.analysis.sensitivity import quantizer_sites
from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization import api
from ahcq.quantization.config import ConfigError, load_qconfig, parse_qconfig
from ahcq.quantization.export import export_linear
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.mixed import Budget, SiteKind, SiteSensitivity, allocate
from ahcq.quantization.quantizers import AdaRoundQuantizer

W4A4 = {"a_qconfig": {"bit": 4}, "w_qconfig": {"bit": 4}}


def _sites(rng: np.random.Generator, n: int = 6, bits: tuple[int, ...] = (4, 6, 8)) -> list[SiteSensitivity]:
    out = []
    for i in range(n):
        scale = float(rng.uniform(0.1, 10))
        out.append(SiteSensitivity(f"s{i}", SiteKind.LAYER, float(rng.integers(1, 20) * 100),
                                   {b: scale * 2.0 ** -b * float(rng.uniform(0.5, 1.5)) for b in bits},
                                   {b: float(rng.uniform(0, 1)) for b in bits}))
    return out


@pytest.mark.parametrize("budget", list(Budget))
def test_allocation_is_the_optimum_of_every_assignment(rng, budget):
    sites, bits = _sites(rng), (4, 6, 8)
    total = sum(s.macs for s in sites)
    for budget_bits in (4.0, 4.7, 5.5, 6.9, 8.0):
        alloc = allocate(sites, 4, bits=bits, budget=budget, budget_bits=budget_bits)
        best = math.inf
        for widths in itertools.product(bits, repeat=len(sites)):
            power = 1 if budget is Budget.AVERAGE_BITS else 2
            spent = sum(s.macs * w**power for s, w in zip(sites, widths)) / total
            if spent <= budget_bits**power + 1e-9:
                best = min(best, sum(s.alone_error[w] for s, w in zip(sites, widths)))
        assert alloc.error == pytest.approx(best, rel=1e-9)
        spent_bits = alloc.average_bits if budget is Budget.AVERAGE_BITS else alloc.bops_bits
        assert spent_bits <= budget_bits + 1e-9


def test_float_fallback_keeps_the_sites_whose_removal_helps_most(rng):
    sites = _sites(rng)
    alloc = allocate(sites, 4, float_sites=2)
    floated = {s for s, _, b in alloc.sites if b is None}
    ranked = sorted(sites, key=lambda s: s.removed_error[4])
    assert floated == {ranked[0].site, ranked[1].site}
    assert all(b == 4 for s, _, b in alloc.sites if s not in floated)
    macs = {s.site: s.macs for s in sites}
    expected = sum(macs[s] * (32 if b is None else b) for s, _, b in alloc.sites) / sum(macs.values())
    assert alloc.average_bits == pytest.approx(expected)


def test_an_infeasible_budget_names_the_narrowest_allocation(rng):
    with pytest.raises(ValueError, match="narrowest allocation needs 4.000"):
        allocate(_sites(rng), 4, bits=(4, 6, 8), budget_bits=3.5)
    with pytest.raises(ValueError, match=r"bits \[5\] were not measured"):
        allocate(_sites(rng), 4, bits=(4, 5))
    with pytest.raises(ValueError, match="float_sites 7"):
        allocate(_sites(rng), 4, float_sites=7)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_tiny_sam(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                          global_attn_indexes=(1,), out_chans=32, decoder_depth=1, decoder_heads=2,
                          decoder_mlp_dim=64, iou_head_hidden_dim=32)


@pytest.fixture
def sensitivity(tmp_path) -> Path:
    sam = quantize_sam(_tiny(), parse_qconfig(W4A4))
    return write_sensitivity(sam, tmp_path / "sens" / "results.json")


def test_the_allocation_reaches_every_site_and_the_integer_export(sensitivity, tmp_path):
    (tmp_path / "c.yaml").write_text(
        "a_qconfig: {bit: 4}\nw_qconfig: {bit: 4}\n"
        "mixed: {sensitivity: sens/results.json, float_sites: 2, bits: [4, 6, 8], budget_bits: 6.0}\n")
    qconfig = load_qconfig(tmp_path / "c.yaml")  # the path is relative to the YAML that names it
    allocation = qconfig.mixed.allocation
    assert {w for _, _, w in allocation.sites} >= {None, 4, 8}
    assert qconfig.derived()["mixed_allocation"]["sites"] == {s: w for s, _, w in allocation.sites}
    sam = quantize_sam(_tiny(), qconfig)
    sites = {s.name: s for s in quantizer_sites(sam)}
    modules = dict(sam.named_modules())
    for name, kind, width in allocation.sites:
        if width is None:
            assert name not in sites
            assert type(modules[name]) is nn.Linear or kind is SiteKind.ATTENTION
            continue
        assert sites[name].bits == [width], name
    name = next(n for n, k, w in allocation.sites if k == "layer" and w == 8)
    layer = modules[name]
    assert isinstance(layer, QuantLinear)
    x = torch.randn(16, layer.in_features)
    with api.calibrating(layer):
        layer(x)
    api.set_mode(layer, api.Mode.QUANTIZE)
    if isinstance(layer.weight_quantizer, AdaRoundQuantizer):
        layer.weight_quantizer.harden()
    data = export_linear(layer, x, tmp_path / "layer.npz")
    assert int(data["x_bits"]) == 8 and int(data["w_bits"]) == 8


def test_bad_mixed_configs_are_refused_by_name(sensitivity, tmp_path):
    with pytest.raises(ConfigError, match="mixed.sensitivity: has no effect"):
        parse_qconfig({**W4A4, "mixed": {"sensitivity": str(sensitivity)}})
    with pytest.raises(ConfigError, match="mixed.sensitivity: missing"):
        parse_qconfig({**W4A4, "mixed": {"float_sites": 1}})
    with pytest.raises(ConfigError, match="no such sensitivity file"):
        parse_qconfig({**W4A4, "mixed": {"sensitivity": str(tmp_path / "none.json"), "float_sites": 1}})
    (tmp_path / "bad.json").write_text("{\"sites\": 3}")
    with pytest.raises(ConfigError, match="not a sensitivity file"):
        parse_qconfig({**W4A4, "mixed": {"sensitivity": str(tmp_path / "bad.json"), "float_sites": 1}})
    qconfig = parse_qconfig({**W4A4, "mixed": {"sensitivity": str(sensitivity), "float_sites": 1}})
    other = build_tiny_sam(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, window_size=4,
                           global_attn_indexes=(), out_chans=32, decoder_depth=1, decoder_heads=2,
                           decoder_mlp_dim=64, iou_head_hidden_dim=32)
    with pytest.raises(ConfigError, match="sites not in this model.*image_encoder.blocks.1"):
        quantize_sam(other, qconfig)
    assert next(api.iter_quantizers(other), None) is None  # refused before anything changed
