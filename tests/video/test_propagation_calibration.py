"""Video calibration: seeded clip selection, quantizers observing real tracking, recorded component calls."""
from __future__ import annotations

import pytest
import torch
from test_propagation import TINY

from ahcq.models.sam2 import quantize_sam2
from ahcq.models.sam2_checkpoint import build_sam2_model
from ahcq.quantization import api
from ahcq.quantization.config import parse_qconfig
from ahcq.quantization.quantizers import Mode
from ahcq.seeding import calibration_indices
from ahcq.solver.calibration import calibrate
from ahcq.solver.recon.sam2 import record_calls, tracking
from ahcq.video import read_sav
from ahcq.video.calibration import CalibrationClip, select_clips, track_clip
from ahcq.video.fixtures import make_moving_shapes_clip
from ahcq.video.propagation import DEFAULT_TRACKING

W8A8 = {"a_qconfig": {"bit": 8}, "w_qconfig": {"bit": 8, "quantizer": "fixed", "observer": "minmax"},
        "recon": {"enabled": False}}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = tmp_path_factory.mktemp("calib")
    for v in range(4):
        make_moving_shapes_clip(root, "sav", n_frames=4, size=(64, 80), n_objects=2, seed=20 + v,
                                video=f"c{v}")
    return read_sav(root)


def test_clip_selection_is_seeded_and_validated(samples) -> None:
    clips = select_clips(samples, 2, 3, seed=5)
    assert [c.sample.name for c in clips] == [samples[i].name for i in calibration_indices(5, 4, 2)]
    assert clips == select_clips(samples, 2, 3, seed=5) and all(c.frames == 3 for c in clips)
    assert {tuple(c.sample.name for c in select_clips(samples, 2, 3, seed=s)) for s in range(8)} != {
        tuple(c.sample.name for c in clips)}
    with pytest.raises(ValueError, match="cannot draw 5 calibration videos from a dataset of 4"):
        select_clips(samples, 5, 3, seed=0)
    with pytest.raises(ValueError, match="at least 1 tracked frame"):
        select_clips(samples, 1, 0, seed=0)


def test_record_calls_sees_every_tracked_frame_of_every_object(samples) -> None:
    torch.manual_seed(0)
    predictor = build_sam2_model("t", TINY, video=True)
    clip = CalibrationClip(samples[0], frames=2)
    drive = tracking(predictor, [clip], DEFAULT_TRACKING)
    memory = record_calls(predictor.memory_attention, drive, outputs=True)
    decoder = record_calls(predictor.sam_mask_decoder, drive, outputs=False)
    # 2 objects: memory attention runs on the tracked frames 1 and 2; the decoder on frame 0 too, where the
    # GT mask is the output but the decoder still makes the object pointer
    assert len(memory) == 4 and len(decoder) == 6 and all(out is None for _, out in decoder)
    (args, kwargs), recorded = memory[1]
    assert not args and not any(t.is_inference() for t in kwargs["curr"])
    with torch.no_grad():
        out = predictor.memory_attention(*args, **kwargs)
    assert out.requires_grad is False and out.shape[0] == kwargs["curr"][0].shape[0]
    torch.testing.assert_close(out, recorded, atol=0, rtol=0)  # the same call gives the recorded output


def test_calibration_finalizes_every_quantizer_on_tracking(samples) -> None:
    torch.manual_seed(0)
    predictor = build_sam2_model("t", TINY, video=True)
    quantize_sam2(predictor, parse_qconfig(W8A8))
    qconfig = parse_qconfig(W8A8)
    track = lambda clip: track_clip(predictor, clip)  # noqa: E731
    report = calibrate(predictor, select_clips(samples, 1, 1, seed=0), track, qconfig, big=[])
    quantizers = dict(api.iter_quantizers(predictor))
    assert report.passes == 1 and all(bool(q.calibrated) for q in quantizers.values())
    assert any(n.startswith("memory_attention.") for n in quantizers)
    assert any(n.startswith("memory_encoder.") for n in quantizers)
    assert all(q.mode is Mode.OFF for q in quantizers.values())  # calibrating() restores the modes
    with pytest.raises(ValueError, match="at least one calibration image"):
        calibrate(predictor, [], track, qconfig)
