"""Calibration searches on real activations of the trained testbed (ckpt/tiny_sam.pth on generated demo
images): HLUQ against a per-tensor uniform grid with an MSE range search, measured after the consumer (the
MLP's second linear); CAG between per-tensor MSE and per-channel MSE grids; LNQ against a float64 search
over its curvatures and a fine grid of clips.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tool_loader import load_tool
from torch import nn

from ahcq.analysis import load_sam_checkpoint, load_samples, sam_forward
from ahcq.models.sam_quantize import quantize_sam
from ahcq.quantization import api
from ahcq.quantization.config import parse_qconfig
from ahcq.quantization.primitives import fake_quant_lnq
from ahcq.quantization.quantizers import LNQuantizer, Mode, Quantizer, Role, make_quantizer
from ahcq.quantization.quantizers.lnq import DEFAULT_ALPHAS

REPO = Path(__file__).resolve().parents[2]
CKPT = REPO / "ckpt" / "tiny_sam.pth"
CAG_SITES = ("attn.qkv", "mlp.lin1", "q_proj", "k_proj", "v_proj")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    if not CKPT.is_file():
        pytest.skip("ckpt/tiny_sam.pth is not committed (tools/train_tiny_sam.py)")
    root = tmp_path_factory.mktemp("demo")
    load_tool("make_demo_data").generate(root, seed=0, num_train=0, num_val=3, size=128)
    return root


@pytest.fixture(scope="module")
def activations(demo) -> dict[str, tuple[torch.Tensor, nn.Linear]]:
    """``{layer: (its float inputs [rows, C], the layer)}`` for every MLP lin2 and CAG site, from three
    demo images with their ground-truth boxes as prompts."""
    sam = load_sam_checkpoint(CKPT)
    seen: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in sam.named_modules()
              if isinstance(m, nn.Linear) and (n.endswith("lin2") or n.endswith(CAG_SITES))}
    for name, layer in layers.items():
        def keep(_m: nn.Module, args: tuple, name: str = name) -> None:
            seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

        layer.register_forward_pre_hook(keep)
    forward = sam_forward(sam, 16)
    with torch.no_grad():
        for sample in load_samples(demo, "val", 3, 0):
            forward(sample)
    return {n: (torch.cat(v), layers[n]) for n, v in seen.items()}


@pytest.fixture(scope="module")
def probabilities(demo) -> dict[str, torch.Tensor]:
    """``{attention: its float softmax output}`` for every attention of the testbed, on one demo image."""
    sam = load_sam_checkpoint(CKPT)
    qconfig = parse_qconfig({"a_qconfig": {"bit": 4}, "w_qconfig": {"bit": 4}, "lnq": {"enabled": True}})
    quantize_sam(sam, qconfig, quant_encoder=True)
    seen: dict[str, torch.Tensor] = {}
    for name, q in api.iter_quantizers(sam):
        if isinstance(q, LNQuantizer):
            q.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0].detach()))
    with torch.no_grad():
        sam_forward(sam, 8)(load_samples(demo, "val", 1, 0)[0])  # every quantizer is off before calibration
    return seen


def calibrated(q: Quantizer, x: torch.Tensor, **ctx) -> Quantizer:
    q.set_mode(Mode.CALIBRATE)
    q(x, **ctx)
    q.set_mode(Mode.QUANTIZE)
    return q


def consumer_error(q: Quantizer, x: torch.Tensor, layer: nn.Linear) -> float:
    with torch.no_grad():
        return float(((layer(q(x)) - layer(x)).double() ** 2).mean())


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_hluq_is_no_worse_than_a_uniform_mse_grid_after_the_next_layer(activations, bits):
    """At 4 bits HLUQ (our search: clipped tops, the uniform fallback) never has a larger consumer error
    than the per-tensor uniform MSE grid. From 5 bits, where the log region can only coarsen some layers'
    grids, HLUQ falls back to a uniform grid there; its code 0 being its anchor, it carries one with one
    level fewer (or its first step rounded in the log domain), so it stays within ``((L-1)/(L-2))**2``."""
    levels = 2**bits
    bound = 1.0 if bits == 4 else ((levels - 1) / (levels - 2)) ** 2
    lin2 = {n: v for n, v in activations.items() if n.endswith("lin2")}
    assert len(lin2) == 8  # six encoder blocks, two decoder layers
    for name, (x, layer) in lin2.items():
        uniform = calibrated(make_quantizer("fixed", Role.INPUT, bits, observer="mse"), x)
        hluq = calibrated(make_quantizer("hluq", Role.INPUT, bits), x, next_layer=layer)
        ratio = consumer_error(hluq, x, layer) / consumer_error(uniform, x, layer)
        assert ratio <= bound, f"{name} A{bits}: HLUQ / uniform consumer error {ratio:.4f} > {bound:.4f}"


@pytest.mark.parametrize("bits", [4, 6])
def test_cag_lies_between_per_tensor_and_per_channel_mse(activations, bits):
    """CAG with 4 searched groups: never worse than one per-tensor MSE grid, never better than one MSE
    grid per channel, and never worse than the envelope rule."""
    sites = {n: v for n, v in activations.items() if n.endswith(CAG_SITES)}
    assert len(sites) == 6 * 2 + 2 * (3 * 3 + 1) + 3  # encoder qkv, lin1; decoder q/k/v, lin1; final q/k/v
    for name, (x, _) in sites.items():
        errors = {}
        for kind, q in {
            "tensor": make_quantizer("fixed", Role.INPUT, bits, observer="mse"),
            "channel": make_quantizer("fixed", Role.INPUT, bits, observer="mse", ch_axis=-1),
            "cag": make_quantizer("cag", Role.INPUT, bits, groups=4),
            "envelope": make_quantizer("cag", Role.INPUT, bits, groups=4, group_range="envelope"),
        }.items():
            calibrated(q, x)
            if kind in ("cag", "envelope"):
                q.regroup(4)
            errors[kind] = float(((q(x).detach() - x).double() ** 2).mean())
        assert errors["channel"] <= errors["cag"] <= errors["tensor"], f"{name} A{bits}: {errors}"
        assert errors["cag"] <= errors["envelope"] * 1.1, f"{name} A{bits}: {errors}"


@pytest.mark.parametrize("bits", [4, 6])
def test_lnq_is_close_to_a_float64_search_of_curvature_and_clip(probabilities, bits):
    """LNQ calibrated alone (no value tensor: its error is ``mean |x_hat - x|**2.4``, the references') has
    a squared error within 10 % of a float64 search over its curvatures and 50 clips in (0, max]."""
    assert len(probabilities) == 6 + 2 * 3 + 1
    for name, x in probabilities.items():
        q = calibrated(make_quantizer("lnq", Role.ATTN_PROB, bits), x)
        mine = float(((q(x) - x).double() ** 2).mean())
        top = float(x.max())
        best = min(float(((fake_quant_lnq(x, torch.tensor(top * k / 100), torch.tensor(alpha), bits).double()
                           - x.double()) ** 2).mean())
                   for alpha in DEFAULT_ALPHAS for k in range(2, 101, 2))
        assert mine <= 1.1 * best, f"{name} A{bits}: LNQ {mine:.4g} vs float64 search {best:.4g}"
