"""SAM builders selected by ``sam=dict(type=...)``: weights round-trip, variants' structure, named errors."""

from __future__ import annotations

import json

import pytest
import torch
from plugin_helpers import SMALL_SAM, small_sam

from projects.instance_segment_anything import SAM_BUILDERS


def test_tiny_sam_loads_the_weights_it_is_given(tmp_path):
    reference = small_sam(seed=3)
    path = tmp_path / "tiny.pth"
    torch.save(reference.state_dict(), path)
    loaded = SAM_BUILDERS.build(dict(type="TinySAM", checkpoint=str(path), **SMALL_SAM))
    random = SAM_BUILDERS.build(dict(type="TinySAM", checkpoint=None, **SMALL_SAM))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not all(torch.equal(random.state_dict()[n], t) for n, t in reference.state_dict().items())


def test_tiny_sam_takes_its_sizes_from_the_checkpoints_sidecar(tmp_path):
    reference = small_sam(seed=4)
    path = tmp_path / "tiny_sam.pth"
    torch.save(reference.state_dict(), path)
    with pytest.raises(ValueError, match="is not a tiny SAM of these sizes"):  # default sizes do not fit
        SAM_BUILDERS.build(dict(type="TinySAM", checkpoint=str(path)))
    path.with_suffix(".json").write_text(json.dumps({"build_args": SMALL_SAM, "seed": 4}))
    loaded = SAM_BUILDERS.build(dict(type="TinySAM", checkpoint=str(path)))
    assert loaded.image_encoder.img_size == 64
    assert torch.equal(loaded.mask_decoder.iou_token.weight, reference.mask_decoder.iou_token.weight)


def test_random_sam_has_the_variants_structure():
    sam = SAM_BUILDERS.build(
        dict(type="RandomSAM", model_type="vit_l", img_size=64, embed_dim=32, num_heads=2, depth=24)
    )
    assert sam.image_encoder.img_size == 64 and len(sam.image_encoder.blocks) == 24
    global_blocks = [i for i, b in enumerate(sam.image_encoder.blocks) if b.window_size == 0]
    assert global_blocks == [5, 11, 17, 23]


def test_missing_weights_are_named(tmp_path):
    for cfg in (
        dict(type="OfficialSAM", model_type="vit_b", checkpoint=str(tmp_path / "sam_vit_b.pth")),
        dict(type="TinySAM", checkpoint=str(tmp_path / "sam_vit_b.pth")),
    ):
        with pytest.raises(FileNotFoundError, match="sam_vit_b.pth"):
            SAM_BUILDERS.build(cfg)
