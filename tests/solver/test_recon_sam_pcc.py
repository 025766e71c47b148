"""PCC on SAM's decoder attentions: the chosen clipping lands in the right quantizers and gives the reported
attention overlap when the real attention module runs, with the PCC points of the attentions before it
clipping its inputs (SAQ-SAM's sequential search; the last of its two passes sets every range)."""
from __future__ import annotations

import pytest
import torch
from test_recon_sam import calibrated, qconfig

from ahcq.quantization.api import set_mode
from ahcq.quantization.primitives import qparams_from_minmax
from ahcq.quantization.quantizers import Mode
from ahcq.quantization.transforms.pcc import iou_distance
from ahcq.solver.pcc_sam import PCC_POINTS, apply_pcc, decoder_attentions
from ahcq.solver.recon.sam import prepare_samples, sam_chain

SITE = "mask_decoder.transformer.layers.0.cross_attn_token_to_image"


@pytest.fixture(scope="module")
def pcc():
    cfg = qconfig("saqsam", iters=2)
    sam, samples = calibrated(cfg)
    report = apply_pcc(sam, samples, cfg, device="cpu")
    return cfg, sam, samples, report


def _site(sam):
    return sam.get_submodule(SITE)


def _pcc_points_on(sam):
    """Every quantizer off except the PCC points of every decoder attention, as after the last pass."""
    set_mode(sam, Mode.OFF)
    for _, attn in decoder_attentions(sam):
        for path in PCC_POINTS:
            attn.get_submodule(path).set_mode(Mode.QUANTIZE)


def _run_site(sam, cfg, samples, hook_on):
    """Run the chain on image 0 recording the input of ``hook_on`` (a module of the site)."""
    seen = []
    handle = hook_on.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    prepared, _ = prepare_samples(sam, samples[:1], cfg.par.max_prompts, cfg.seed, torch.device("cpu"), False)
    try:
        with torch.no_grad():
            sam_chain(sam, cfg, par=False)(sam, prepared[0])
    finally:
        handle.remove()
    return seen[0]


def test_every_decoder_attention_gets_four_clippings(pcc):
    cfg, _, _, report = pcc
    assert len(report) == 2 * 3 + 1
    for points in report.values():
        assert list(points) == list(PCC_POINTS)
        assert all(p["percentile"] in cfg.pcc.percentiles for p in points.values())


def test_query_input_range_is_the_reported_quantile_of_the_float_input(pcc):
    cfg, sam, samples, report = pcc
    attn = _site(sam)
    _pcc_points_on(sam)
    x = _run_site(sam, cfg, samples, attn.q_proj)
    p = report[SITE]["q_proj.input_quantizer"]["percentile"]
    lo, hi = torch.quantile(x.reshape(-1), torch.tensor([1 - p, p]))
    scale, zero_point = qparams_from_minmax(lo, hi, cfg.a_qconfig.bit, symmetric=False)
    q = attn.q_proj.input_quantizer
    assert torch.allclose(q.scale, scale, rtol=1e-6) and int(q.zero_point) == int(zero_point)


def test_the_module_with_the_chosen_ranges_reaches_the_reported_overlap(pcc):
    cfg, sam, samples, report = pcc
    attn = _site(sam)
    set_mode(sam, Mode.OFF)
    reference = _run_site(sam, cfg, samples, attn.prob_quantizer)
    _pcc_points_on(sam)
    clipped = _run_site(sam, cfg, samples, attn.prob_quantizer)
    distance = iou_distance(clipped, reference, cfg.ptq4sam.threshold)
    assert distance == pytest.approx(report[SITE]["k_quantizer"]["distance"], abs=1e-9)
    assert 0.0 <= distance < 1.0
