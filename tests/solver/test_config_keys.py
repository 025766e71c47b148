"""Every key of the quantization-config schema takes effect, is refused, or warns by name.

For each key the registry below gives two configs that differ in that key only (plus what the key needs to
matter, e.g. LNQ on for ``lnq.alphas``) and a probe that runs real code on a tiny SAM: the quantizers
``quantize_sam`` builds, the reconstruction settings and unit chain, what ``calibrate`` does (BIG, ACNR,
weight grouping: its report and the model it leaves), the PCC search, the pipeline's calibration draw, the
video clip plan. The probe must see a difference. A key added to the schema without an entry here fails
``test_every_schema_key_has_an_entry``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tempfile
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from sensitivity_helpers import write_sensitivity
from test_calibration import _samples

from ahcq.models.half_weights import prepare_weights
from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_roles import big_sites
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization import api
from ahcq.quantization.config import ConfigError, ConfigWarning, parse_qconfig, schema_keys
from ahcq.quantization.dialects import AHCQSAM_KEYS
from ahcq.solver.calibration import calibrate
from ahcq.solver.image_ptq import sam_ptq
from ahcq.solver.pipeline import calibration_choice
from ahcq.solver.ptq import run_ptq
from ahcq.solver.recon import ReconSettings
from ahcq.solver.recon.sam import box_cap, sam_chain
from ahcq.solver.test_quant_video import VideoRunOptions, _clips

ACT = {"bit": 4, "quantizer": "lsq", "observer": "avg_minmax", "symmetric": False, "ch_axis": -1}
WEIGHT = {"bit": 4, "quantizer": "adaround", "observer": "mse", "symmetric": False, "ch_axis": 0}
BASE: dict[str, Any] = {
    "seed": 0, "calibrate": 2, "a_qconfig": ACT, "w_qconfig": WEIGHT,
    "recon": {"iters": 2, "iters_CAMS": 2},
    "ptq4sam": {"BIG": True, "AGQ": True},
    "ahcptq": {"cag": True, "hluq": True},
    "pcc": {"enabled": True},
}
ACNR = {"acnr": {"enabled": True, "min_cond": 1.0, "iters": 3, "calib": 1}}


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` deep-merged over ``base``; a ``None`` value removes that key."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict):
            out[key] = merged(out[key] if isinstance(out.get(key), dict) else {}, value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _overlay(first: dict, second: dict) -> dict:
    """Two overlays combined, their ``None`` removals kept for the base they are applied to."""
    out = copy.deepcopy(first)
    for key, value in second.items():
        out[key] = _overlay(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tiny_sam():
    torch.manual_seed(0)
    return build_tiny_sam(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                          global_attn_indexes=(1,), out_chans=32, decoder_depth=1, decoder_heads=2,
                          decoder_mlp_dim=64, iou_head_hidden_dim=32)


def _bimodal_keys(sam) -> None:
    """Token->image keys on +-4 per channel: the KDE sees two humps whatever the random weights."""
    for _, attn in big_sites(sam):
        signs = torch.where(torch.arange(attn.k_proj.out_features) % 3 == 0, -1.0, 1.0)
        with torch.no_grad():
            attn.k_proj.weight.mul_(0.05)
            attn.k_proj.bias.copy_(4.0 * signs)


def _forward(sam):
    from ahcq.solver.image_ptq import sam_forward
    return lambda s: sam_forward(sam, s, box_chunk=2, max_boxes=4)


def _quantizer_record(q: api.Quantizer) -> dict[str, Any]:
    attrs = ("bits", "symmetric", "ch_axis", "target_groups", "seed", "group_range", "candidates", "alphas",
             "taus", "error_p")
    record = {a: repr(getattr(q, a)) for a in attrs if hasattr(q, a)}
    observer = getattr(q, "observer", None)
    record.update(kind=type(q).__name__, role=q.role.name,
                  observer=None if observer is None else f"{type(observer).__name__}:{vars(observer)}")
    return record


def built(cfg) -> Any:
    sam = tiny_sam()
    quantize_sam(sam, cfg, quant_encoder=True)
    twins = {n: m.rel_pos_float_q for n, m in sam.named_modules() if hasattr(m, "rel_pos_float_q")}
    return {n: _quantizer_record(q) for n, q in api.iter_quantizers(sam)}, twins


def settings(cfg) -> Any:
    sam = tiny_sam()
    quantize_sam(sam, cfg, quant_encoder=True)
    chain = sam_chain(sam, cfg)
    return (dataclasses.asdict(ReconSettings.from_qconfig(cfg)), [u.label for u in chain.units],
            box_cap(cfg, chain.par))


def _state_hash(sam) -> str:
    digest = hashlib.sha256()
    for name, t in sam.state_dict().items():
        digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def calibration(cfg) -> Any:
    sam = tiny_sam()
    samples = _samples(sam, 2)
    quantize_sam(sam, cfg, quant_encoder=True)
    _bimodal_keys(sam)
    report = calibrate(sam, samples, _forward(sam), cfg)
    return json.dumps(dataclasses.asdict(report), sort_keys=True, default=repr), _state_hash(sam)


def _recipe(cfg) -> tuple[Any, dict[str, Any]]:
    """The SAM PTQ recipe (``run_ptq``) on a tiny SAM: the model it leaves and its report."""
    sam = tiny_sam()
    ptq = sam_ptq(sam, quant_encoder=True, box_chunk=2, max_boxes=4, device=torch.device("cpu"))
    return sam, run_ptq(ptq, _samples(sam, 2), cfg)


def pcc(cfg) -> Any:
    no_recon = dataclasses.replace(cfg, recon=dataclasses.replace(cfg.recon, enabled=False))
    return json.dumps(_recipe(no_recon)[1]["pcc"], sort_keys=True)


def reconstruction(cfg) -> Any:
    sam, report = _recipe(cfg)
    return report["reconstruction"]["ran"], _state_hash(sam)


def plan(cfg) -> Any:
    return calibration_choice(cfg, 50)


def clips(cfg) -> Any:
    pool = [f"video{i}" for i in range(10)]
    opts = VideoRunOptions(config="", q_config=None, out=None)
    chosen = _clips({"calibration": {}}, opts, cfg, pool, cfg.seed)
    return [(c.sample, c.frames) for c in chosen]


def weights(cfg) -> Any:
    sam = tiny_sam()
    prepare_weights(sam, cfg)
    return _state_hash(sam)


def label(cfg) -> Any:
    return cfg.to_dict().get("method")


REFUSED, WARNED = "refused", "warned"
Entry = tuple[dict, dict, Callable[[Any], Any] | str]

NO_CALIB = {"ptq4sam": {"BIG": False}, "pcc": {"enabled": False}}
LNQ_ON = {"lnq": {"enabled": True}}
STAGES = {"recon": {"units": "stages"}, "par": {"enabled": True}}
ACT_CAG = {"a_qconfig": {"quantizer": "cag"}, "ahcptq": {"cag": False}}
UNIFORM_QK = {"ahcptq": {"cag": False}}  # PCC re-chooses per-tensor uniform ranges only


def _spec_entries() -> dict[str, Entry]:
    """The six recipe slots x their six keys."""
    entries: dict[str, Entry] = {}
    for slot in ("a", "w", "encoder_a", "encoder_w", "decoder_a", "decoder_w"):
        weight = slot.endswith("w")
        full = WEIGHT if weight else ACT
        key = f"{slot}_qconfig"
        if slot.startswith("encoder"):
            base = {"a_qconfig" if not weight else "w_qconfig": None, key: full}
        elif slot.startswith("decoder"):
            base = {key: full}
        else:
            base = {}
        changes = {
            "bit": 6, "symmetric": True,
            "quantizer": "fixed", "observer": "minmax" if not weight else "avg_minmax",
            "ch_axis": 2 if not weight else -1,
        }
        for field, value in changes.items():
            entries[f"{key}.{field}"] = (base, {key: {field: value}}, built)
        groups_base = merged(base, {key: {"quantizer": "cag"}, "ahcptq": {"cag": False}})
        entries[f"{key}.groups"] = (groups_base, {key: {"groups": 2}}, built)
    return entries


@cache
def _sensitivity() -> str:
    """A synthetic sensitivity file of the tiny SAM quantized with ``BASE`` (the ``mixed`` keys need one)."""
    path = Path(tempfile.mkdtemp(prefix="ahcq-keys-")) / "sensitivity.json"
    return str(write_sensitivity(quantize_sam(tiny_sam(), parse_qconfig(BASE), quant_encoder=True), path))


MIXED = {"mixed": {"sensitivity": _sensitivity(), "bits": [4, 8], "budget_bits": 5.0}}

ENTRIES: dict[str, Entry] = {
    **_spec_entries(),
    "method": ({}, {"method": "saqsam"}, label),
    "seed": ({}, {"seed": 3}, plan),
    "calibrate": ({}, {"calibrate": 5}, plan),
    "float16_weights": ({}, {"float16_weights": True}, weights),
    "calibrate.frame": ({"calibrate": {"sample": 2, "frame": 1}}, {"calibrate": {"sample": 2, "frame": 3}},
                        clips),
    "recon.enabled": (NO_CALIB, {"recon": {"enabled": False}}, reconstruction),
    "recon.batch_size": ({}, {"recon": {"batch_size": 2}}, settings),
    "recon.scale_lr": ({}, {"recon": {"scale_lr": 1e-3}}, settings),
    "recon.weight_lr": ({}, {"recon": {"weight_lr": 1e-2}}, settings),
    "recon.warm_up": ({}, {"recon": {"warm_up": 0.5}}, settings),
    "recon.weight": ({}, {"recon": {"weight": 0.1}}, settings),
    "recon.iters": ({}, {"recon": {"iters": 3}}, settings),
    "recon.iters_CAMS": (STAGES, {"recon": {"iters_CAMS": 5}}, settings),
    "recon.b_range": ({}, {"recon": {"b_range": [10, 1]}}, settings),
    "recon.round_mode": ({}, {"recon": {"round_mode": "nearest"}}, REFUSED),
    "recon.drop_prob": ({}, {"recon": {"drop_prob": 0.8}}, settings),
    "recon.units": ({}, {"recon": {"units": "layers"}}, settings),
    "recon.early_stop.patience": ({"recon": {"early_stop": {}}}, {"recon": {"early_stop": {"patience": 9}}},
                                  settings),
    "recon.early_stop.min_delta": ({"recon": {"early_stop": {}}},
                                   {"recon": {"early_stop": {"min_delta": 0.1}}}, settings),
    "recon.qdrop": ({}, {"recon": {"qdrop": False}}, settings),
    "recon.cache_dtype": ({}, {"recon": {"cache_dtype": "float16"}}, settings),
    "recon.act_quant": ({}, {"recon": {"act_quant": False}}, settings),
    "recon.loss_axis": ({}, {"recon": {"loss_axis": "axis1"}}, settings),
    "recon.keep_gpu": ({}, {"recon": {"keep_gpu": False}}, WARNED),
    "ptq4sam.BIG": ({}, {"ptq4sam": {"BIG": False}}, calibration),
    "ptq4sam.AGQ": ({}, {"ptq4sam": {"AGQ": False}}, built),
    "ptq4sam.global_num": ({}, {"ptq4sam": {"global_num": 8}}, calibration),
    "ptq4sam.peak_distance": ({}, {"ptq4sam": {"peak_distance": 200}}, calibration),
    "ptq4sam.peak_height": ({}, {"ptq4sam": {"peak_height": 0.5}}, calibration),
    "ptq4sam.threshold": (UNIFORM_QK, {"ptq4sam": {"threshold": 0.1}}, pcc),
    "ptq4sam.big_test": ({}, {"ptq4sam": {"big_test": "first_box"}}, calibration),
    "ahcptq.cag": ({}, {"ahcptq": {"cag": False}}, built),
    "ahcptq.group": ({}, {"ahcptq": {"group": 2}}, built),
    "ahcptq.hluq": ({}, {"ahcptq": {"hluq": False}}, built),
    "acnr.enabled": (ACNR, {"acnr": {"enabled": False}}, calibration),
    "acnr.iters": (ACNR, {"acnr": {"iters": 9}}, calibration),
    "acnr.lam": (ACNR, {"acnr": {"lam": 0.1}}, calibration),
    "acnr.beta": (ACNR, {"acnr": {"beta": 0.5}}, calibration),
    "acnr.energy": (ACNR, {"acnr": {"energy": 0.5}}, calibration),
    "acnr.min_cond": (ACNR, {"acnr": {"min_cond": 1e9}}, calibration),
    "acnr.target": (ACNR, {"acnr": {"target": "midrange"}}, calibration),
    "acnr.calib": (ACNR, {"acnr": {"calib": 2}}, calibration),
    "acnr.error": (ACNR, {"acnr": {"error": "local"}}, calibration),
    "lnq.enabled": ({}, LNQ_ON, built),
    "lnq.alphas": (LNQ_ON, {"lnq": {"alphas": [1.0, 2.0]}}, built),
    "agq.taus": ({}, {"agq": {"taus": [1]}}, built),
    "agq.error_p": ({}, {"agq": {"error_p": 2.0}}, built),
    "lnq.error_p": (LNQ_ON, {"lnq": {"error_p": 2.0}}, built),
    "pcc.enabled": (UNIFORM_QK, {"pcc": {"enabled": False}}, pcc),
    "pcc.threshold": (UNIFORM_QK, {"pcc": {"threshold": 0.1}}, pcc),
    "pcc.percentiles": (UNIFORM_QK, {"pcc": {"percentiles": [0.9, 1.0]}}, pcc),
    "pcc.calib": (UNIFORM_QK, {"pcc": {"calib": 2}}, pcc),
    "pcc.passes": (UNIFORM_QK, {"pcc": {"passes": 1}}, pcc),
    "par.enabled": ({"recon": {"units": "stages"}}, {"par": {"enabled": True}}, settings),
    "par.alpha": (STAGES, {"par": {"alpha": 0.5}}, settings),
    "par.beta": (STAGES, {"par": {"beta": 0.5}}, settings),
    "par.query_weight": (STAGES, {"par": {"query_weight": 1.0}}, settings),
    "par.max_prompts": (STAGES, {"par": {"max_prompts": 3}}, settings),
    "hluq.range_splits": ({}, {"hluq": {"range_splits": [0.2]}}, built),
    "hluq.level_splits": ({}, {"hluq": {"level_splits": [0.25]}}, built),
    "hluq.clips": ({}, {"hluq": {"clips": [1.0, 0.8]}}, built),
    "hluq.uniform_candidate": ({}, {"hluq": {"uniform_candidate": True}}, built),
    "cag.groups": (ACT_CAG, {"cag": {"groups": 2}}, built),
    "cag.group_range": ({}, {"cag": {"group_range": "mean"}}, built),
    "cag.regroup_fractions": ({}, {"cag": {"regroup_fractions": [0.5]}}, settings),
    "cag.apply_to_weights": ({}, {"cag": {"apply_to_weights": True}}, calibration),
    "cag.weight_groups": ({"cag": {"apply_to_weights": True}}, {"cag": {"weight_groups": 2}}, calibration),
    "cag.operands": ({}, {"cag": {"operands": True}}, built),
    "attention.rel_pos_float_q": ({}, {"attention": {"rel_pos_float_q": True}}, built),
    "mixed.sensitivity": ({}, {"mixed": {"sensitivity": _sensitivity()}}, REFUSED),
    "mixed.float_sites": ({"mixed": {"sensitivity": _sensitivity(), "float_sites": 1}},
                          {"mixed": {"float_sites": 3}}, built),
    "mixed.bits": ({"mixed": {"sensitivity": _sensitivity(), "float_sites": 1, "budget_bits": 6.0}},
                   {"mixed": {"bits": [4, 8]}}, built),
    "mixed.budget": (MIXED, {"mixed": {"budget": "bops"}}, built),
    "mixed.budget_bits": (MIXED, {"mixed": {"budget_bits": 7.0}}, built),
    "overrides": ({}, {"overrides": [{"pattern": "mask_decoder.*", "float": True}]}, built),
    **{f"ahcqsam.{k}": (_overlay(ACNR, {section: {field: None}, "ahcqsam": {k: first}}),
                        {"ahcqsam": {k: second}}, probe)
       for k, section, field, first, second, probe in (
           ("acnr", "acnr", "enabled", False, True, calibration), ("k", "acnr", "iters", 3, 9, calibration),
           ("cag", "ahcptq", "cag", True, False, built), ("group", "ahcptq", "group", 4, 2, built),
           ("hluq", "ahcptq", "hluq", True, False, built), ("lnq", "lnq", "enabled", False, True, built))},
}


@cache
def _probe(probe: Callable[[Any], Any], text: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return probe(parse_qconfig(json.loads(text)))


def _config(overlay: dict) -> str:
    return json.dumps(merged(BASE, overlay), sort_keys=True)


def test_every_schema_key_has_an_entry() -> None:
    keys = set(schema_keys()) | {"calibrate.frame", "recon.keep_gpu"} | {f"ahcqsam.{k}" for k in AHCQSAM_KEYS}
    assert set(ENTRIES) == keys


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_key_changes_what_runs_or_is_refused_or_warns(key: str) -> None:
    base, change, probe = ENTRIES[key]
    first, second = _config(base), _config(merged(base, change))
    assert first != second
    if probe == REFUSED:
        with pytest.raises(ConfigError, match=key.split(".")[-1]):
            parse_qconfig(json.loads(second))
        return
    if probe == WARNED:
        with pytest.warns(ConfigWarning, match=key):
            parse_qconfig(json.loads(second))
        return
    assert _probe(probe, first) != _probe(probe, second), f"{key}: no effect on {probe.__name__}"
