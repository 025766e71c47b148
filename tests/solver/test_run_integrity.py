"""A run never reports another run's model, resumes only itself, and refuses bad input before any work.

Each case of the reliability probe, on a generated demo set and a random tiny SAM: reruns into a finished
``--out`` with another checkpoint, calibration set or seed are refused before any work, an identical rerun
does nothing, ``--overwrite`` replaces; an interrupted run resumes to the byte-identical result of an
uninterrupted one; bad files and values fail with one line naming them.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_test_quant import SIZES, _run, _size_options, make_demo_data

from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.solver.recon import train as recon_loop
from ahcq.solver.results import write_json
from ahcq.solver.run_identity import RunFolder, RunMismatch
from ahcq.solver.test_quant import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "projects" / "configs" / "demo" / "tiny_sam_oracle.py"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("integrity")
    make_demo_data.generate(root / "demo", seed=7, num_train=4, num_val=2, size=64)
    (root / "ckpt").mkdir()
    torch.manual_seed(3)
    sam = build_tiny_sam(**{**SIZES, "global_attn_indexes": (1,)})
    torch.save(sam.state_dict(), root / "ckpt" / "tiny_sam.pth")
    qconfig = root / "short.yaml"
    qconfig.write_text(f"base: {REPO / 'exp' / 'qdrop' / 'w4a4.yaml'}\nrecon: {{iters: 3}}\n")
    return {"root": root, "ckpt": root / "ckpt" / "tiny_sam.pth", "qconfig": qconfig}


@pytest.fixture
def demo_env(env, monkeypatch) -> dict:
    monkeypatch.setenv("AHCQ_DEMO_ROOT", str(env["root"] / "demo"))
    monkeypatch.setenv("AHCQ_CKPT_DIR", str(env["root"] / "ckpt"))
    return env


def _args(env: dict, out: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO), "--q_config", str(env["qconfig"]), "--quant-encoder", "--limit", "1",
            "--calib-images", "2", "--cache-dir", str(env["root"] / "cache"), "--out", str(out),
            "--cfg-options", *_size_options(), *extra]


def _refused(args: list[str], *words: str) -> str:
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()):
        main(args)
    message = str(exc.value.code)
    assert exc.value.code not in (0, None) and "\n" not in message.strip()
    for word in words:
        assert word in message, message
    return message


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_reruns_with_other_inputs_are_refused_before_any_work(demo_env, tmp_path):
    out = tmp_path / "run"
    first = _run(_args(demo_env, out))
    assert first["identity"]["seed"] == 0 and first["identity"]["threads"] == torch.get_num_threads()
    assert not (out / "recon_state").exists() and not list(tmp_path.glob(".run.partial"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["results.json"] == modes["fp.segm.json"]  # not a private 0600 file among 0644 ones
    before = _snapshot(out)
    perturbed = tmp_path / "perturbed.pth"
    state = torch.load(demo_env["ckpt"], weights_only=True)
    state["image_encoder.blocks.0.attn.qkv.weight"] *= 1.01
    torch.save(state, perturbed)
    _refused(_args(demo_env, out, f"model.sam.checkpoint={perturbed}"), "sam_weights", "--overwrite",
             "new --out")
    _refused(_args(demo_env, out, "--calib-images", "1"), "calibration")  # argparse: the last one wins
    _refused(_args(demo_env, out, "--seed", "1"), "seed", "qconfig")
    for component, value in first["identity"].items():  # any component that differs is named
        other = {**first["identity"], component: ["another", value]}
        with pytest.raises(RunMismatch, match=rf"\(differs: {component}\); use a new --out or --overwrite"):
            RunFolder(out, other).finished()
    assert set(first["identity"]) >= {"mmdet_config", "sam_weights", "prompt", "data", "qconfig",
                                      "calibration", "seed", "threads", "device", "code"}
    threads = torch.get_num_threads()
    try:
        _refused(_args(demo_env, out, "--threads", str(threads + 1)), "differs: threads")
    finally:
        torch.set_num_threads(threads)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    _refused(_args(demo_env, notes), "holds no finished run", "--overwrite")
    assert (notes / "todo.txt").read_text() == "mine"
    assert _snapshot(out) == before and not list(tmp_path.glob(".run.partial"))  # nothing ran, nothing left
    again = _run(_args(demo_env, out))  # the same inputs: nothing to do, the finished run is reported
    assert again == first and _snapshot(out) == before
    replaced = _run(_args(demo_env, out, f"model.sam.checkpoint={perturbed}") + ["--overwrite"])
    assert replaced["identity"]["sam_weights"] != first["identity"]["sam_weights"]
    assert (out / "fp.segm.json").read_bytes() != before["fp.segm.json"]  # the new model's masks


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(demo_env, tmp_path, monkeypatch):
    whole = _run(_args(demo_env, tmp_path / "whole"))
    out = tmp_path / "interrupted"
    real = recon_loop.reconstruct_unit
    calls = {"n": 0}

    def interrupt_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("ahcq.solver.recon.engine.reconstruct_unit", interrupt_third)
    stdout = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(stdout):
        main(_args(demo_env, out))
    assert exc.value.code == 130
    assert "run the same command again to resume" in stdout.getvalue()
    staging = tmp_path / ".interrupted.partial"
    assert (staging / "recon_state" / "recon_state.pt").is_file() and not out.exists()
    kept = _snapshot(staging)
    _refused(_args(demo_env, out, "--seed", "1"), ".interrupted.partial", "seed", "--overwrite")
    assert _snapshot(staging) == kept and not out.exists()  # the other run's state is left as it was
    monkeypatch.setattr("ahcq.solver.recon.engine.reconstruct_unit", real)
    resumed = _run(_args(demo_env, out))
    assert resumed["calibration"]["reconstruction"]["report"]["resumed_at"] == 2
    assert resumed["quant"] == whole["quant"] and resumed["fp"] == whole["fp"]
    assert (out / "quant.segm.json").read_bytes() == (tmp_path / "whole" / "quant.segm.json").read_bytes()
    assert not staging.exists() and not (out / "recon_state").exists()


def test_recon_iters_and_box_cap_come_from_the_command_line(demo_env, tmp_path):
    run = _run(_args(demo_env, tmp_path / "short", "--recon-iters", "2", "--calib-max-boxes", "2",
                     "--keep-state"))
    report = run["calibration"]["reconstruction"]["report"]
    assert run["qconfig"]["recon"]["iters"] == 2 and run["overrides"] == {"recon_iters": 2}
    assert {u["steps"] for u in report["units"]} == {2}
    assert report["max_boxes"] == 2 and max(report["boxes_per_image"]) <= 2
    assert (tmp_path / "short" / "recon_state" / "recon_state.pt").is_file()  # kept on request


def test_the_demo_config_named_explicitly_is_the_no_argument_demo(demo_env, tmp_path):
    from ahcq.solver import pipeline, test_quant

    parser = test_quant._parser()
    implicit = test_quant._options(parser.parse_args([]))
    explicit = test_quant._options(parser.parse_args(["--config", str(DEMO)]))
    cfg = pipeline._load_config(explicit)
    a, b = pipeline._with_defaults(implicit, cfg), pipeline._with_defaults(explicit, cfg)
    assert a.q_config.resolve() == b.q_config.resolve() == (REPO / "exp" / "demo.yaml").resolve()
    assert a.quant_encoder is b.quant_encoder is True and a.out == b.out


@pytest.mark.parametrize("what", ["out", "cache"])
def test_a_file_where_a_folder_goes_is_refused_first(demo_env, tmp_path, what):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = _args(demo_env, blocker if what == "out" else tmp_path / "o")
    if what == "cache":
        args[args.index("--cache-dir") + 1] = str(blocker)
    _refused(args, str(blocker), "is a file")


def test_non_finite_weights_are_named_by_tensor(demo_env, tmp_path):
    state = torch.load(demo_env["ckpt"], weights_only=True)
    state["image_encoder.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(state, bad)
    _refused(_args(demo_env, tmp_path / "o", f"model.sam.checkpoint={bad}") + ["--fp-only"],
             "image_encoder.blocks.0.attn.qkv.weight", "NaN", str(bad))
    assert not (tmp_path / "o").exists()


def test_wrong_format_checkpoints_get_one_line_without_unsafe_advice(demo_env, tmp_path):
    sam2_layout = tmp_path / "sam2like.pth"
    torch.save({"model": torch.load(demo_env["ckpt"], weights_only=True)}, sam2_layout)
    message = _refused(_args(demo_env, tmp_path / "o", f"model.sam.checkpoint={sam2_layout}"),
                       "sam2like.pth", "not a plain state dict")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    message = _refused(_args(demo_env, tmp_path / "o", f"model.sam.checkpoint={garbage}"), "garbage.pth")
    assert "weights_only" not in message and "Traceback" not in message


def test_weights_beyond_float16_under_float16_weights_are_refused_by_name(demo_env, tmp_path):
    state = torch.load(demo_env["ckpt"], weights_only=True)
    state["mask_decoder.iou_prediction_head.layers.2.bias"][0] = 1e6
    big = tmp_path / "big.pth"
    torch.save(state, big)
    half = tmp_path / "half.yaml"
    half.write_text(f"base: {demo_env['qconfig']}\nfloat16_weights: true\n")
    args = _args(demo_env, tmp_path / "o", f"model.sam.checkpoint={big}")
    args[args.index("--q_config") + 1] = str(half)
    _refused(args, "half.yaml", "mask_decoder.iou_prediction_head.layers.2.bias", "beyond float16")
    assert not (tmp_path / "o").exists()


def test_missing_images_and_unannotated_evaluation_sets_are_refused(demo_env, tmp_path):
    root = tmp_path / "demo"
    make_demo_data.generate(root, seed=7, num_train=3, num_val=2, size=64)
    missing = sorted((root / "val").glob("*.png"))[0]
    missing.unlink()
    args = _args(demo_env, tmp_path / "o")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AHCQ_DEMO_ROOT", str(root))
        _refused(args, "data.test", "missing", missing.name)
        ann = root / "annotations" / "instances_val.json"
        data = json.loads(ann.read_text())
        data["annotations"] = []
        ann.write_text(json.dumps(data))
        missing.parent.mkdir(exist_ok=True)
        (root / "val" / missing.name).write_bytes(sorted((root / "train").glob("*.png"))[0].read_bytes())
        _refused(args, "data.test", "no annotation")


def test_a_config_with_a_syntax_error_gets_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("model = dict(\n    type=1,\n")
    proc = subprocess.run([sys.executable, "ahcq/solver/test_quant.py", "--config", str(bad), "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert f"--config {bad}: line" in proc.stderr


def test_a_prompt_source_that_cannot_be_built_is_named(demo_env, tmp_path):
    _refused(_args(demo_env, tmp_path / "o", "model.prompt.type=NoSuchPrompt"), "could not be built",
             "NoSuchPrompt")


def test_logs_to_a_file_have_no_progress_bars_and_no_third_party_noise(demo_env, tmp_path):
    out = tmp_path / "logged"
    proc = subprocess.run([sys.executable, "ahcq/solver/test_quant.py", *_args(demo_env, out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "\x1b[" not in log and "\r" not in log
    assert "MMCV will release v2.0.0" not in log and "No CUDA runtime" not in log
    assert '"bbox" is deleted' not in log and "loading annotations into memory" not in log
    assert "Accumulating evaluation results" not in log  # pycocotools' own prints
    assert "reconstruction unit 1/" in log  # one line per unit instead of a bar


def test_a_model_that_predicts_non_finite_scores_fails_before_writing(demo_env, tmp_path):
    state = torch.load(demo_env["ckpt"], weights_only=True)
    state["mask_decoder.iou_prediction_head.layers.2.weight"].fill_(3e38)  # finite, but the scores overflow
    overflow = tmp_path / "overflow.pth"
    torch.save(state, overflow)
    _refused(_args(demo_env, tmp_path / "o", f"model.sam.checkpoint={overflow}") + ["--fp-only"],
             "fp evaluation", "NaN/Inf boxes or scores")
    assert not (tmp_path / "o").exists()


def test_results_are_strict_json(tmp_path):
    path = write_json(tmp_path / "r.json", {"ap": float("nan"), "runs": [float("inf"), 1.5]})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results")) == {
        "ap": None, "runs": [None, 1.5]}
