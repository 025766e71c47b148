"""The committed testbed checkpoint loads strictly and scores on the regenerated demo val set as recorded."""
import json
from pathlib import Path

import pytest
from tool_loader import load_tool

from ahcq.models.tiny_sam import build_tiny_sam

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "ckpt" / "tiny_sam.pth"
# make_demo_data.py defaults, the set the checkpoint was trained and scored on (ckpt/README.md)
DEMO_SEED, DEMO_VAL, DEMO_SIZE = 0, 200, 128

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.skipif(not CKPT.is_file(), reason="ckpt/tiny_sam.pth is not committed"),
]



def test_committed_checkpoint_scores_as_recorded(tmp_path):
    sidecar = json.loads(CKPT.with_suffix(".json").read_text())
    assert CKPT.stat().st_size <= 10 * 2**20
    sam = build_tiny_sam(**sidecar["build_args"], checkpoint=CKPT)
    make_demo_data, train_tiny_sam = load_tool("make_demo_data"), load_tool("train_tiny_sam")
    make_demo_data.generate(tmp_path, seed=DEMO_SEED, num_train=0, num_val=DEMO_VAL, size=DEMO_SIZE)
    scores = train_tiny_sam.evaluate(sam, train_tiny_sam.load_split(tmp_path, "val"))
    recorded = sidecar["val_segm_oracle_boxes"]
    assert scores["mAP"] == pytest.approx(recorded["mAP"], abs=0.5)
    assert scores["AP50"] == pytest.approx(recorded["AP50"], abs=0.5)


CKPT2 = ROOT / "ckpt" / "tiny_sam2.pt"
VIDEO_CONFIG = ROOT / "projects" / "configs" / "sam2" / "tiny_sam2.yaml"


@pytest.mark.skipif(not CKPT2.is_file(), reason="ckpt/tiny_sam2.pt is not committed")
def test_committed_sam2_checkpoint_tracks_as_recorded(tmp_path):
    """The SAM2 testbed loads strictly through the run config's model section and tracks the regenerated val
    clips (make_demo_videos.py defaults, seed 0) to the J&F its sidecar records, both protocols."""
    from ahcq.models.sam2_checkpoint import load_sam2, run_overrides
    from ahcq.video import evaluate, read_dataset
    from ahcq.video.propagation import predict_videos
    from ahcq.yaml_schema import expand_env, read_yaml

    sidecar = json.loads(CKPT2.with_suffix(".json").read_text())
    assert CKPT2.stat().st_size <= 10 * 2**20
    model = expand_env(read_yaml(VIDEO_CONFIG))["model"]
    assert model == sidecar["model"]
    make_demo_videos = load_tool("make_demo_videos")
    spec = make_demo_videos.ClipSpec()
    make_demo_videos.generate_split(tmp_path, "val", sidecar["val"]["videos"], DEMO_SEED, spec)
    predictor = load_sam2(model["config"], CKPT2, run_overrides(model), video=True)
    samples = read_dataset(tmp_path / "val", "sav", "val")
    report = evaluate(samples, predict_videos(predictor, samples, progress=False)).as_dict()
    for key in ("official/J&F", "ahcq/J&F"):
        assert report[key] == pytest.approx(sidecar["val"][key], abs=0.5)
