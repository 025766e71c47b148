"""The plot tools on a small random SAM saved in the official layout, checked against independent references:
activations re-captured through segment_anything's own SamPredictor, levels re-derived from the exported
quantizer parameters with the documented formulas, IoU recomputed in numpy, PNGs re-opened with PIL."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from tool_loader import load_tool

from ahcq.analysis import load_samples
from ahcq.analysis.figures import DPI, level_figure, mask_overlay_figure, save_png
from ahcq.models.tiny_sam import build_tiny_sam

ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
             global_attn_indexes=[1], out_chans=32, decoder_depth=2, decoder_heads=2, decoder_mlp_dim=64,
             iou_head_hidden_dim=32)



make_demo_data = load_tool("make_demo_data")
cag_tool = load_tool("plot_cag_channels")
hluq_tool = load_tool("plot_hluq_hist")
lnq_tool = load_tool("plot_lnq_hist")
mask_tool = load_tool("plot_mask_overlay")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Demo data, a random tiny SAM (state dict + json sidecar, as tools/train_tiny_sam.py writes) and
    config44 without ACNR (ACNR is the slow part of calibration and not what these plots show)."""
    root = tmp_path_factory.mktemp("plots")
    assert make_demo_data.main(["--out", str(root / "demo"), "--seed", "1", "--num-train", "3",
                                "--num-val", "2", "--size", "64"]) == 0
    torch.manual_seed(0)
    torch.save(build_tiny_sam(**SIZES).state_dict(), root / "sam.pth")
    (root / "sam.json").write_text(json.dumps({"build_args": SIZES}))
    (root / "q.yaml").write_text(f"base: {ROOT / 'exp' / 'config44.yaml'}\nacnr:\n    enabled: false\n")
    return {"root": root, "data": root / "demo", "ckpt": root / "sam.pth", "q": root / "q.yaml"}


def _argv(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]), "--q_config", str(setup["q"]),
            "--out", str(out), *extra]


def _float_sam(setup: dict[str, Path]):
    return build_tiny_sam(checkpoint=setup["ckpt"], **SIZES)


