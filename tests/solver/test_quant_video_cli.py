"""test_quant_video.main end to end: float and W4A4 runs of a reduced SAM 2.1 on generated clips.

The checkpoint is a randomly initialised reduced Hiera-T saved in sam2's format ``{"model": state_dict}``,
loaded back through the CLI's config; the W4A4 recipe is exp/sam2/w4a4.yaml (BIG, AGQ, CAG, HLUQ, LNQ, ACNR,
QDrop reconstruction) plus CAG on the weights, with short searches and two reconstruction steps so that it
runs in seconds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from ahcq.models.sam2_checkpoint import build_sam2_model, reduced_overrides
from ahcq.solver.test_quant_video import main
from ahcq.video import evaluate, read_sav
from ahcq.video.fixtures import make_moving_shapes_clip
from ahcq.video.propagation import predict_videos

REPO = Path(__file__).resolve().parents[2]
REDUCED = {"image_size": 128}
EXTRA = ["++model.memory_attention.num_layers=1"]
W4A4 = {
    "base": str(REPO / "exp" / "sam2" / "w4a4.yaml"),
    "calibrate": 2,
    "w_qconfig": {"observer": "minmax"},
    "recon": {"iters": 2},
    "acnr": {"iters": 5, "calib": 1},
    "lnq": {"alphas": [1.0]},
    "agq": {"taus": [1, 2]},
    "cag": {"apply_to_weights": True, "weight_groups": 4},
}
METRICS = ("official/J&F", "official/J", "official/F", "ahcq/J&F", "ahcq/J", "ahcq/F")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoint, dataset (3 clips), run config and quantization config on disk."""
    root = tmp_path_factory.mktemp("video_cli")
    data = root / "data"
    for v in range(3):
        make_moving_shapes_clip(data, "sav", n_frames=4, size=(64, 80), n_objects=2, seed=10 + v,
                                video=f"clip{v}")
    torch.manual_seed(0)
    model = build_sam2_model("t", [*reduced_overrides(**REDUCED), *EXTRA], video=True)
    torch.save({"model": model.state_dict()}, root / "tiny.pt")
    config = {
        "model": {"config": "t", "checkpoint": str(root / "tiny.pt"), "reduced": REDUCED, "overrides": EXTRA},
        "dataset": {"root": str(data), "layout": "sav", "split": "val"},
        "calibration": {"videos": 1, "frames": 2},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    (root / "w4a4.yaml").write_text(yaml.safe_dump(W4A4))
    return {"root": root, "data": data, "ckpt": root / "tiny.pt", "config": root / "run.yaml",
            "qconfig": root / "w4a4.yaml"}


def _run(setup: dict[str, Path], out: Path, *extra: str) -> dict:
    assert main(["--config", str(setup["config"]), "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def fp_results(setup, tmp_path_factory) -> dict:
    return _run(setup, tmp_path_factory.mktemp("fp"), "--fp-only")


@pytest.fixture(scope="module")
def quant_results(setup, tmp_path_factory) -> dict:
    return _run(setup, tmp_path_factory.mktemp("w4a4"), "--q_config", str(setup["qconfig"]), "--seed", "3")


def test_fp_run_matches_direct_evaluation(setup, fp_results) -> None:
    """The CLI's float numbers are those of the checkpoint tracked and scored directly."""
    from ahcq.models.sam2_checkpoint import load_sam2

    predictor = load_sam2("t", setup["ckpt"], [*reduced_overrides(**REDUCED), *EXTRA,
                                                "++model.fill_hole_area=0"], video=True)
    samples = read_sav(setup["data"], "val")
    direct = evaluate(samples, predict_videos(predictor, samples, progress=False)).as_dict()
    assert {k: fp_results["fp"][k] for k in direct} == direct
    assert fp_results["quant"] is None and fp_results["q_config"] is None
    assert fp_results["fp"]["official/count"] == 6 and fp_results["videos"] == ["clip0", "clip1", "clip2"]


def test_w4a4_run_writes_complete_results(setup, fp_results, quant_results, capsys) -> None:
    r = quant_results
    assert r["fp"] == fp_results["fp"]  # quantizing afterwards never touches the float evaluation
    assert all(math.isfinite(r["quant"][k]) and 0 <= r["quant"][k] <= 100 for k in METRICS)
    assert r["quant"]["official/count"] == r["fp"]["official/count"]
    assert r["seed"] == 3 and r["q_config"]["seed"] == 3 and r["device"] == "cpu"
    assert r["q_config"]["a_qconfig"]["bit"] == 4 and r["q_config"]["w_qconfig"]["bit"] == 4
    assert r["config"]["model"]["checkpoint"] == str(setup["ckpt"])
    assert r["sam2_overrides"][-2:] == [*EXTRA, "++model.fill_hole_area=0"]
    calib = r["calibration"]
    assert len(calib["videos"]) == 1 and calib["frames"] == 2
    sites = ("layers.0.cross_attn_token_to_image", "layers.1.cross_attn_token_to_image")
    assert set(calib["big"]) == {f"sam_mask_decoder.transformer.{s}" for s in sites}
    assert calib["acnr"]
    assert calib["weight_groups"] and all(1 <= g <= 4 for g in calib["weight_groups"].values())
    recon = calib["reconstruction"]["report"]
    names = recon["unit_names"]
    # the AHCQ-SAM SAM2 code's units, in its order: Hiera attention / MLP / stage projection, the FPN neck,
    # memory-attention parts, memory-encoder parts, decoder sub-blocks and the final attention
    hiera = [n for n in names if n.startswith("image_encoder.trunk.blocks.")]
    first = ["image_encoder.trunk.blocks.0.attn", "image_encoder.trunk.blocks.0.mlp",
             "image_encoder.trunk.blocks.1.attn"]
    assert len(hiera) == 12 * 2 + 3 and hiera[:3] == first
    assert names[len(hiera)] == "image_encoder.neck"
    assert names[len(hiera) + 1:len(hiera) + 5] == [f"memory_attention.layers.0.{p}" for p in
                                                    ("self_attn", "cross_attn_image", "linear1", "linear2")]
    assert [n for n in names if n.startswith("memory_encoder")] == [
        "memory_encoder.mask_downsampler", "memory_encoder.pix_feat_proj", "memory_encoder.fuser.layers.0",
        "memory_encoder.fuser.layers.1", "memory_encoder.out_proj"]
    assert len([n for n in names if n.startswith("sam_mask_decoder")]) == 2 * 4 + 1
    assert names[-1] == "sam_mask_decoder.transformer.final_attn_token_to_image"
    assert len(recon["units"]) == len(names) and all(u["steps"] == 2 for u in recon["units"])
    assert {"build", "fp_eval", "calibration", "reconstruction", "quant_eval", "total"} <= set(r["timings_s"])
    main(["--config", str(setup["config"]), "--out", str(setup["root"] / "fp2"), "--fp-only"])
    table = capsys.readouterr().out
    assert "float J&F" in table and f"{r['fp']['official/J&F']:.2f}" in table


def test_same_seed_same_quantized_result(setup, quant_results, tmp_path) -> None:
    again = _run(setup, tmp_path, "--q_config", str(setup["qconfig"]), "--seed", "3")
    assert again["quant"] == quant_results["quant"]
    assert again["calibration"]["videos"] == quant_results["calibration"]["videos"]
    def losses(run: dict) -> list:
        return [u["loss_last"] for u in run["calibration"]["reconstruction"]["report"]["units"]]

    assert losses(again) == losses(quant_results)


def _fails(argv: list[str], capsys, match: str, out: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main([*argv, "--out", str(out)])
    assert err.value.code not in (0, None) and match in str(err.value.code) + capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_bad_inputs_fail_clearly_and_write_nothing(setup, tmp_path, capsys) -> None:
    config = yaml.safe_load(setup["config"].read_text())
    out = tmp_path / "out"
    _fails(["--config", str(setup["config"])], capsys, "--q_config is required", out)
    _fails(["--config", str(setup["config"]), "--fp-only", "--checkpoint", str(tmp_path / "none.pt")], capsys,
           "none.pt", out)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "dataset": {**config["dataset"], "rooot": "x"}}))
    _fails(["--config", str(bad), "--fp-only"], capsys, "dataset.rooot: unknown key 'rooot'", out)
    for section, key, value in (("tracking", "offload_video", "no"), ("tracking", "threshold", 1.5),
                                ("calibration", "videos", "2")):
        bad.write_text(yaml.safe_dump({**config, section: {**config.get(section, {}), key: value}}))
        _fails(["--config", str(bad), "--q_config", str(setup["qconfig"])], capsys,
               f"{section}.{key}: {value!r} is not allowed", out)
    _fails(["--config", str(setup["config"]), "--fp-only", "--data-root", str(tmp_path / "nowhere")], capsys,
           "nowhere", out)
    pcc = tmp_path / "pcc.yaml"
    pcc.write_text(yaml.safe_dump({**W4A4, "pcc": {"enabled": True}}))
    _fails(["--config", str(setup["config"]), "--q_config", str(pcc)], capsys, "pcc.enabled", out)
    _fails(["--config", str(setup["config"]), "--q_config", str(setup["qconfig"]), "--calib-videos", "5"],
           capsys, "cannot draw 5 calibration videos from a dataset of 3", out)
    _fails(["--config", "not_a_model", "--fp-only"], capsys, "not_a_model", out)
    state = torch.load(setup["ckpt"], weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() == 2)
    state["model"][name][0, 0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    _fails(["--config", str(setup["config"]), "--fp-only", "--checkpoint", str(tmp_path / "inf.pt")], capsys,
           f"tensor {name!r} holds 1 NaN/Inf", out)
    (tmp_path / "file").write_text("")
    _fails(["--config", str(setup["config"]), "--fp-only"], capsys, "is a file, not a folder",
           tmp_path / "file")


def test_video_reruns_are_refused_or_resumed_like_image_runs(setup, tmp_path, monkeypatch) -> None:
    """The run identity of the image CLI: another seed into a finished --out is refused before any work, the
    same command reports the finished run, and an interrupted reconstruction resumes to the same result."""
    from ahcq.solver.recon import train as recon_loop

    args = ["--q_config", str(setup["qconfig"]), "--seed", "3", "--recon-iters", "1"]
    whole = _run(setup, tmp_path / "whole", *args)
    assert whole["overrides"] == {"recon_iters": 1} and whole["identity"]["seed"] == 3
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(setup["config"]), "--out", str(tmp_path / "whole"), *args[:2], "--seed", "4",
              "--recon-iters", "1"])
    assert "differs: " in str(exc.value.code) and "seed" in str(exc.value.code)
    assert _run(setup, tmp_path / "whole", *args) == whole  # same inputs: nothing to do
    real, calls = recon_loop.reconstruct_unit, {"n": 0}

    def interrupt_fifth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("ahcq.solver.recon.sam2.reconstruct_unit", interrupt_fifth)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(setup["config"]), "--out", str(tmp_path / "cut"), *args])
    assert exc.value.code == 130 and (tmp_path / ".cut.partial" / "recon_state").is_dir()
    monkeypatch.setattr("ahcq.solver.recon.sam2.reconstruct_unit", real)
    resumed = _run(setup, tmp_path / "cut", *args)
    assert resumed["calibration"]["reconstruction"]["report"]["resumed_at"] == 4
    assert resumed["quant"] == whole["quant"] and resumed["fp"] == whole["fp"]


