"""ACNR: closed form vs numerical minimisation, equivalence with re-SVD iterations, conditioning effect."""
from __future__ import annotations

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from ahcq.quantization.transforms.acnr import acnr, apply_acnr_, error_energy, proximal_singular_values


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def _ill_conditioned(seed: int, cout: int = 48, cin: int = 32, decades: float = 3.5) -> torch.Tensor:
    """Weight with a log-spaced spectrum from 10 down to 10**(1 - decades)."""
    g = torch.Generator().manual_seed(seed)
    r = min(cout, cin)
    sigma = torch.logspace(1, 1 - decades, r, dtype=torch.float64)
    return ((_orthonormal(cout, r, g) * sigma) @ _orthonormal(cin, r, g).T).float()


def _errors(seed: int, cin: int = 32, samples: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.05 * torch.randn(64, cin, generator=g) * torch.linspace(0.2, 3.0, cin) for _ in range(samples)]


def _reference_acnr(w: torch.Tensor, errors: list[torch.Tensor], iters: int, lam: float, beta: float,
                    energy: float) -> torch.Tensor:
    """Literal re-implementation in float64: fresh SVD and fresh C every iteration, loops over samples."""
    w = w.double()
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        c = torch.zeros_like(s)
        for e in errors:
            c += ((e.double() @ vh.T) ** 2).mean(0)
        c /= len(errors)
        t = s.mean()
        proposal = (s + 2 * lam * t) / (1 + 2 * lam + 2 * beta * c)
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        first = int(torch.nonzero(share > energy)[0])
        new = s.clone()
        new[first + 1:] = torch.maximum(s[first + 1:], proposal[first + 1:])
        w = (u * new) @ vh
    return w


@pytest.mark.parametrize(("sigma_k", "target", "c"), [(0.01, 1.3, 0.0), (0.5, 2.0, 7.0), (4.0, 1.0, 0.3)])
@pytest.mark.parametrize(("lam", "beta"), [(0.003, 0.001), (0.5, 0.2)])
def test_closed_form_minimises_the_proximal_objective(sigma_k, target, c, lam, beta) -> None:
    def objective(s: float) -> float:
        return 0.5 * (s - sigma_k) ** 2 + lam * (s - target) ** 2 + beta * c * s**2

    numeric = minimize_scalar(objective, bounds=(-10, 10), method="bounded", options={"xatol": 1e-12}).x
    closed = proximal_singular_values(torch.tensor(sigma_k, dtype=torch.float64), target, lam, beta,
                                      torch.tensor(c, dtype=torch.float64))
    assert float(closed) == pytest.approx(numeric, abs=1e-8)


def test_error_energy_counts_each_sample_once() -> None:
    g = torch.Generator().manual_seed(0)
    directions = _orthonormal(6, 6, g).T
    a, b = torch.randn(10, 6, generator=g), torch.randn(3, 2, 6, generator=g)
    expected = 0.5 * (((a.double() @ directions.T) ** 2).mean(0)
                      + ((b.double().reshape(6, 6) @ directions.T) ** 2).mean(0))
    torch.testing.assert_close(error_energy([a, b], directions), expected)
    torch.testing.assert_close(error_energy(a, directions), ((a.double() @ directions.T) ** 2).mean(0))


def test_matches_literal_resvd_iterations() -> None:
    w, errors = _ill_conditioned(1), _errors(2)
    result = acnr(w, errors, iters=40, lam=0.02, beta=0.5, energy=0.8)
    reference = _reference_acnr(w, errors, iters=40, lam=0.02, beta=0.5, energy=0.8)
    torch.testing.assert_close(result.weight.double(), reference, rtol=0, atol=2e-6)


def test_condition_drops_dominant_directions_and_output_kept() -> None:
    w, errors = _ill_conditioned(3), _errors(4)
    result = acnr(w, errors, iters=20)
    sigma_before = torch.linalg.svdvals(w.double())
    sigma_after = torch.linalg.svdvals(result.weight.double())
    assert result.cond_before == pytest.approx(float(sigma_before[0] / sigma_before[-1]), rel=1e-6)
    assert result.cond_after == pytest.approx(float(sigma_after[0] / sigma_after[-1]), rel=1e-6)
    assert result.cond_after < result.cond_before / 10 and not result.skipped
    share = torch.cumsum(sigma_before**2, 0) / (sigma_before**2).sum()
    kept = int(torch.nonzero(share > 0.8)[0]) + 1
    torch.testing.assert_close(sigma_after[:kept], sigma_before[:kept], rtol=1e-5, atol=0)
    assert (sigma_after >= sigma_before - 1e-5).all()  # the tail only grows
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    change = (x @ w.double().T - x @ result.weight.double().T).norm() / (x @ w.double().T).norm()
    assert change < 0.1


def test_large_error_direction_grows_less() -> None:
    w = torch.diag(torch.tensor([10.0, 0.01, 0.01], dtype=torch.float64)).float()
    errors = [torch.tensor([[0.0, 0.0, 30.0], [0.0, 0.0, -30.0]])]  # error only along input axis 2
    out = acnr(w, errors, iters=50, lam=0.01, beta=0.01, min_cond=10).weight.double()
    diag = torch.diagonal(out)
    assert diag[0] == pytest.approx(10.0) and diag[1] > 10 * diag[2] > 0
    torch.testing.assert_close(out, torch.diag(diag))  # singular directions unchanged


def test_well_conditioned_layer_is_skipped_and_linear_updated_in_place() -> None:
    w = torch.eye(8) * 2 + 0.01
    result = acnr(w, [torch.randn(4, 8)])
    assert result.skipped and torch.equal(result.weight, w) and result.cond_after == result.cond_before
    layer = nn.Linear(32, 48)
    with torch.no_grad():
        layer.weight.copy_(_ill_conditioned(6))
    param, bias = layer.weight, layer.bias.detach().clone()
    out = apply_acnr_(layer, _errors(7), iters=10)
    assert layer.weight is param and torch.equal(layer.weight.detach(), out.weight)
    assert torch.equal(layer.bias.detach(), bias)


def test_bad_input_is_named() -> None:
    w = _ill_conditioned(8)
    with pytest.raises(ValueError, match=r"sample 1 has shape \(4, 7\)"):
        acnr(w, [torch.zeros(4, 32), torch.zeros(4, 7)])
    with pytest.raises(ValueError, match="target 'mode'"):
        acnr(w, _errors(9), target="mode")
    with pytest.raises(ValueError, match="2-D"):
        acnr(torch.zeros(3), _errors(9))
    with pytest.raises(TypeError, match="Conv2d"):
        apply_acnr_(nn.Conv2d(1, 1, 1), _errors(9))