def _predict(predictor: SamPredictor, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """segment_anything's own predictor: one mask per box."""
    predictor.set_image(image)
    boxes_t = predictor.transform.apply_boxes_torch(torch.from_numpy(boxes), image.shape[:2])
    masks, _, _ = predictor.predict_torch(None, None, boxes=boxes_t, multimask_output=False)
    return masks[:, 0].numpy()


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _lines(fig, gid: str) -> list[np.ndarray]:
    """x positions of the vertical-line collections with ``gid``, one array per axis that has one."""
    return [np.array([seg[0][0] for seg in c.get_segments()])
            for ax in fig.axes for c in ax.collections if c.get_gid() == gid]


def test_cag_channels_match_segment_anything_activations(setup, tmp_path) -> None:
    args = cag_tool.parser().parse_args(_argv(setup, tmp_path, "--images", "3", "--channels", "4", "9"))
    results = dict(cag_tool.analyse(args))
    layers = ["image_encoder.blocks.1.attn.qkv", "image_encoder.blocks.1.mlp.lin1",
              *(f"mask_decoder.transformer.layers.0.{a}" for a in (
                  "cross_attn_token_to_image.q_proj", "cross_attn_token_to_image.k_proj",
                  "cross_attn_token_to_image.v_proj", "cross_attn_image_to_token.k_proj",
                  "cross_attn_image_to_token.v_proj", "mlp.lin1"))]
    assert sorted(results) == sorted(f"{n}.input_quantizer" for n in layers)

    sam = _float_sam(setup)
    seen: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    for n in layers:
        sam.get_submodule(n).register_forward_pre_hook(
            lambda _m, inp, n=n: seen[n].append(inp[0].reshape(-1, inp[0].shape[-1]).numpy()))
    predictor = SamPredictor(sam)
    for sample in load_samples(setup["data"], "train", 3, seed=0):
        _predict(predictor, sample.image, sample.boxes[:8])
    for n in layers:
        stats, ref = results[f"{n}.input_quantizer"], np.concatenate(seen[n])
        np.testing.assert_allclose(stats["min"], ref.min(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["max"], ref.max(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats["channels"], np.arange(4, 10))
        assert stats["values"].shape == (len(ref), 6)
        s, z = stats["scale"].astype(np.float64), stats["zero_point"].astype(np.float64)
        feats = np.stack([s / s.max(axis=0), z / 15], axis=-1)[:, 4:10]
        unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
        ref_cos = np.stack([(unit[i] * unit[j]).sum(-1) for i, j in itertools.combinations(range(3), 2)], 1)
        np.testing.assert_allclose(stats["cosine"], ref_cos, atol=1e-12)

    paths = cag_tool.write_figures(list(results.items()), tmp_path / "cag")
    assert len(paths) == 8 and all(_png_size(p) == (12 * DPI, 7 * DPI) for p in paths)


def test_hluq_levels_are_the_quantizers_decoded_codes(setup, tmp_path) -> None:
    args = hluq_tool.parser().parse_args(_argv(setup, tmp_path, "--images", "2"))
    panels, hluqs, twins = hluq_tool.analyse(args)
    fig = level_figure(panels)
    log_lines, uni_lines = _lines(fig, "hluq_log"), _lines(fig, "hluq_uniform")
    breaks, uniform = _lines(fig, "hluq_breakpoint"), _lines(fig, "uniform")
    assert len(hluqs) == 2 and all(q.calibrated for q in (*hluqs.values(), *twins.values()))
    for k, (name, q) in enumerate(hluqs.items()):
        with torch.no_grad():  # export() reads the learnable s1/s2
            e = q.export()
        n_log, x_min, s1, s2 = int(e["n_log"]), float(e["x_min"]), float(e["s1"]), float(e["s2"])
        ref_log = x_min + np.array([0.0, *(s1 * 2.0 ** (c - (n_log - 1)) for c in range(1, n_log))])
        ref_uni = x_min + s1 + s2 * np.arange(1, 16 - n_log + 1)
        np.testing.assert_allclose(log_lines[k], ref_log, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(uni_lines[k], ref_uni, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.concatenate([log_lines[k], uni_lines[k]]),
                                      q.dequantize_int(torch.arange(16, dtype=torch.int32)).numpy())
        assert breaks[k] == pytest.approx([ref_log[-1]], rel=1e-5)
        t = twins[name].export()
        ref_uniform = (np.arange(16) - t["zero_point"][0]) * t["scale"][0]
        np.testing.assert_allclose(uniform[k], ref_uniform, rtol=1e-6)
        values = panels[0][k].values
        lo, hi = twins[name].observer.range()
        assert values.min() <= float(lo) < float(hi) <= values.max()  # averaged extremes of these values
    assert _png_size(save_png(fig, tmp_path / "h.png")) == (12 * DPI, 8 * DPI)


def test_lnq_and_agq_levels_follow_their_formulas(setup, tmp_path) -> None:
    args = lnq_tool.parser().parse_args(
        _argv(setup, tmp_path / "lnq.png", "--images", "2", "--attention", "cross_attn_token_to_image"))
    panels, lnqs, twins = lnq_tool.analyse(args)
    fig = level_figure(panels)
    (lnq_lines,), (agq_lines,) = _lines(fig, "lnq"), _lines(fig, "agq")
    (name, q), = lnqs.items()
    alpha, clip = float(q.alpha), float(q.clip)
    codes = np.arange(1, 16)
    ref_lnq = (np.exp(codes / 15 * np.log1p(alpha * clip)) - 1) / alpha
    np.testing.assert_allclose(lnq_lines, ref_lnq, rtol=1e-5)
    with torch.no_grad():  # export() reads the learnable scale
        agq = twins[name].export()
    np.testing.assert_allclose(agq_lines, agq["scale"] * 2.0 ** ((codes - 15) / agq["tau"]), rtol=1e-5)
    assert (panels[0][0].values >= 0).all() and panels[0][0].values.max() <= 1.0
    assert _png_size(save_png(fig, tmp_path / "l.png")) == (6 * DPI, 8 * DPI)


def test_mask_overlay_compares_float_and_w4a4(setup, tmp_path) -> None:
    args = mask_tool.parser().parse_args(
        _argv(setup, tmp_path, "--images", "2", "--calib-images", "2", "--max-boxes", "3"))
    results, label = mask_tool.analyse(args)
    assert label == "W4A4" and len(results) == 2
    predictor = SamPredictor(_float_sam(setup))
    for r in results:
        assert r.fp.shape == r.quant.shape == r.gt.shape == (min(3, len(r.sample.boxes)), 64, 64)
        assert np.mean(_predict(predictor, r.sample.image, r.boxes) != r.fp) < 1e-3
    assert any((r.quant != r.fp).any() for r in results)  # the 4-bit model really ran quantized

    rows = mask_tool.figure_rows(results, label)
    for r, (_, _, (fp_panel, q_panel)) in zip(results, rows):
        for panel, pred in ((fp_panel, r.fp), (q_panel, r.quant)):
            inter, union = (pred & r.gt).sum((1, 2)), (pred | r.gt).sum((1, 2))
            assert panel.scores == [f"{i / u:.2f}" for i, u in zip(inter, union)]
    assert _png_size(save_png(mask_overlay_figure(rows), tmp_path / "m.png")) == (10 * DPI, 10 * DPI)


def test_cli_writes_pngs_and_reports_bad_input(setup, tmp_path, capsys) -> None:
    assert cag_tool.main(_argv(setup, tmp_path / "cag", "--images", "2")) == 0
    assert len(list((tmp_path / "cag").glob("cag_*.png"))) == 8

    missing = tmp_path / "none.pth"
    assert hluq_tool.main(_argv(setup, tmp_path / "a.png") + ["--checkpoint", str(missing)]) == 2
    assert "none.pth" in capsys.readouterr().err and not (tmp_path / "a.png").exists()

    ptq4sam = ROOT / "exp" / "ptq4sam" / "w4a4.yaml"  # AGQ in the decoder, no LNQ
    argv = _argv(setup, tmp_path / "b.png", "--images", "2") + ["--q_config", str(ptq4sam)]
    assert lnq_tool.main(argv) == 2
    assert "not lnq" in capsys.readouterr().err and not (tmp_path / "b.png").exists()
