"""Activation-aware condition-number reduction (ACNR, AHCQ-SAM) of a Linear weight.

An ill-conditioned weight amplifies the input quantization error along its weak singular directions. ACNR
runs proximal-point steps on the singular values of ``W`` with the per-value objective

    ½(σ − σ_k)² + λ(σ − t)² + β·C·σ²,

whose minimiser is ``σ' = (σ_k + 2λt) / (1 + 2λ + 2βC)``: ``t`` (mean, median or mid-range of the spectrum)
pulls the spectrum together and ``C_i = E[(ΔX·v_i)²]``, the quantization-error energy along input direction
``v_i``, holds back directions where the error is large. Singular values that carry the first ``energy``
share of ``Σσ²`` are never touched and the others may only grow, so ``κ = σ_max/σ_min`` falls while the
dominant directions, and with them most of the layer output, are preserved. The singular vectors do not change
during the iterations, so they are computed once (in float64) and only the spectrum is iterated.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ACNRResult", "SpectrumTarget", "acnr", "apply_acnr_", "error_energy", "proximal_singular_values"]


class SpectrumTarget(str, enum.Enum):
    """The value ``t`` the singular values are pulled toward."""

    MEAN = "mean"
    MEDIAN = "median"
    MIDRANGE = "midrange"


@dataclass(frozen=True)
class ACNRResult:
    """The conditioned weight and the condition numbers of the input and of the returned weight."""

    weight: Tensor
    cond_before: float
    cond_after: float
    skipped: bool


def proximal_singular_values(
    sigma: Tensor, target: float | Tensor, lam: float, beta: float, c: Tensor
) -> Tensor:
    """Closed-form minimiser of ``½(σ − sigma)² + lam·(σ − target)² + beta·c·σ²`` for each entry."""
    return (sigma + 2.0 * lam * target) / (1.0 + 2.0 * lam + 2.0 * beta * c)


def error_energy(delta_x: Tensor | Sequence[Tensor], directions: Tensor) -> Tensor:
    """``C_i``: mean squared projection of the activation error on each direction (rows of ``directions``).

    ``delta_x`` is one ``[N, Cin]`` tensor (one sample) or a sequence of per-sample ``[..., Cin]`` tensors;
    each sample's mean over its tokens is counted once and the samples are averaged.
    """
    samples = [delta_x] if isinstance(delta_x, Tensor) else list(delta_x)
    if not samples:
        raise ValueError("ACNR: no activation-error samples given")
    cin = directions.shape[1]
    total = torch.zeros(directions.shape[0], dtype=torch.float64, device=directions.device)
    for i, sample in enumerate(samples):
        if sample.shape[-1] != cin or sample.numel() == 0:
            raise ValueError(f"ACNR: activation-error sample {i} has shape {tuple(sample.shape)}; "
                             f"expected [..., {cin}] with at least one row")
        flat = sample.detach().reshape(-1, cin).to(device=directions.device, dtype=torch.float64)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"ACNR: activation-error sample {i} contains NaN or Inf")
        total += (flat @ directions.T).pow(2).mean(dim=0)
    return total / len(samples)


def _target(sigma: Tensor, kind: SpectrumTarget) -> Tensor:
    if kind is SpectrumTarget.MEAN:
        return sigma.mean()
    if kind is SpectrumTarget.MEDIAN:
        return sigma.median()
    return (sigma.max() + sigma.min()) / 2


def _condition(sigma: Tensor) -> float:
    smin = float(sigma.min())
    return float("inf") if smin == 0.0 else float(sigma.max()) / smin


def _check_args(weight: Tensor, iters: int, lam: float, beta: float, energy: float, min_cond: float) -> None:
    if weight.dim() != 2:
        raise ValueError(f"ACNR: weight must be 2-D [Cout, Cin], got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("ACNR: weight contains NaN or Inf")
    if iters < 0 or lam < 0 or beta < 0 or not 0.0 < energy <= 1.0 or min_cond < 1.0:
        raise ValueError(f"ACNR: need iters >= 0, lam >= 0, beta >= 0, energy in (0, 1], min_cond >= 1; got "
                         f"iters={iters}, lam={lam}, beta={beta}, energy={energy}, min_cond={min_cond}")


@torch.no_grad()
def acnr(
    weight: Tensor,
    delta_x: Tensor | Sequence[Tensor],
    iters: int = 200,
    lam: float = 0.003,
    beta: float = 0.001,
    energy: float = 0.8,
    min_cond: float = 100.0,
    target: SpectrumTarget | str = SpectrumTarget.MEAN,
) -> ACNRResult:
    """Condition ``weight`` ``[Cout, Cin]`` against the activation error ``delta_x`` (float − quantized).

    Layers whose condition number is below ``min_cond`` are returned unchanged (``skipped``).
    """
    _check_args(weight, iters, lam, beta, energy, min_cond)
    try:
        target = SpectrumTarget(target)
    except ValueError:
        raise ValueError(f"ACNR: target {target!r} is not one of "
                         f"{', '.join(t.value for t in SpectrumTarget)}") from None
    w64 = weight.detach().to(torch.float64)
    left, sigma0, right = torch.linalg.svd(w64, full_matrices=False)
    cond_before = _condition(sigma0)
    if cond_before < min_cond:
        return ACNRResult(weight.detach().clone(), cond_before, cond_before, skipped=True)
    c = error_energy(delta_x, right)
    sigma = sigma0.clone()
    for _ in range(iters):
        proposal = proximal_singular_values(sigma, _target(sigma, target), lam, beta, c)
        order = torch.argsort(sigma, descending=True)
        share = torch.cumsum(sigma[order].pow(2), dim=0) / sigma.pow(2).sum()
        first = int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype), right=True)[0])
        tail = order[first + 1:]
        sigma[tail] = torch.maximum(sigma[tail], proposal[tail])
    conditioned = ((left * sigma) @ right).to(dtype=weight.dtype, device=weight.device)
    cond_after = _condition(torch.linalg.svdvals(conditioned.to(torch.float64)))
    return ACNRResult(conditioned, cond_before, cond_after, skipped=False)


@torch.no_grad()
def apply_acnr_(
    linear: nn.Linear, delta_x: Tensor | Sequence[Tensor], **kwargs: float | int | str
) -> ACNRResult:
    """Run :func:`acnr` on ``linear.weight`` and write the result into the same Parameter (bias untouched)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"apply_acnr_: expected nn.Linear, got {type(linear).__name__}")
    result = acnr(linear.weight, delta_x, **kwargs)
    if not result.skipped:
        linear.weight.copy_(result.weight)
    return result
