"""Activation cache, item cap/chunks, capture of multi-input units, and the seeded streams."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from ahcq.quantization.api import (
    QuantSpec,
    assert_fully_quantized,
    build_quantizer,
    calibrating,
    quantization_disabled,
    quantize,
)
from ahcq.quantization.granularity import PerChannel
from ahcq.quantization.layers import QuantMatMul
from ahcq.quantization.quantizers import Role
from ahcq.seeding import (
    calibration_indices,
    capture_rng_state,
    restore_rng_state,
    seed_everything,
    stream,
)
from ahcq.solver.recon import ReconSettings, reconstruct, units_from_names
from ahcq.solver.recon.cache import ActivationCache, CacheKey, Entry, ItemPlan, compact_copy, nbytes
from ahcq.solver.recon.capture import capture

D, TOKENS, PIXELS = 8, 3, 20


def test_compact_copy_keeps_broadcast_dims_small(tmp_path):
    base = torch.randn(1, PIXELS, D)
    expanded = base.expand(50, PIXELS, D)
    copy = compact_copy(expanded)
    assert torch.equal(copy, expanded) and nbytes(copy) == base.numel() * 4
    cache = ActivationCache(0, tmp_path)
    cache.put("k", (expanded, {"side": 3}))
    loaded, side = cache.get("k")
    assert torch.equal(loaded, expanded) and side == {"side": 3}
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 50 * PIXELS * D * 4 / 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("budget", [2**20, 0])  # in memory, spilled to disk
def test_narrow_storage_halves_the_cache_and_returns_float32(tmp_path, dtype, budget):
    base = torch.randn(1, PIXELS, D)
    wide = torch.randn(4, PIXELS, D) * 1e6  # beyond float16's range: stored as float32 under float16
    nan = torch.randn(4, D)
    nan[0, 0] = float("nan")
    codes = torch.arange(6)
    cache = ActivationCache(budget, tmp_path, dtype)
    cache.put("k", ((base.expand(50, PIXELS, D), wide), {"nan": nan, "codes": codes}))
    (loaded, loaded_wide), side = cache.get("k")
    assert loaded.dtype == torch.float32 and loaded.stride(0) == 0  # still one broadcast copy
    assert torch.equal(loaded[7], base[0].to(dtype).float()) and not torch.equal(loaded[7], base[0])
    if dtype == torch.float16:
        assert torch.equal(loaded_wide, wide)
    else:
        assert torch.equal(loaded_wide, wide.to(dtype).float())
    assert torch.equal(side["nan"].isnan(), nan.isnan()) and torch.equal(side["nan"][1:], nan[1:])  # float32
    assert torch.equal(side["codes"], codes)
    narrow_bytes = base.numel() * 2 + wide.numel() * (4 if dtype == torch.float16 else 2)
    stored = cache.memory_bytes if budget else cache.spilled_bytes
    assert stored == narrow_bytes + nan.numel() * 4 + codes.numel() * 8
    with pytest.raises(ValueError, match="storage_dtype"):
        ActivationCache(0, tmp_path, torch.float64)
    with pytest.raises(ValueError, match="cache_dtype"):
        ReconSettings(cache_dtype="int8")


def test_cache_budget_spills_and_cleans_up(tmp_path):
    cache = ActivationCache(3 * 400, tmp_path)
    values = {i: torch.randn(100) for i in range(5)}
    for i, v in values.items():
        cache.put(i, v)
    assert cache.memory_bytes == 1200 and cache.spilled_bytes == 800 and len(list(tmp_path.iterdir())) == 2
    assert all(torch.equal(cache.get(i), v) for i, v in values.items())
    cache.pop(4)
    assert 4 not in cache and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(KeyError):
        cache.get(4)
    cache.close()
    assert len(cache) == 0 and not any(tmp_path.iterdir())


def test_item_plan_caps_with_a_seeded_subset_and_chunks_in_order():
    x = torch.arange(30.0).reshape(10, 3)
    side = torch.ones(1, 3).expand(10, 3)
    plan = ItemPlan(seed=4, max_items=7, chunk_items=3)
    chunks = plan.split((x, side, "tag"), sample=2, n_items=10)
    kept = plan.kept(2, 10)
    assert torch.equal(kept, ItemPlan(seed=4, max_items=7).kept(2, 10))
    assert kept.numel() == 7 and torch.equal(kept, kept.sort().values) and kept.unique().numel() == 7
    assert [c[0].shape[0] for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([c[0] for c in chunks]), x[kept])
    assert all(c[1].stride(0) == 0 and c[2] == "tag" for c in chunks)
    assert not torch.equal(kept, ItemPlan(seed=5, max_items=7).kept(2, 10))
    assert len(ItemPlan(chunk_items=4).split(x, 0, 10)) == 3


class CrossAttention(nn.Module):
    """Token→image attention of a box-prompted decoder: queries per box, keys/values per image."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.scores = QuantMatMul()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        logits = self.scores(self.q_proj(q), self.k_proj(k).transpose(-2, -1)) / D**0.5
        return q + self.out_proj(logits.softmax(dim=-1) @ self.v_proj(v))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttention() for _ in range(2))

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        keys = image.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            tokens = layer(tokens, keys, v=keys)
        return tokens


