"""Every YAML under exp/ loads and validates, and the method presets encode their recipes."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ahcq.quantization.config import METHOD_PRESETS, load_qconfig

EXP = Path(__file__).resolve().parents[1] / "exp"
# exp/tables/ holds table specs and partial overlays for tools/reproduce_tables.py, checked by its tests
ALL_YAMLS = sorted(p for p in EXP.rglob("*.yaml") if "tables" not in p.relative_to(EXP).parts)


def test_exp_has_every_preset_and_the_reference_names() -> None:
    names = {p.relative_to(EXP).as_posix() for p in ALL_YAMLS}
    expected = {f"{m}/w{b}a{b}.yaml" for m in METHOD_PRESETS for b in (4, 5, 6)}
    expected |= {f"config{b}{b}.yaml" for b in (4, 5, 6)}
    assert expected <= names


@pytest.mark.parametrize("path", ALL_YAMLS, ids=[p.relative_to(EXP).as_posix() for p in ALL_YAMLS])
def test_every_exp_yaml_loads(path: Path) -> None:
    cfg = load_qconfig(path)
    if path.parent.name == "deploy":  # deployment recipes: deploy_<name>, weight and activation bits apart
        match = re.fullmatch(r"(?:\w+_)?w(\d)a(\d)", path.stem)
        assert match and cfg.method == f"deploy_{path.stem}"
        assert (cfg.w_qconfig.bit, cfg.a_qconfig.bit) == (int(match[1]), int(match[2]))
    elif path.parent != EXP:
        assert cfg.method == path.parent.name
        bits = int(path.stem[1])
        assert path.stem == f"w{bits}a{bits}"
        assert cfg.a_qconfig.bit == cfg.w_qconfig.bit == bits


def _cfg(method: str, bits: int = 4):
    return load_qconfig(EXP / method / f"w{bits}a{bits}.yaml")


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_method_recipes(bits: int) -> None:
    minmax = _cfg("minmax", bits)
    assert not minmax.recon.enabled and minmax.a_qconfig.observer == minmax.w_qconfig.observer == "minmax"
    assert minmax.a_qconfig.ch_axis == minmax.w_qconfig.ch_axis == -1
    brecq, qdrop = _cfg("brecq", bits), _cfg("qdrop", bits)
    assert brecq.recon.drop_prob == 1.0 and not brecq.recon.dropping
    assert qdrop.recon.drop_prob == 0.5 and qdrop.recon.dropping
    ptq4sam = _cfg("ptq4sam", bits)
    assert ptq4sam.ptq4sam.big and ptq4sam.ptq4sam.agq and ptq4sam.recon.dropping
    ahcptq = _cfg("ahcptq", bits)
    assert ahcptq.ahcptq.cag and ahcptq.ahcptq.hluq and ahcptq.ptq4sam.big
    saq = _cfg("saqsam", bits)
    assert saq.pcc.enabled and saq.par.enabled and saq.recon.units == "stages"
    assert saq.a_qconfig.observer == "avg_mse" and saq.recon.iters == 2000
    assert not saq.ahcptq.cag
    ahcq = _cfg("ahcqsam", bits)
    assert ahcq.acnr.enabled and ahcq.lnq.enabled and ahcq.ahcptq.hluq and ahcq.ptq4sam.agq


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_config_xx_is_the_ahcqsam_preset(bits: int) -> None:
    spelled_out = load_qconfig(EXP / f"config{bits}{bits}.yaml")
    preset = _cfg("ahcqsam", bits)
    assert dataclasses.replace(spelled_out, source="") == dataclasses.replace(preset, source="")
