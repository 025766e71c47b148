"""The fused CPU kernels (ahcq.quantization.native) give the bits of the torch-op paths they replace.

References: torch's own fake-quant ops (uniform), the torch-op encoders evaluated on every float32 next to
each code threshold (the table kernel), the public fake-quants with the kernels switched off, and a whole
quantized Hiera-T encoder run both ways.
"""
from __future__ import annotations

import pytest
import torch
from tool_loader import load_tool

from ahcq.quantization import native
from ahcq.quantization import primitives as P
from ahcq.quantization.primitives import engine
from ahcq.quantization.primitives import hluq as H
from ahcq.quantization.primitives import log as L

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: kernels not built")

N = 3 * 70001  # above native.MIN_ELEMENTS, not a multiple of a block or of a thread's share


@pytest.fixture
def torch_ops(monkeypatch):
    """Switch the kernels off for the calls made inside the test (the torch-op reference paths)."""

    def switch() -> None:
        monkeypatch.setattr(native, "library", lambda: None)

    return switch


def neighbours(t: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """Every float32 within ``steps`` ulps of each finite entry of ``t``."""
    t = t[torch.isfinite(t)]
    out, below, above = [t], t, t
    for _ in range(steps):
        below = torch.nextafter(below, torch.tensor(float("-inf")))
        above = torch.nextafter(above, torch.tensor(float("inf")))
        out += [below, above]
    return torch.cat(out)


def padded(values: torch.Tensor, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """``values`` at the start of a random tensor of ``N`` elements (so the kernel path is taken)."""
    x = torch.randn(N, generator=generator) * scale
    x[: values.numel()] = values
    return x


def test_uniform_kernel_matches_torch_fake_quantize(generator) -> None:
    scale, zp = torch.tensor(0.0371), torch.tensor(3)
    grid = torch.arange(-12, 20, dtype=torch.float32) * scale
    x = padded(neighbours(torch.cat([grid, grid + scale / 2])), generator, 0.4)
    expected = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), -8, 7)
    got = P.fake_quant_uniform(x, scale, zp.float(), -8, 7)
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())  # +0.0, as torch


def test_uniform_rows_kernel_matches_torch_per_channel(generator) -> None:
    channels = 96
    scale = torch.rand(channels, generator=generator) * 0.1 + 0.01
    zp = torch.randint(-3, 4, (channels,), generator=generator, dtype=torch.int32)
    x = torch.randn(N // channels, channels, generator=generator) * 0.3
    x[:4] = (torch.arange(4).view(-1, 1) - 1.5) * scale  # ties at half steps
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, -8, 7)
    got = P.fake_quant_uniform(x, scale.requires_grad_(), zp.float(), -8, 7, axis=-1).detach()
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())


def test_code_thresholds_are_the_least_inputs_reaching_each_code() -> None:
    encode = H._hluq_encoder(torch.tensor(-0.2), torch.tensor(0.05), torch.tensor(0.1), 4, 4)
    thresholds = native.code_thresholds(encode, 16)
    below = torch.nextafter(thresholds, torch.tensor(float("-inf")))
    codes = torch.arange(1, 16, dtype=torch.float32)
    probe = torch.zeros(native._PROBE)
    for values, reached in ((thresholds, True), (below, False)):
        probe[:15] = values
        assert torch.equal(encode(probe, torch.empty_like(probe))[:15] >= codes, torch.full((15,), reached))


def test_unreachable_codes_get_nan_thresholds_and_are_never_produced(generator) -> None:
    def encode(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # codes 0..5 of 8
        return torch.round(x, out=out).clamp_(0, 5)

    thresholds = native.code_thresholds(encode, 8)
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5])  # round half to even: 1.5 and 3.5 go up, the others down
    above = torch.nextafter(halves, torch.tensor(9.0))
    assert torch.equal(thresholds[:5], torch.where(torch.tensor([1, 0, 1, 0, 1]).bool(), above, halves))
    assert thresholds[5:].isnan().all()
    x = torch.randn(N, generator=generator) * 10
    x[:3] = torch.tensor([float("inf"), 5.5, 4.5])
    y = native.table(x, thresholds, torch.arange(8, dtype=torch.float32))
    assert torch.equal(y, encode(x, torch.empty_like(x)))