CONFIGS = sorted((REPO / "projects" / "configs" / "sam2").glob("sam2.1_hiera_*.yaml"))
CKPT_NAMES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_name_real_sam2_builds_and_env_paths(path: Path, monkeypatch) -> None:
    from ahcq.models.sam2_checkpoint import SAM2_TRUNKS, config_trunk
    from ahcq.solver.test_quant_video import VideoRunOptions, _resolve

    for var in ("AHCQ_CKPT_DIR", "AHCQ_SAV_ROOT", "AHCQ_DAVIS_ROOT"):
        monkeypatch.delenv(var, raising=False)
    size = path.stem.split("_")[2]
    opts = VideoRunOptions(config=str(path), q_config=None, out=Path("unused"), fp_only=True)
    cfg = _resolve(opts)
    assert config_trunk(cfg["model"]["config"]) == SAM2_TRUNKS[size]
    assert cfg["model"]["checkpoint"] == f"ckpt/sam2.1_hiera_{CKPT_NAMES[size]}.pt"
    davis = path.stem.endswith("davis17_val")
    assert cfg["dataset"]["layout"] == cfg["calibration"]["layout"] == ("davis" if davis else "sav")
    assert cfg["calibration"]["split"] == ("train" if davis else "sav_train")
    assert (cfg["calibration"]["videos"], cfg["calibration"]["frames"]) == (8, 4)
    monkeypatch.setenv("AHCQ_CKPT_DIR", "weights")
    monkeypatch.setenv("AHCQ_DAVIS_ROOT" if davis else "AHCQ_SAV_ROOT", "elsewhere")
    moved = _resolve(opts)
    assert moved["model"]["checkpoint"].startswith("weights/")
    assert moved["dataset"]["root"].startswith("elsewhere")


