"""The chapter's tools for looking at a rebuild: trajectories, Lipschitz bounds, damped fields and the
discrete Grönwall bound on the Euler adjoint's rebuild error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from revlib.adjoint import ODEResNet, tanh_residuals
from revlib.reversible_heun import (
    DampedResidual,
    ReversibleHeunResNet,
    euler_rebuild_bound,
    lipschitz_upper_bound,
    trajectories,
)


def functions(count: int, width: int = 3, *, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [f.double() for f in tanh_residuals(count, width, hidden=8)]


def test_damped_residual_subtracts_the_contraction() -> None:
    f = functions(1)[0]
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.allclose(DampedResidual(f, 2.5)(x), f(x) - 2.5 * x)
    with pytest.raises(TypeError, match="nn.Module"):
        DampedResidual(lambda v: v, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        DampedResidual(f, math.inf)


def test_the_lipschitz_bound_is_above_every_jacobian_norm_and_exact_for_a_linear_map() -> None:
    f = functions(1, width=4)[0]
    x = 3 * torch.randn(200, 4, dtype=torch.float64)
    jacobians = torch.func.vmap(torch.func.jacrev(f))(x)  # (200, 4, 4)
    largest = torch.linalg.matrix_norm(jacobians, 2).max().item()
    bound = lipschitz_upper_bound(f)
    assert largest <= bound
    damped = DampedResidual(f, -1.5)
    assert lipschitz_upper_bound(damped) == pytest.approx(bound + 1.5)
    linear = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -0.5]]))
    assert lipschitz_upper_bound(linear) == pytest.approx(3.0)
    with pytest.raises(TypeError, match="Conv1d"):
        lipschitz_upper_bound(nn.Conv1d(1, 1, 3))
    with pytest.raises(TypeError, match="not 1-Lipschitz"):
        lipschitz_upper_bound(nn.LeakyReLU(2.0))


@pytest.mark.parametrize("scheme", ["euler", "heun", "heunnet"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_trajectories_are_the_forward_pass_and_the_adjoints_rebuild(scheme: str, iterations: int) -> None:
    model = ODEResNet(*functions(9), scheme=scheme, rebuild_iterations=iterations)
    x = torch.randn(4, 3, dtype=torch.float64)
    forward, rebuilt = trajectories(model, x)
    assert forward.shape == rebuilt.shape == (model.depth + 1, 4, 3)
    with torch.no_grad():
        assert torch.equal(forward[0], x) and torch.equal(forward[-1], model(x))
        assert torch.equal(rebuilt[-1], forward[-1]) and torch.equal(rebuilt[0], model.inverse(forward[-1]))
    assert not torch.equal(rebuilt[3], forward[3])  # the rebuild is approximate


def test_reversible_heun_trajectories_are_rebuilt_to_rounding() -> None:
    model = ReversibleHeunResNet(*functions(33))
    x = torch.randn(6, 3, dtype=torch.float64)
    forward, rebuilt = trajectories(model, x)
    assert forward.shape == (33, 6, 3)
    with torch.no_grad():
        assert torch.equal(forward[-1], model(x))
    assert (rebuilt - forward).abs().max() < 1e-13
    with pytest.raises(TypeError, match="ODEResNet or a ReversibleHeunResNet"):
        trajectories(nn.Linear(3, 3), x)  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [0.0, 3.0, 8.0])
def test_the_euler_rebuild_error_stays_below_its_gronwall_bound(rate: float) -> None:
    model = ODEResNet(*[DampedResidual(f, rate) for f in functions(24, width=2)])
    x = torch.randn(50, 2, dtype=torch.float64)
    found = euler_rebuild_bound(model, x)
    assert (found.error <= found.bound).all()
    assert (found.error > 0).all()
    lipschitz = sum(lipschitz_upper_bound(f) for f in model.residuals) / model.depth
    assert found.amplification == pytest.approx(math.exp(lipschitz))
    assert torch.allclose(found.bound, found.amplification * found.local_errors)


def test_a_linear_contraction_amplifies_an_error_at_the_output_by_its_rate() -> None:
    """For f(x) = −λx the rebuild is linear: an error δ at x_N comes back multiplied by (1 + λ/N)^N ≈ e^λ."""
    rate, depth = 6.0, 64
    layers = [nn.Linear(1, 1, bias=False).double() for _ in range(depth)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.fill_(-rate)
    model = ODEResNet(*layers)
    with torch.no_grad():
        shift = model.inverse(torch.ones(1, 1, dtype=torch.float64)) - model.inverse(torch.zeros(1, 1, dtype=torch.float64))
    assert shift.item() == pytest.approx((1 + rate / depth) ** depth)
    assert shift.item() > math.exp(rate) / 2


def test_euler_rebuild_bound_refuses_what_it_does_not_bound() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="plain Euler"):
        euler_rebuild_bound(ODEResNet(*functions(4), scheme="heun"), x)
    with pytest.raises(ValueError, match="plain Euler"):
        euler_rebuild_bound(ODEResNet(*functions(4), rebuild_iterations=2), x)
    with pytest.raises(ValueError, match="batch, features"):
        euler_rebuild_bound(ODEResNet(*functions(4)), x[0])
    with pytest.raises(TypeError, match="ODEResNet"):
        euler_rebuild_bound(ReversibleHeunResNet(*functions(4)), x)  # type: ignore[arg-type]


def test_a_damping_matrix_rotates_or_spirals_and_is_bounded_by_its_norm() -> None:
    f = functions(1, width=2)[0]
    spin = torch.tensor([[0.0, 3.0], [-3.0, 0.0]], dtype=torch.float64)
    x = torch.randn(7, 2, dtype=torch.float64)
    rotating = DampedResidual(f, spin)
    assert torch.allclose(rotating(x), f(x) - x @ spin.T)
    assert lipschitz_upper_bound(rotating) == pytest.approx(lipschitz_upper_bound(f) + 3.0)
    with torch.no_grad():
        assert (x * (x @ spin.T)).sum(dim=1).abs().max() < 1e-12  # a rotation: orthogonal to x
    spiral = DampedResidual(f, spin + 2 * torch.eye(2, dtype=torch.float64))
    assert torch.allclose(spiral(x) - rotating(x), -2 * x)
    assert spiral.double()(x).dtype == torch.float64
    with pytest.raises(ValueError, match="square matrix"):
        DampedResidual(f, torch.ones(2, 3))
    with pytest.raises(ValueError, match="square matrix"):
        DampedResidual(f, torch.tensor([[math.nan]]))
