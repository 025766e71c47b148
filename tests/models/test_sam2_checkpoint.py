"""SAM 2.1 configs and sam2's checkpoint format ({"model": state_dict}): loading, size inference, errors.

Full-size models are instantiated with their parameters on the meta device (no memory, no init cost), so
the config <-> state-dict shape inference is checked for all four sizes without a forward pass; real
save/load round trips use reduced builds of the same structure.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from ahcq.models.sam2_checkpoint import (
    SAM2_CONFIGS,
    SAM2_TRUNKS,
    build_sam2_model,
    config_trunk,
    infer_sam2_size,
    infer_trunk,
    load_sam2,
    reduced_overrides,
    resolve_config,
)

SMALL = reduced_overrides(image_size=128)
FULL_PARAMS = {"t": 38_962_754, "s": 46_060_610, "b+": 80_850_434, "l": 224_446_898}


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lives on the meta device (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def full_size_state_dict(size: str) -> dict[str, torch.Tensor]:
    cfg = compose(config_name=SAM2_CONFIGS[size])
    OmegaConf.resolve(cfg)
    with parameters_on_meta():
        model = instantiate(cfg.model, _recursive_=True)
    return model.state_dict()


@pytest.mark.parametrize("size", ["t", "s", "b+", "l"])
def test_full_size_configs_and_state_dicts_agree(size: str) -> None:
    state_dict = full_size_state_dict(size)
    assert sum(t.numel() for t in state_dict.values()) == FULL_PARAMS[size]
    assert infer_trunk(state_dict) == config_trunk(size) == SAM2_TRUNKS[size]
    assert infer_sam2_size(state_dict) == size


def test_sizes_and_aliases_resolve_to_sam2_configs() -> None:
    assert resolve_config("base_plus") == resolve_config("b+") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert resolve_config("configs/sam2/sam2_hiera_l.yaml") == "configs/sam2/sam2_hiera_l.yaml"
    assert config_trunk("configs/sam2/sam2_hiera_s.yaml") == SAM2_TRUNKS["s"]
    with pytest.raises(ValueError, match="unknown SAM2 size or config 'xl'"):
        resolve_config("xl")


def save_checkpoint(model: nn.Module, path) -> None:
    torch.save({"model": model.state_dict()}, path)


def test_round_trip_in_sam2_format(tmp_path) -> None:
    torch.manual_seed(0)
    source = build_sam2_model("t", SMALL)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    save_checkpoint(source, path)
    torch.manual_seed(1)
    loaded = load_sam2("tiny", path, overrides=SMALL)
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        features = loaded.image_encoder(x)["vision_features"]
        assert torch.equal(features, source.image_encoder(x)["vision_features"])
    predictor = load_sam2("t", path, overrides=SMALL, video=True)
    assert type(predictor).__name__ == "SAM2VideoPredictor"


def test_checkpoint_of_another_size_is_refused_naming_both(tmp_path) -> None:
    path = tmp_path / "small.pt"
    save_checkpoint(build_sam2_model("s", SMALL), path)
    with pytest.raises(ValueError) as err:
        load_sam2("t", path, overrides=SMALL)
    message = str(err.value)
    assert "small.pt holds" in message and "stages [1, 2, 11, 2]" in message
    assert "config 't' builds" in message and "stages [1, 2, 7, 2]" in message


def test_truncated_full_size_state_dict_is_none_of_the_sizes() -> None:
    state_dict = full_size_state_dict("s")
    truncated = {k: v for k, v in state_dict.items() if ".trunk.blocks.15." not in k}
    with pytest.raises(ValueError, match=r"stages \[1, 2, 11, 1\]\), which is none of the SAM 2.1 sizes"):
        infer_sam2_size(truncated, "truncated")


def test_bad_checkpoints_get_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_sam2("t", tmp_path / "missing.pt")
    model = build_sam2_model("t", SMALL)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(ValueError, match=r"plain.pt is not in sam2's format \{'model': state_dict\}"):
        load_sam2("t", plain, overrides=SMALL)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt could not be read"):
        load_sam2("t", garbage)
    no_trunk = tmp_path / "no_trunk.pt"
    torch.save({"model": {"sam_mask_decoder.iou_token.weight": torch.zeros(1, 4)}}, no_trunk)
    with pytest.raises(ValueError, match="not a SAM2 state dict"):
        load_sam2("t", no_trunk)
    wider = tmp_path / "wider.pt"
    save_checkpoint(build_sam2_model("t", reduced_overrides(image_size=128, d_model=48)), wider)
    with pytest.raises(ValueError, match=r"wider.pt does not match config 't': \d+ shape mismatches: "
                       r"no_mem_embed \[1, 1, 48\] \(model \[1, 1, 32\]\)"):
        load_sam2("t", wider, overrides=SMALL)
    extra = tmp_path / "extra.pt"
    torch.save({"model": {**model.state_dict(), "head.weight": torch.zeros(2)}}, extra)
    with pytest.raises(ValueError, match="1 unexpected keys: head.weight"):
        load_sam2("t", extra, overrides=SMALL)
