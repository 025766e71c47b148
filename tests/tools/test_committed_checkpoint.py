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
