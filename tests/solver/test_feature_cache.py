"""The feature cache: bit-exact encoder inputs, keys that follow the inputs, the prompt source run once."""
from __future__ import annotations

import os
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from PIL import Image
from tool_loader import load_tool

from ahcq.data.shapes import CATEGORIES
from ahcq.models.sam_runner import SamImage, prepare_image
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.solver.evaluation import build_split, pipeline_items
from ahcq.solver.feature_cache import (
    CacheStats,
    FeatureCache,
    _pack_image,
    _unpack_image,
    module_fingerprint,
    run_key,
)
from projects.instance_segment_anything import DetWrapperInstanceSAM, GTBoxPrompt

REPO = Path(__file__).resolve().parents[2]
make_demo_data = load_tool("make_demo_data")


class CountingPrompt(GTBoxPrompt):
    """Ground-truth boxes, counting the images it is asked about."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, image_bgr: np.ndarray, img_meta: dict):
        self.calls += 1
        return super().forward(image_bgr, img_meta)


def _sam():
    torch.manual_seed(0)
    return build_tiny_sam(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                          global_attn_indexes=(1,), out_chans=32, decoder_depth=1, decoder_heads=2,
                          decoder_mlp_dim=64, iou_head_hidden_dim=32)


@pytest.fixture
def setup(tmp_path: Path):
    make_demo_data.generate(tmp_path / "demo", seed=2, num_train=1, num_val=3, size=48)
    ann = str(tmp_path / "demo/annotations/instances_val.json")
    prefix = str(tmp_path / "demo/val") + os.sep
    prompt = CountingPrompt(ann, classes=CATEGORIES)
    model = DetWrapperInstanceSAM(sam=_sam(), prompt=prompt, num_classes=len(CATEGORIES)).eval()
    base = mmcv.Config.fromfile(str(REPO / "projects/configs/_base_/coco_instance_sam.py"))
    dataset = build_split(dict(base.data.test, ann_file=ann, img_prefix=prefix, classes=CATEGORIES))
    return model, dataset, tmp_path


def test_encoder_input_round_trips_bit_for_bit():
    sam = _sam()
    rng = np.random.default_rng(0)
    image = prepare_image(sam, rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    packed = _pack_image(sam, image)
    assert "pixels" in packed and packed["pixels"].dtype == torch.uint8
    assert torch.equal(_unpack_image(sam, packed).tensor, image.tensor)
    odd = torch.zeros(1, 3, 64, 64)
    odd[..., :30, :50] = torch.rand(1, 3, 30, 50)  # not the normalisation of any uint8 image
    packed = _pack_image(sam, SamImage(odd, (30, 50), (30, 50)))
    assert "normalized" in packed
    assert torch.equal(_unpack_image(sam, packed).tensor, odd)


def test_run_key_follows_config_and_referenced_files(tmp_path: Path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    config = {"model": {"sam": {"checkpoint": str(ckpt)}, "box_chunk": 4}, "data": {"x": 1}}
    key = run_key(config)
    assert run_key(dict(config)) == key
    assert run_key({**config, "data": {"x": 2}}) != key
    (tmp_path / "unrelated.txt").write_text("not named by the config")
    assert run_key(config) == key
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert run_key(config) != key


def test_prepare_runs_the_prompt_source_once_per_image(setup):
    model, dataset, tmp = setup
    cache = FeatureCache(tmp / "cache", "run")
    first = CacheStats()
    keys = cache.prepare(model, pipeline_items(dataset, range(len(dataset))), first)
    assert (first.hits, first.misses, model.prompt.calls) == (0, 3, 3)
    again = CacheStats()
    assert cache.prepare(model, pipeline_items(dataset, range(len(dataset))), again) == keys
    assert (again.hits, again.misses, model.prompt.calls, again.status) == (3, 0, 3, "hit")
    img, meta = next(pipeline_items(dataset, [1]))
    (direct,) = model.prepare(img[None], [meta])
    loaded = cache.load(model.sam, keys[1])
    assert loaded.filename == meta["filename"]
    assert torch.equal(loaded.sample.image.tensor, direct.image.tensor)
    assert torch.equal(loaded.sample.prompts.boxes, direct.prompts.boxes)
    assert loaded.sample.image.original_size == direct.image.original_size
    assert not [p for p in (tmp / "cache").rglob(".*")]  # no temporary file left behind


def test_a_changed_image_is_prepared_again(setup):
    model, dataset, tmp = setup
    cache = FeatureCache(tmp / "cache", "run")
    keys = cache.prepare(model, pipeline_items(dataset, range(len(dataset))), CacheStats())
    path = Path(dataset.data_infos[0]["filename"])
    path = Path(dataset.img_prefix) / path
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    stats = CacheStats()
    new_keys = cache.prepare(model, pipeline_items(dataset, range(len(dataset))), stats)
    assert (stats.hits, stats.misses, stats.status) == (2, 1, "partial")
    assert new_keys[0] != keys[0] and new_keys[1:] == keys[1:]


def test_float_embedding_is_cached_per_encoder_weights(setup):
    model, dataset, tmp = setup
    encoder = model.sam.image_encoder
    cache = FeatureCache(tmp / "cache", "run", module_fingerprint(encoder))
    keys = cache.prepare(model, pipeline_items(dataset, [0]), CacheStats())
    cached = cache.load(model.sam, keys[0])
    assert not cache.has_embeddings(keys, model.sam.device)
    with torch.no_grad():
        expected = encoder(cached.sample.image.tensor)
    assert torch.equal(cache.embedding(model.sam, cached), expected)
    assert cache.has_embeddings(keys, model.sam.device)
    assert torch.equal(cache.embedding(model.sam, cached), expected)
    with torch.no_grad():
        encoder.neck[0].weight.mul_(-1)  # other weights, same files: a random init with another seed
        changed = encoder(cached.sample.image.tensor)
    other = FeatureCache(tmp / "cache", "run", module_fingerprint(encoder))
    assert not other.has_embeddings(keys, model.sam.device)
    assert torch.equal(other.embedding(model.sam, cached), changed)


def test_module_fingerprint_tells_weights_apart():
    a, b = _sam(), _sam()
    assert module_fingerprint(a) == module_fingerprint(b)
    with torch.no_grad():
        b.mask_decoder.iou_token.weight[0, 0] += 1e-3
    assert module_fingerprint(a) != module_fingerprint(b)
    assert run_key({"model": {}}, module_fingerprint(a)) != run_key({"model": {}}, module_fingerprint(b))
