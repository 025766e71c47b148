"""The reference repositories' own YAMLs (fixtures, byte for byte) load and mean what their code reads.

Each expectation below is written from the reference code (AHCQ-SAM ``sam/`` and ``sam2/`` test_quant.py,
SAQ-SAM ``test_quant_SAQ_m.py`` defaults, PTQ4SAM's ``hasattr(q_config, 'recon')``), not from our loader.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from ahcq.quantization.config import ConfigError, ConfigWarning, load_qconfig, parse_qconfig

FIXTURES = Path(__file__).parent / "fixtures"


def _load(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_qconfig(FIXTURES / name)


@pytest.mark.parametrize("bits", [44, 55, 66])
@pytest.mark.parametrize("model", ["sam", "sam2"])
def test_ahcqsam_configs_mean_what_the_ahcqsam_code_reads(model: str, bits: int) -> None:
    raw = yaml.safe_load((FIXTURES / f"ahcqsam_{model}_config{bits}.yaml").read_text())
    cfg = _load(f"ahcqsam_{model}_config{bits}.yaml")
    section = raw["ahcqsam"]
    assert cfg.method == "ahcqsam"
    assert cfg.acnr.enabled is section["acnr"] and cfg.acnr.iters == section["k"]
    assert cfg.acnr.iters == (20 if bits == 66 else 200)
    assert (cfg.ahcptq.cag, cfg.ahcptq.group, cfg.ahcptq.hluq) == (
        section["cag"], section["group"], section["hluq"])
    assert cfg.cag.groups == section["group"] and cfg.lnq.enabled is section["lnq"]
    assert cfg.a_qconfig.bit == cfg.w_qconfig.bit == bits // 10
    assert cfg.recon.enabled and cfg.recon.iters == 20000 and cfg.recon.drop_prob == 0.5
    assert cfg.ptq4sam.big is raw["ptq4sam"]["BIG"] and cfg.ptq4sam.agq is raw["ptq4sam"]["AGQ"]
    # the ACNR the code runs: accumulated error, beta 0.001 on an energy summed twice, 80 % energy, kappa 100
    assert (cfg.acnr.error, cfg.acnr.beta, cfg.acnr.lam, cfg.acnr.energy, cfg.acnr.min_cond) == (
        "accumulated", 0.002, 0.003, 0.8, 100.0)
    if model == "sam":
        assert cfg.calibrate == 32 and cfg.calibrate_frames is None
        assert cfg.recon.units == "layers"  # whole ViT blocks and whole two-way layers
    else:
        assert (cfg.calibrate, cfg.calibrate_frames) == (8, 4)  # {sample: 8 videos, frame: 4 per video}
        assert cfg.recon.units == "blocks"  # the sam2 code reconstructs sub-blocks


def test_ahcqsam_round_trips_and_refuses_contradictions(tmp_path: Path) -> None:
    cfg = _load("ahcqsam_sam2_config44.yaml")
    assert parse_qconfig(cfg.to_dict()) == cfg.__class__(**{**cfg.__dict__, "source": "<dict>"})
    text = (FIXTURES / "ahcqsam_sam_config44.yaml").read_text() + "\nacnr:\n    iters: 7\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"ahcqsam\.k: 200 contradicts acnr\.iters = 7"):
        load_qconfig(path)
    path.write_text(text.replace("    k: 200\n", "    k: 200\n    colour: red\n"))
    with pytest.raises(ConfigError, match=r"ahcqsam\.colour: unknown key"):
        load_qconfig(path)


def test_keep_gpu_is_accepted_with_a_warning_that_names_it() -> None:
    with pytest.warns(ConfigWarning, match=r"recon\.keep_gpu .* has no effect"):
        load_qconfig(FIXTURES / "ahcqsam_sam_config44.yaml")


def test_ptq4sam_config_without_recon_means_no_reconstruction() -> None:
    cfg = _load("ptq4sam_config66_none.yaml")
    assert cfg.method == "ptq4sam" and not cfg.recon.enabled
    assert not cfg.ptq4sam.big and not cfg.ptq4sam.agq
    assert _load("ptq4sam_config44.yaml").recon.enabled


def test_saqsam_config_means_its_default_flags_and_warns_on_inert_keys() -> None:
    with pytest.warns(ConfigWarning) as seen:
        cfg = load_qconfig(FIXTURES / "saqsam_config_SA_44.yaml")
    messages = " ".join(str(w.message) for w in seen)
    assert "recon.weight 0.02 is inert in SAQ-SAM" in messages
    assert cfg.method == "saqsam"
    # --recon_unit per_stage, --recon_encoder CAMS, --recon_decoder CLM, --CAM_loss PAR (its defaults)
    assert cfg.recon.units == "stages" and cfg.par.enabled and cfg.attention.rel_pos_float_q
    assert cfg.recon.weight == 0.0 and cfg.recon.weight_lr == 1e-3  # no regulariser, Adam's default rate
    assert not cfg.pcc.enabled  # --FFC is off by default
    assert (cfg.par.alpha, cfg.par.beta, cfg.par.query_weight) == (1.0, 1.0, 0.01)
    assert cfg.recon.iters_cams == 2000 and cfg.a_qconfig.observer == "avg_mse"
