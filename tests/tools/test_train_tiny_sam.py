"""Training smoke test: real segment_anything modules learn on the demo data; checkpoints reload strictly."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tool_loader import load_tool

from ahcq.models.tiny_sam import build_tiny_sam

ROOT = Path(__file__).resolve().parents[2]



make_demo_data = load_tool("make_demo_data")
train_tiny_sam = load_tool("train_tiny_sam")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 3,
        "global_attn_indexes": [1], "out_chans": 32, "decoder_heads": 2, "decoder_mlp_dim": 64,
        "iou_head_hidden_dim": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(["--out", str(out), "--num-train", "12", "--num-val", "4", "--size", "64"])
    return out


def test_loss_decreases_on_fixed_batch(data: Path) -> None:
    torch.manual_seed(0)
    sam = build_tiny_sam(**TINY).train()
    split = train_tiny_sam.load_split(data, "train")
    batch = train_tiny_sam.make_batch(split, [0, 1, 2, 3], np.random.default_rng(0), 4, augment=True)
    opt = torch.optim.AdamW(sam.parameters(), lr=2e-3)
    first, _ = train_tiny_sam.compute_loss(sam, batch)
    for _ in range(40):
        loss, _ = train_tiny_sam.compute_loss(sam, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sam.mask_decoder.iou_prediction_head.layers[-1].weight.grad.abs().sum() > 0  # IoU head is trained
    last, _ = train_tiny_sam.compute_loss(sam, batch)
    assert last.item() < 0.7 * first.item()


def test_flip_augmentation_keeps_boxes_on_masks(data: Path) -> None:
    split = train_tiny_sam.load_split(data, "train")
    rng = np.random.default_rng(1)
    for item in train_tiny_sam.make_batch(split, list(range(12)), rng, 8, augment=True):
        for box, mask in zip(item["boxes"], item["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert (box - tight).abs().max() <= 4.0  # only the bounded jitter separates them


def test_evaluate_scores_perfect_and_empty_predictions(data: Path, monkeypatch) -> None:
    split = train_tiny_sam.load_split(data, "val")
    sam = build_tiny_sam(**TINY)
    gt = {tuple(b.ravel().tolist()): m for b, m in zip(split.boxes, split.masks)}

    def oracle(_sam, images, boxes):
        masks = torch.from_numpy(gt[tuple(boxes[0].numpy().ravel().tolist())]).float() * 20 - 10
        return [(masks, torch.ones(len(masks)))]

    monkeypatch.setattr(train_tiny_sam, "predict", oracle)
    assert train_tiny_sam.evaluate(sam, split)["mAP"] == 100.0
    monkeypatch.setattr(train_tiny_sam, "predict", lambda s, i, b: [(-torch.ones(len(b[0]), 64, 64),
                                                                     torch.ones(len(b[0])))])
    assert train_tiny_sam.evaluate(sam, split)["mAP"] == 0.0


def test_cli_saves_official_layout_reloads_and_resumes(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt" / "tiny.pth"
    common = ["--data", str(data), "--threads", "1", "--batch-size", "2", "--boxes-per-image", "3",
              "--minutes", "2", "--warmup-steps", "2"]
    first = [*common, "--out", str(out), "--steps", "3", "--build-args", json.dumps(TINY)]
    assert train_tiny_sam.main(first) == 0
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert "image_encoder.blocks.0.attn.qkv.weight" in state
    assert all(v.dtype == torch.float32 for v in state.values())
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["steps"] == 3 and side["storage_dtype"] == "float32"
    assert side["build_args"] == {**side["build_args"], **TINY} and "decoder_depth" in side["build_args"]
    assert 0.0 <= side["val_segm_oracle_boxes"]["mAP"] <= 100.0
    sam = build_tiny_sam(**side["build_args"], checkpoint=out)
    assert all(torch.equal(state[k], v) for k, v in sam.state_dict().items())

    out2 = tmp_path / "resumed.pth"
    assert train_tiny_sam.main([*common, "--out", str(out2), "--steps", "5", "--resume", str(out)]) == 0
    side2 = json.loads(out2.with_suffix(".json").read_text())
    assert side2["steps"] == 5 and [h["step"] for h in side2["history"]] == [3, 5]
    resumed = torch.load(out2, map_location="cpu", weights_only=True)
    assert any(not torch.equal(state[k], resumed[k]) for k in state)


def test_unknown_build_argument_is_rejected(data: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        train_tiny_sam.main(["--data", str(data), "--out", str(tmp_path / "x.pth"),
                             "--build-args", '{"dpth": 3}'])
    assert err.value.code == 2 and not (tmp_path / "x.pth").exists()


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="make_demo_data"):
        train_tiny_sam.main(["--data", str(tmp_path), "--out", str(tmp_path / "x.pth"), "--steps", "1"])
    assert not (tmp_path / "x.pth").exists()
