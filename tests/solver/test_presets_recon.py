"""Every method preset in exp/ runs end to end through test_quant.py with reconstruction, on a tiny SAM.

Budgets are shrunk (3 iterations per unit, 5 ACNR steps); the presets' recipes are otherwise unchanged.
The pipeline itself asserts the evaluation state (every quantizer on, no dropping, every AdaRound hard).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_test_quant import SIZES, _run, _size_options, make_demo_data

from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization.config import load_qconfig
from ahcq.solver.recon.sam import FINAL_ITERS_FACTOR, sam_chain

REPO = Path(__file__).resolve().parents[2]
METHODS = ("brecq", "qdrop", "ptq4sam", "ahcptq", "saqsam", "ahcqsam")
ITERS = 3
# units of the test SAM (depth 2 with one global block, one two-way layer)
BLOCK_UNITS = 2 * 2 + 1 + 4 + 1
LAYER_UNITS = 2 + 1 + 1 + 1  # AHCQ-SAM: whole blocks, the neck, whole two-way layers, the final attention
STAGE_UNITS = 1 + 1 + 1 + 1
UNITS = {"stages": STAGE_UNITS, "layers": LAYER_UNITS, "blocks": BLOCK_UNITS}
GRANULARITY = {"saqsam": "stages", "ahcqsam": "layers"}


def _tiny_sam():
    return build_tiny_sam(**{**SIZES, "global_attn_indexes": tuple(SIZES["global_attn_indexes"])})


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """Generated demo data (3 train / 2 val images) and a random tiny SAM checkpoint."""
    root = tmp_path_factory.mktemp("presets")
    make_demo_data.generate(root / "demo", seed=5, num_train=3, num_val=2, size=64)
    (root / "ckpt").mkdir()
    torch.manual_seed(3)
    torch.save(_tiny_sam().state_dict(), root / "ckpt" / "tiny_sam.pth")
    return {"root": root}


def _short(root: Path, method: str) -> Path:
    path = root / f"{method}_short.yaml"
    path.write_text(f"base: {REPO / 'exp' / method / 'w4a4.yaml'}\n"
                    f"recon: {{iters: {ITERS}, iters_CAMS: {ITERS}}}\nacnr: {{iters: 5, calib: 2}}\n")
    return path


@pytest.mark.parametrize("method", METHODS)
def test_preset_reconstructs_end_to_end(method, demo, monkeypatch):
    root = demo["root"]
    monkeypatch.setenv("AHCQ_DEMO_ROOT", str(root / "demo"))
    monkeypatch.setenv("AHCQ_CKPT_DIR", str(root / "ckpt"))
    out = root / method
    run = _run(["--config", str(REPO / "projects/configs/demo/tiny_sam_oracle.py"),
                "--q_config", str(_short(root, method)), "--quant-encoder", "--skip-fp", "--limit", "1",
                "--calib-images", "2", "--cache-dir", str(root / "cache"), "--out", str(out),
                "--cfg-options", *_size_options()])
    assert run["qconfig"]["method"] == method
    recon = run["calibration"]["reconstruction"]
    assert recon["requested"] and recon["ran"]
    report = recon["report"]
    stages = method == "saqsam"
    assert report["granularity"] == GRANULARITY.get(method, "blocks")
    assert len(report["units"]) == UNITS[report["granularity"]]
    steps = [u["steps"] for u in report["units"]]
    assert steps == [ITERS] * (len(steps) - 1) + [ITERS * FINAL_ITERS_FACTOR if stages else ITERS]
    assert report["drop_prob"] == (1.0 if method == "brecq" else 0.5)
    assert bool(run["calibration"]["pcc"]) == stages  # PCC runs for SAQ-SAM only
    assert 0.0 <= run["quant"]["segm_mAP"] <= 100.0


@pytest.mark.parametrize("path", [f"{m}/w{b}a{b}.yaml" for m in METHODS for b in (5, 6)]
                         + ["config44.yaml", "config55.yaml", "config66.yaml"])
def test_other_presets_load_and_give_their_method_units(path):
    cfg = load_qconfig(REPO / "exp" / path)
    bits = int(Path(path).stem[-1])
    assert cfg.a_qconfig.bit == cfg.w_qconfig.bit == bits and cfg.recon.enabled
    sam = _tiny_sam()
    quantize_sam(sam, cfg, quant_encoder=True)
    chain = sam_chain(sam, cfg)
    assert cfg.recon.units == GRANULARITY.get(cfg.method, "blocks")
    assert len(chain.units) == UNITS[cfg.recon.units]
    assert chain.par == (cfg.method == "saqsam")