def test_demo_runs_without_arguments_and_generates_its_clips(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AHCQ_VIDEO_DEMO_ROOT", raising=False)
    assert main(["--fp-only", "--out", "out"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["videos"] == ["shapes00", "shapes01", "shapes02"]
    assert results["fp"]["official/count"] == 6 and results["config"]["model"]["checkpoint"] is None
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["demo_video"]  # no temporary left


@pytest.mark.slow
def test_full_ahcq_sam_preset_with_short_reconstruction(setup, tmp_path) -> None:
    """exp/sam2/w4a4.yaml as shipped (MSE weight ranges, every LNQ alpha, ACNR 200 steps), 50 recon steps."""
    qconfig = tmp_path / "preset.yaml"
    qconfig.write_text(yaml.safe_dump({"base": W4A4["base"], "recon": {"iters": 50}}))
    r = _run(setup, tmp_path / "out", "--q_config", str(qconfig), "--calib-videos", "2",
             "--calib-frames", "2")
    assert r["q_config"]["lnq"]["alphas"] == [0.001, 0.1, 1, 5, 10, 20, 50, 100, 200]
    assert all(u["steps"] == 50 for u in r["calibration"]["reconstruction"]["report"]["units"])
    assert all(math.isfinite(r["quant"][k]) for k in METRICS)


def test_skip_fp_quantizes_the_same_model_without_the_float_evaluation(setup, quant_results,
                                                                       tmp_path) -> None:
    r = _run(setup, tmp_path / "skip", "--q_config", str(setup["qconfig"]), "--seed", "3", "--skip-fp")
    assert r["fp"] is None and r["identity"]["evaluations"] == "quant"
    assert r["quant"] == quant_results["quant"]
    assert "fp_eval" not in r["timings_s"]


def test_brecq_reconstructs_sam2_with_float_activations(setup, tmp_path, monkeypatch) -> None:
    """recon.act_quant false (BRECQ's reference): every unit trains with its activation quantizers off and
    its weights quantized; the evaluated model has them all on again."""
    from ahcq.quantization.quantizers import Mode, Role
    from ahcq.solver.recon import train as recon_loop

    brecq = tmp_path / "brecq.yaml"
    brecq.write_text(yaml.safe_dump({"base": str(REPO / "exp" / "brecq" / "w4a4.yaml"), "calibrate": 2,
                                     "recon": {"iters": 2, "units": "blocks"}}))
    real, seen = recon_loop.reconstruct_unit, []

    def record(unit, *a, **k):
        seen.append({(q.role is Role.WEIGHT, q.mode) for q in unit.quantizers})
        return real(unit, *a, **k)

    monkeypatch.setattr("ahcq.solver.recon.sam2.reconstruct_unit", record)
    r = _run(setup, tmp_path / "out", "--q_config", str(brecq), "--skip-fp")
    assert len(seen) == len(r["calibration"]["reconstruction"]["report"]["unit_names"]) > 10
    assert all(s <= {(True, Mode.QUANTIZE), (False, Mode.OFF)} for s in seen)
    assert any((False, Mode.OFF) in s for s in seen)
    assert r["q_config"]["recon"]["act_quant"] is False
    assert all(math.isfinite(r["quant"][k]) for k in METRICS)