@pytest.mark.parametrize("family", ["hluq", "lnq", "agq"])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_table_kernel_equals_the_torch_encoder_at_every_threshold(family, bits, generator) -> None:
    if family == "hluq":
        params = (torch.tensor(-0.17), torch.tensor(0.031), torch.tensor(0.09), 2 ** (bits - 1), bits)
        encode, decode = H._hluq_encoder(*params), H._decode_hluq
        level_args, key = params[:4], H._hluq_key(*params)
        fake_quant, quantize, dequantize = P.fake_quant_hluq, P.quantize_hluq, P.dequantize_hluq
    elif family == "lnq":
        params = (torch.tensor(0.8), torch.tensor(30.0), bits)
        encode, decode, level_args, key = L._lnq_encoder(*params), L._decode_lnq, params, L._lnq_key(*params)
        fake_quant, quantize, dequantize = P.fake_quant_lnq, P.quantize_lnq, P.dequantize_lnq
    else:
        params = (torch.tensor(0.9), 2.0, bits)
        encode, decode, level_args, key = L._agq_encoder(*params), L._decode_agq, params, L._agq_key(*params)
        fake_quant, quantize, dequantize = P.fake_quant_agq, P.quantize_agq, P.dequantize_agq
    levels = engine.decode_table(decode, bits, torch.device("cpu"), *level_args)
    thresholds = engine.native_thresholds(torch.empty(N), key, encode, levels)
    x = padded(neighbours(torch.cat([thresholds, levels]), 3), generator, 0.5)
    got = fake_quant(x, *params)
    sliced = engine.sliced(lambda part, out: engine.lookup(levels, encode(part, out), into=out), x)
    assert torch.equal(got, sliced)
    assert torch.equal(got, dequantize(quantize(x, *params), *params))


def test_layouts_keep_and_threads_give_the_same_bits(generator) -> None:
    x_min, s1, s2 = torch.tensor(-0.2), torch.tensor(0.04), torch.tensor(0.11)
    wide = torch.randn(64, 96, 3 * 24, generator=generator)
    reference = P.fake_quant_hluq(wide.contiguous(), x_min, s1, s2, 8, 4)
    transposed = P.fake_quant_hluq(wide.transpose(0, 1), x_min, s1, s2, 8, 4)
    assert transposed.stride() == wide.transpose(0, 1).stride()  # the input's layout is kept
    assert torch.equal(transposed, reference.transpose(0, 1))
    strided = P.fake_quant_hluq(wide[..., :24], x_min, s1, s2, 8, 4)
    assert torch.equal(strided, P.fake_quant_hluq(wide[..., :24].contiguous(), x_min, s1, s2, 8, 4))
    keep = torch.rand(wide.shape, generator=generator) < 0.5
    s1_learn = s1.clone().requires_grad_()
    kept = P.fake_quant_hluq(wide, x_min, s1_learn, s2, 8, 4, keep=keep)
    assert torch.equal(kept.detach(), torch.where(keep, wide, reference))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(P.fake_quant_hluq(wide, x_min, s1, s2, 8, 4), reference)
        two = P.fake_quant_uniform(wide, torch.tensor(0.05), torch.tensor(0.0), -8, 7)
        qkv = torch.randn(4, 4096, 3, 64, generator=generator)  # q, k, v slices: rows of 64 in place
        two_strided = [P.fake_quant_uniform(qkv[:, :, i], torch.tensor(0.05), torch.tensor(0.0), -8, 7)
                       for i in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two, torch.fake_quantize_per_tensor_affine(wide, 0.05, 0, -8, 7))
    for i, got in enumerate(two_strided):
        assert got.is_contiguous()
        assert torch.equal(got, torch.fake_quantize_per_tensor_affine(qkv[:, :, i], 0.05, 0, -8, 7))


