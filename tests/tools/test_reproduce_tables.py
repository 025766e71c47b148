"""reproduce_tables.py runs real test_quant.py cells on a tiny random SAM and generated demo data.

Checked against independent references: every rendered entry equals the value in its cell's own
results.json, overlays show up in the resolved qconfig each cell recorded, a resumed grid leaves finished
cells' files untouched (mtimes), failures are listed and do not stop the grid, and register counts match
numbers worked out by hand from the model sizes.
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tool_loader import load_tool

from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.tables.grid import load_spec, plan_tables
from ahcq.tables.render import render_registers

REPO = Path(__file__).resolve().parents[2]
SIZES = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
             global_attn_indexes=[1], out_chans=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64,
             iou_head_hidden_dim=32)



tool = load_tool("reproduce_tables")
make_demo_data = load_tool("make_demo_data")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Demo data (3 train / 2 val images), a random tiny SAM checkpoint and a small spec over them."""
    root = tmp_path_factory.mktemp("tables")
    make_demo_data.generate(root / "demo", seed=5, num_train=3, num_val=2, size=64)
    (root / "ckpt").mkdir()
    torch.manual_seed(3)
    sam = build_tiny_sam(**{**SIZES, "global_attn_indexes": (1,)})
    torch.save(sam.state_dict(), root / "ckpt" / "tiny_sam.pth")
    spec = {
        "title": "test tables",
        "run": {"quant_encoder": True, "seed": 0, "limit": 1, "calib_images": 2},
        "overlays": [{"recon": {"iters": 2, "iters_CAMS": 2}, "acnr": {"iters": 2, "calib": 1}}],
        "models": {"tiny": {"label": "Tiny", "config": str(REPO / "projects/configs/demo/tiny_sam_oracle.py"),
                            "cfg_options": {f"model.sam.{k}": v for k, v in SIZES.items()}}},
        "tables": [
            {"name": "coco", "kind": "methods", "methods": ["minmax", "ahcptq"], "bits": [4], "fp_row": True},
            {"name": "ablation", "kind": "variants", "method": "ahcqsam", "bits": [4],
             "disabled": {"acnr": {"enabled": False}, "ahcptq": {"hluq": False, "cag": False},
                          "lnq": {"enabled": False}},
             "components": {"CAG": {"ahcptq": {"cag": True}}, "LNQ": {"lnq": {"enabled": True}}},
             "rows": [{"label": "base", "enable": []}, {"enable": ["CAG"]}]},
            {"name": "cag_groups", "kind": "variants", "method": "ahcptq", "bits": [4],
             "rows": [{"label": "G = 4", "tag": "g4", "overlays": [{"ahcptq": {"group": 4}}]},
                      {"label": "G = 2", "tag": "g2", "overlays": [{"ahcptq": {"group": 2}}]}]},
            {"name": "hluq_grid", "kind": "grid", "method": "ahcptq", "bits": [4], "as_list": True,
             "row": {"key": "hluq.range_splits", "name": "alpha", "values": [0.3]},
             "col": {"key": "hluq.level_splits", "name": "beta", "values": [0.25, 0.5]}},
        ],
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return {"root": root, "spec": path, "out": root / "out", "data": spec}


@pytest.fixture
def demo_env(env, monkeypatch) -> dict:
    monkeypatch.setenv("AHCQ_DEMO_ROOT", str(env["root"] / "demo"))
    monkeypatch.setenv("AHCQ_CKPT_DIR", str(env["root"] / "ckpt"))
    return env


def _tables(md: str) -> dict[str, list[list[str]]]:
    """Markdown tables by their '### name' heading, as rows of cells (header first, alignment row dropped)."""
    out: dict[str, list[list[str]]] = {}
    name = None
    for line in md.splitlines():
        if line.startswith("### "):
            name = line[4:].strip()
            out[name] = []
        elif line.startswith("| ") and name is not None and not line.startswith("| :--"):
            out[name].append([c.strip() for c in line.strip("|").split(" | ")])
    return out


def _entry(table: list[list[str]], row: str, col: str) -> str:
    header = table[0]
    return next(r for r in table[1:] if r[0] == row)[header.index(col)]


def _cell_path(out: Path, slug: str) -> Path:
    paths = sorted((out / "cells" / "tiny").glob(f"{slug}-*/results.json"))
    assert len(paths) == 1, f"{slug}: {paths}"  # one cell per distinct run, shared across tables
    return paths[0]


def _cell(out: Path, slug: str) -> dict:
    return json.loads(_cell_path(out, slug).read_text())


def _mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/results.json")}


# (table, row, column) -> the cell (folder slug) whose value that entry must show
WHERE = {
    ("coco", "FP", "Tiny W4A4"): "fp",
    ("coco", "minmax", "Tiny W4A4"): "minmax_w4a4",
    ("coco", "ahcptq", "Tiny W4A4"): "ahcptq_w4a4",
    ("ablation", "base", "Tiny W4A4"): "ahcqsam_w4a4_base",
    ("ablation", "CAG", "Tiny W4A4"): "ahcqsam_w4a4_cag",
    ("cag_groups", "G = 4", "Tiny W4A4"): "ahcptq_w4a4",  # the preset itself: shared, not rerun
    ("cag_groups", "G = 2", "Tiny W4A4"): "ahcptq_w4a4_g2",
    ("hluq_grid", "0.3", "0.25"): "ahcptq_w4a4_alpha0.3_beta0.25",
    ("hluq_grid", "0.3", "0.5"): "ahcptq_w4a4_alpha0.3_beta0.5",
}


def _mark_distinct(out: Path) -> dict[str, str]:
    """Give every finished cell a distinct metric value (a random SAM scores 0 everywhere), by slug."""
    shown = {}
    for i, slug in enumerate(sorted(set(WHERE.values()))):
        path = _cell_path(out, slug)
        results = json.loads(path.read_text())
        kind = "fp" if slug == "fp" else "quant"
        assert 0.0 <= results[kind]["segm_mAP"] <= 100.0  # the real run's value
        results[kind]["segm_mAP"] = 10.0 + 7.25 * i
        path.write_text(json.dumps(results))
        shown[slug] = f"{10.0 + 7.25 * i:.1f}"
    return shown


def test_grid_runs_renders_and_resumes(demo_env, capsys):
    out = demo_env["out"]
    assert tool.main(["--spec", str(demo_env["spec"]), "--out", str(out), "--threads", "1"]) == 0
    assert len(_mtimes(out)) == 8 and not list((out / "cells" / "tiny").glob("ahcptq_w4a4_g4-*"))
    fp = _cell(out, "fp")
    assert "quant" not in fp and "fp" in fp
    for slug in ("minmax_w4a4", "ahcptq_w4a4"):
        run = _cell(out, slug)
        assert "fp" not in run and run["qconfig"]["recon"]["iters"] == 2
    base, cag = _cell(out, "ahcqsam_w4a4_base")["qconfig"], _cell(out, "ahcqsam_w4a4_cag")["qconfig"]
    assert not base["ahcptq"]["cag"] and not base["acnr"]["enabled"] and not base["lnq"]["enabled"]
    assert cag["ahcptq"]["cag"] and not cag["lnq"]["enabled"] and not cag["ahcptq"]["hluq"]
    assert _cell(out, "ahcptq_w4a4_g2")["qconfig"]["cag"]["groups"] == 2
    for beta in (0.25, 0.5):
        hluq = _cell(out, f"ahcptq_w4a4_alpha0.3_beta{beta}")["qconfig"]["hluq"]
        assert (hluq["range_splits"], hluq["level_splits"]) == ([0.3], [beta])

    # resume: nothing reruns (a rerun would overwrite the marked values), entries show each cell's value
    shown = _mark_distinct(out)
    before = _mtimes(out)
    assert tool.main(["--spec", str(demo_env["spec"]), "--out", str(out)]) == 0
    assert _mtimes(out) == before
    text = (out / "tables.md").read_text()
    tables = _tables(text)
    assert set(tables) == {"coco", "ablation", "cag_groups", "hluq_grid"}
    assert (out / "ablation.md").read_text() in text
    for (table, row, col), slug in WHERE.items():
        assert _entry(tables[table], row, col) == shown[slug], (table, row, col)
    assert tables["ablation"][0] == ["Variant", "CAG", "LNQ", "Tiny W4A4"]
    assert [r[1:3] for r in tables["ablation"][1:]] == [["✗", "✗"], ["✓", "✗"]]

    # a lost result reruns that cell only
    lost = _cell_path(out, "minmax_w4a4")
    lost.unlink()
    capsys.readouterr()
    assert tool.main(["--spec", str(demo_env["spec"]), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "8 cells, 1 to run" in listing and "pending  tiny/minmax_w4a4" in listing
    assert tool.main(["--spec", str(demo_env["spec"]), "--out", str(out), "--only", "coco"]) == 0
    after = _mtimes(out)
    assert lost in after and {p: t for p, t in after.items() if p != lost} == {
        p: t for p, t in before.items() if p != lost}
    coco = _tables((out / "coco.md").read_text())["coco"]
    assert _entry(coco, "minmax", "Tiny W4A4") == f"{_cell(out, 'minmax_w4a4')['quant']['segm_mAP']:.1f}"
    assert _entry(coco, "ahcptq", "Tiny W4A4") == shown["ahcptq_w4a4"]

    # retrained weights (a rewritten checkpoint) are new cells, not cache hits
    ckpt = demo_env["root"] / "ckpt" / "tiny_sam.pth"
    stat = ckpt.stat()
    ckpt.write_bytes(ckpt.read_bytes())
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert tool.main(["--spec", str(demo_env["spec"]), "--out", str(out), "--dry-run"]) == 0
    assert "8 cells, 8 to run" in capsys.readouterr().out
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tool.main(["--spec", str(demo_env["spec"]), "--out", str(out), "--dry-run"]) == 0
    assert "8 cells, 0 to run" in capsys.readouterr().out


def test_failed_cells_are_listed_and_the_grid_goes_on(demo_env, tmp_path, capsys):
    data = json.loads(json.dumps(demo_env["data"]))
    data["models"]["broken"] = {"label": "Broken", "config": str(tmp_path / "missing.py")}
    data["tables"] = [{"name": "coco", "kind": "methods", "methods": ["minmax", "ahcptq"], "bits": [4]}]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    out = demo_env["out"]  # the tiny cells are already there from the first test or run here
    assert tool.main(["--spec", str(spec), "--out", str(out), "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "2 cell(s) failed" in err and "broken/minmax_w4a4" in err and "broken/ahcptq_w4a4" in err
    assert "no such mmdet config" in err
    coco = _tables((out / "tables.md").read_text())["coco"]
    assert _entry(coco, "minmax", "Broken W4A4") == "fail" == _entry(coco, "ahcptq", "Broken W4A4")
    assert _entry(coco, "ahcptq", "Tiny W4A4") == f"{_cell(out, 'ahcptq_w4a4')['quant']['segm_mAP']:.1f}"
    assert _entry(coco, "minmax", "Tiny W4A4") == f"{_cell(out, 'minmax_w4a4')['quant']['segm_mAP']:.1f}"


def test_spec_errors_name_file_and_key(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**env["data"], "tables": [{"name": "t", "kind": "methods",
                                                               "methods": ["minmax"], "bitz": [4]}]}))
    with pytest.raises(SystemExit, match=r"bad\.yaml: tables\.0\.bitz: unknown key"):
        tool.main(["--spec", str(bad), "--dry-run"])
    bad.write_text(yaml.safe_dump({**env["data"], "overlays": [{"recon": {"iters": -1}}]}))
    with pytest.raises(SystemExit, match=r"cell minmax W4A4: .*recon\.iters: -1 is not allowed"):
        tool.main(["--spec", str(bad), "--dry-run"])
    with pytest.raises(SystemExit, match="--only nope: no such table"):
        tool.main(["--spec", str(env["spec"]), "--only", "nope", "--dry-run"])
    out = tmp_path / "never"
    assert tool.main(["--spec", str(env["spec"]), "--out", str(out), "--dry-run"]) == 0
    assert not out.exists()


def test_register_counts_match_hand_counts(tmp_path):
    spec = tmp_path / "reg.yaml"
    sizes = {**SIZES}
    spec.write_text(textwrap.dedent(f"""\
        models: {{m: {{config: {REPO / 'projects/configs/demo/tiny_sam_oracle.py'}}}}}
        tables:
            - {{name: registers, kind: registers, bits: [4], groups: [4, 64], archs: [
                {{label: SAM-H, arch: vit_h}}, {{label: tiny, arch: tiny, sizes: {json.dumps(sizes)}}}]}}
        """))
    md = render_registers(load_spec(spec).tables[0], quant_encoder=True)
    rows = {(r[0], r[1]): r[2:] for r in _tables(md)["registers"][1:]}
    # tiny: encoder 2 blocks x (qkv, lin1) + decoder 1 layer x (3 attentions x q/k/v + lin1) + final q/k/v,
    # all 32 channels wide
    q, c = 2 * 2 + 3 * 3 + 1 + 3, 32
    assert rows[("tiny", "per-tensor")][:4] == [str(q), str(q), str(2 * q), str(q * 36)]
    assert rows[("tiny", "per-channel")][1] == str(q * c)
    assert rows[("tiny", "CAG, 4 groups")][1:4] == [str(4 * q), str(8 * q), str(4 * q * 36)]
    assert rows[("tiny", "CAG, 64 groups")][1] == str(q * c)  # capped at the channel count
    # SAM-H: 32 blocks x (qkv, lin1) of width 1280, decoder 2 layers x 10 + 3 projections of width 256
    h_channels = 32 * 2 * 1280 + (2 * 10 + 3) * 256
    assert rows[("SAM-H", "per-channel")][:2] == ["87", str(h_channels)]
    assert rows[("SAM-H", "CAG, 4 groups")][3] == str(87 * 4 * 36)
    assert "4 x (32 + 4) = 144 register bits per quantizer" in md
    assert "(1280 channels) needs 46080 per channel, so 99.7 % fewer" in md


@pytest.mark.parametrize("name, cells, tables", [
    ("demo", 7 * 2 * 3 + 1 + (8 - 1) * 3, 2), ("fidelity", 13, 5), ("coco", 12 * 7 * 3 + 12, 4),
    ("ablation", 8 * 3, 1), ("hluq_grid", 2 * 3 + 9 * 7, 2),
    ("cag_groups", 6 * 3, 1), ("cag_weights", 2 * 3, 1), ("budget", 5 * 3, 1), ("mixed", 2 * 3 + 5 * 3, 2),
    ("ours", 2 * 3, 1), ("video", 1 + 4 * 2 * 3, 2)])
def test_shipped_specs_plan(name, cells, tables):
    plans, planned = plan_tables(load_spec(REPO / "exp" / "tables" / f"{name}.yaml"))
    assert len(planned) == cells and len(plans) == tables


def test_seeds_give_one_cell_each_and_render_mean_and_std(demo_env, tmp_path):
    data = json.loads(json.dumps(demo_env["data"]))
    data["run"] = {k: v for k, v in data["run"].items() if k != "seed"} | {"seeds": [0, 1, 2]}
    data["tables"] = [{"name": "coco", "kind": "methods", "methods": ["minmax"], "bits": [4], "fp_row": True}]
    spec = tmp_path / "seeds.yaml"
    spec.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert tool.main(["--spec", str(spec), "--out", str(out), "--threads", "1"]) == 0
    cells = {p.parent.name.rsplit("-", 1)[0]: json.loads(p.read_text())
             for p in (out / "cells" / "tiny").glob("*/results.json")}
    assert set(cells) == {"fp", "minmax_w4a4_s0", "minmax_w4a4_s1", "minmax_w4a4_s2"}  # one FP cell
    assert [cells[f"minmax_w4a4_s{s}"]["seed"] for s in range(3)] == [0, 1, 2]
    marks = [12.0, 15.0, 21.0]
    for s, value in enumerate(marks):  # distinct values (a random SAM scores 0 everywhere)
        path = next((out / "cells" / "tiny").glob(f"minmax_w4a4_s{s}-*/results.json"))
        results = json.loads(path.read_text())
        results["quant"]["segm_mAP"] = value
        path.write_text(json.dumps(results))
    assert tool.main(["--spec", str(spec), "--out", str(out)]) == 0
    coco = _tables((out / "coco.md").read_text())["coco"]
    assert _entry(coco, "minmax", "Tiny W4A4") == "16.0 ± 4.6"  # mean 16, sample std sqrt(21)
    next((out / "cells" / "tiny").glob("minmax_w4a4_s2-*/results.json")).unlink()
    assert tool.main(["--spec", str(spec), "--out", str(out), "--dry-run"]) == 0
    bad = yaml.safe_load(spec.read_text())
    bad["run"]["seeds"] = [0, 0]
    spec.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit, match="run.seeds"):
        tool.main(["--spec", str(spec), "--dry-run"])


def test_video_models_run_test_quant_video_cells_with_a_metric_per_table(tmp_path):
    """A video-run YAML as a model: its cells are test_quant_video.py runs (float once, quantized with
    --skip-fp), and each table shows the metric it names, read from the cells' own results.json."""
    from ahcq.models.sam2_checkpoint import build_sam2_model, reduced_overrides
    from ahcq.video.fixtures import make_moving_shapes_clip

    for v in range(2):
        make_moving_shapes_clip(tmp_path / "clips", "sav", n_frames=3, size=(48, 64), n_objects=1,
                                seed=20 + v, video=f"clip{v}")
    torch.manual_seed(0)
    extra = ["++model.memory_attention.num_layers=1"]
    model = build_sam2_model("t", [*reduced_overrides(image_size=64), *extra], video=True)
    torch.save({"model": model.state_dict()}, tmp_path / "tiny2.pt")
    run = {"model": {"config": "t", "checkpoint": str(tmp_path / "tiny2.pt"), "reduced": {"image_size": 64},
                     "overrides": extra},
           "dataset": {"root": str(tmp_path / "clips"), "layout": "sav", "split": "val"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    tables = [{"name": f"video_{m.split('/')[0]}", "kind": "methods", "metric": m, "methods": ["minmax"],
               "bits": [4], "fp_row": True} for m in ("official/J&F", "ahcq/J&F")]
    spec = {"title": "video", "metric": "official/J&F", "run": {"seed": 0},
            "overlays": [{"calibrate": {"sample": 1, "frame": 2}}],
            "models": {"v": {"label": "V", "config": str(tmp_path / "run.yaml")}}, "tables": tables}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert tool.main(["--spec", str(tmp_path / "spec.yaml"), "--out", str(out), "--threads", "1"]) == 0
    cells = {p.parent.name.rsplit("-", 1)[0]: json.loads(p.read_text())
             for p in (out / "cells" / "v").glob("*/results.json")}
    assert set(cells) == {"fp", "minmax_w4a4"}
    assert cells["fp"]["quant"] is None and cells["minmax_w4a4"]["fp"] is None
    assert cells["minmax_w4a4"]["calibration"]["frames"] == 2
    rendered = _tables((out / "tables.md").read_text())
    for metric in ("official/J&F", "ahcq/J&F"):
        table = rendered[f"video_{metric.split('/')[0]}"]
        assert _entry(table, "FP", "V W4A4") == f"{cells['fp']['fp'][metric]:.1f}"
        assert _entry(table, "minmax", "V W4A4") == f"{cells['minmax_w4a4']['quant'][metric]:.1f}"
    with pytest.raises(SystemExit, match="cfg_options"):
        bad = {**spec, "models": {"v": {"config": str(tmp_path / "run.yaml"), "cfg_options": {"a": 1}}}}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        tool.main(["--spec", str(tmp_path / "bad.yaml"), "--dry-run"])


def test_slurm_executor_runs_cells_as_jobs_with_the_in_process_results(demo_env, slurm, tmp_path):
    data = json.loads(json.dumps(demo_env["data"]))
    data["tables"] = [{"name": "coco", "kind": "methods", "methods": ["minmax"], "bits": [4]}]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    here, there = tmp_path / "here", tmp_path / "slurm"
    assert tool.main(["--spec", str(spec), "--out", str(here), "--threads", "1"]) == 0
    assert tool.main(["--spec", str(spec), "--out", str(there), "--threads", "1", "--executor", "slurm",
                      "--partition", "ahcq", "--cpus", "1", "--time", "10", "--jobs", "2"]) == 0
    ids = json.loads((there / "submitit" / "jobs.json").read_text())
    assert len(ids) == 1 and not (here / "submitit").exists()
    ours, theirs = _cell(here, "minmax_w4a4"), _cell(there, "minmax_w4a4")
    assert ours["quant"] == theirs["quant"]
    masks = [(_cell_path(o, "minmax_w4a4").parent / "quant.segm.json").read_bytes() for o in (here, there)]
    assert masks[0] == masks[1]
    assert (here / "tables.md").read_text() == (there / "tables.md").read_text()


def test_slurm_options_need_the_slurm_executor(demo_env, tmp_path):
    with pytest.raises(SystemExit, match="Slurm options; add --executor slurm"):
        tool.main(["--spec", str(demo_env["spec"]), "--out", str(tmp_path), "--partition", "gpu"])