def decoder_samples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, TOKENS, D, generator=g), torch.randn(1, PIXELS, D, generator=g))
            for n in (9, 5, 7)]


def make_decoder() -> Decoder:
    torch.manual_seed(0)
    model = Decoder()
    act = QuantSpec(bits=4)
    quantize(model, act, QuantSpec(quantizer="adaround", observer="mse", bits=4, granularity=PerChannel(0)))
    for i, layer in enumerate(model.layers):
        layer.scores.a_quantizer = build_quantizer(act, Role.QUERY, f"layers.{i}.scores.a_quantizer")
        layer.scores.b_quantizer = build_quantizer(act, Role.KEY, f"layers.{i}.scores.b_quantizer")
    with torch.no_grad(), calibrating(model):
        for sample in decoder_samples():
            model(*sample)
    return model


def test_capture_caps_chunks_and_keeps_image_keys_compact():
    model = make_decoder()
    units = units_from_names(model, ["layers.0", "layers.1"])
    plan = ItemPlan(seed=1, max_items=6, chunk_items=4)
    with ActivationCache(2**30) as cache:
        index = capture(model, units, decoder_samples(), lambda m, s: m(*s), cache, plan, progress=False)
        assert index.qin_is_fin
        assert [index.chunks[(0, s)] for s in range(3)] == [2, 2, 2]
        tokens, image = decoder_samples()[0]
        kept = plan.kept(0, 9)
        (q, k), kwargs = cache.get(CacheKey(Entry.FLOAT_IN, 0, 0, 0))
        assert torch.equal(q, tokens[kept][:4]) and k.stride(0) == 0 and torch.equal(k[0], image[0])
        assert kwargs["v"].stride(0) == 0
        with torch.no_grad(), quantization_disabled(model):
            keys = image.expand(6, -1, -1)
            out = model.layers[0](tokens[kept], keys, v=keys)
        assert torch.equal(cache.get(CacheKey(Entry.FLOAT_OUT, 0, 0, 1))[0], out[4:])
        assert torch.equal(cache.get(CacheKey(Entry.FLOAT_IN, 1, 0, 1))[0][0], out[4:])
        assert nbytes(cache.get(CacheKey(Entry.FLOAT_IN, 1, 2, 0))) < 2 * 4 * PIXELS * D * 4


def test_decoder_reconstruction_with_capped_chunked_boxes():
    model = make_decoder()
    units = units_from_names(model, ["layers.0", "layers.1"])
    settings = ReconSettings(iters=6, drop_prob=0.5, max_items=6, chunk_items=4)
    result = reconstruct(model, units, decoder_samples(), settings, progress=False)
    assert [r.steps for r in result.reports] == [6, 6]
    assert_fully_quantized(model)


def test_streams_are_seeded_and_independent():
    a = torch.rand(4, generator=stream(0, "qdrop", 1))
    assert torch.equal(a, torch.rand(4, generator=stream(0, "qdrop", 1)))
    assert not torch.equal(a, torch.rand(4, generator=stream(0, "qdrop", 2)))
    assert not torch.equal(a, torch.rand(4, generator=stream(1, "qdrop", 1)))
    assert not torch.equal(a, torch.rand(4, generator=stream(0, "batches", 1)))
    with pytest.raises(ValueError):
        stream(-1, "qdrop")


def test_calibration_indices_are_seeded_distinct_and_sorted():
    idx = calibration_indices(3, 100, 32)
    assert idx == calibration_indices(3, 100, 32) and idx == sorted(set(idx)) and len(idx) == 32
    assert idx != calibration_indices(4, 100, 32)
    with pytest.raises(ValueError):
        calibration_indices(0, 10, 11)


def test_rng_state_round_trip(tmp_path):
    seed_everything(7)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