def _gradients(fake_quant, x: torch.Tensor, params: list[torch.Tensor], keep: torch.Tensor,
               grad: torch.Tensor,
               *fixed) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    learned = [p.clone().requires_grad_() for p in params]
    fake_quant(x, *learned, *fixed, keep=keep).backward(grad)
    return [x.grad, *(p.grad for p in learned)]


@pytest.mark.parametrize("family", ["uniform", "hluq", "agq"])
def test_backward_kernels_match_the_torch_op_backward(family, torch_ops, generator) -> None:
    if family == "uniform":
        scale = torch.tensor(0.043)
        fake_quant, params, fixed = P.fake_quant_uniform, [scale], (torch.tensor(1.0), -8, 7)
        edges = torch.arange(-10, 9) * scale + scale / 2
    elif family == "hluq":
        x_min, s1, s2 = torch.tensor(0.0), torch.tensor(0.04), torch.tensor(0.12)  # u = x - x_min = x exactly
        fake_quant, params, fixed = P.fake_quant_hluq, [x_min, s1, s2], (4, 4)
        log_clip = engine.log_clip(float(torch.log2(s1)), 1.0)
        edges = torch.cat([torch.tensor([log_clip]) + x_min, x_min + s1 + s2 * torch.arange(0, 14) / 2])
    else:
        scale = torch.tensor(0.7)
        fake_quant, params, fixed = P.fake_quant_agq, [scale], (2.0, 4)
        edges = torch.tensor([engine.log_clip(float(torch.log2(scale)), 2.0)])
    x = padded(neighbours(edges, 3), generator, 0.6)
    keep = torch.rand(N, generator=generator) < 0.3
    grad = torch.randn(N, generator=generator)
    fused = _gradients(fake_quant, x, params, keep, grad, *fixed)
    torch_ops()
    reference = _gradients(fake_quant, x, params, keep, grad, *fixed)
    assert torch.equal(fused[0], reference[0])
    for got, want in zip(fused[1:], reference[1:]):
        assert want.abs() > 0 and torch.allclose(got, want, rtol=1e-5, atol=0)  # summed in another order


def test_kernels_reject_non_finite_input_when_checking(generator) -> None:
    x = torch.randn(N, generator=generator)
    x[N - 1] = float("nan")
    with pytest.raises(P.NonFiniteInputError), P.checking_finite():
        P.fake_quant_lnq(x, torch.tensor(1.0), torch.tensor(5.0), 4)
    with pytest.raises(P.NonFiniteInputError), P.checking_finite():
        P.fake_quant_uniform(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7)


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("AHCQ_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.usable(torch.empty(N))
    finally:
        monkeypatch.delenv("AHCQ_NATIVE")
        native.library.cache_clear()
    assert native.library() is not None


def test_a_failed_build_warns_and_keeps_the_torch_ops(monkeypatch, tmp_path, generator) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("AHCQ_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="kernels not built"):
            assert native.library() is None
        x = torch.randn(N, generator=generator)
        got = P.fake_quant_uniform(x, torch.tensor(0.05), torch.tensor(0.0), -8, 7)
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert torch.equal(got, torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -8, 7))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


def test_quantized_hiera_encoder_is_bit_identical_with_and_without_kernels(torch_ops) -> None:
    bench = load_tool("bench_sam2")
    args = bench.parse_args(["--calib-size", "64"])
    _, encoder, _ = bench.build_quantized_encoder(args, bench.bench_qconfig(args))
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        fused = encoder(x)
        torch_ops()
        reference = encoder(x)
    assert fused["vision_features"].numel() and torch.equal(fused["vision_features"],
                                                            reference["vision_features"])
    for a, b in zip(fused["backbone_fpn"], reference["backbone_fpn"]):
        assert torch.equal(a, b)
