"""Tests of revlib.verify, the one home of the gradient checks."""

import pytest
import torch
from torch import nn

from revlib import verify
from revlib.verify import cosine_similarity, flat_gradient, relative_error


def test_relative_error_of_tensors_and_of_lists() -> None:
    reference = torch.tensor([3.0, 4.0])  # norm 5
    assert relative_error(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)
    assert relative_error([reference, torch.ones(2)], [reference, 2 * torch.ones(2)]) == pytest.approx(0.5), "the largest pair"
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.ones(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.float64)) == 0.0
    with pytest.raises(TypeError, match="both be tensors"):
        relative_error(torch.zeros(2), [torch.zeros(2)])
    with pytest.raises(ValueError, match="tensors, reference"):
        relative_error([torch.zeros(2)], [])


def test_flat_gradient_concatenates_parameter_gradients_and_leaves_grad_alone() -> None:
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    gradient = flat_gradient(layer, x, lambda out: out.sum(), list(layer.parameters()))
    assert gradient.shape == (3 * 2 + 2,)
    assert torch.allclose(gradient[:6], x.sum(0).repeat(2)) and torch.allclose(gradient[6:], torch.full((2,), 4.0))
    assert layer.weight.grad is None


def test_cosine_similarity_measures_direction_only() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert cosine_similarity(7.5 * reference, reference) == pytest.approx(1.0)
    assert cosine_similarity(torch.tensor([[0.0, 2.0], [-2.0, 0.0]]), reference) == pytest.approx(0.0)
    assert cosine_similarity(-reference, reference) == pytest.approx(-1.0)
    assert cosine_similarity(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), reference) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes"):
        cosine_similarity(torch.ones(4), reference)
    with pytest.raises(ValueError, match="zero"):
        cosine_similarity(torch.zeros(2, 2), reference)


def test_finite_differences_put_the_entry_back_when_the_function_raises() -> None:
    import pytest

    from revlib.verify import finite_difference_gradient

    tensor = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def failing() -> torch.Tensor:
        raise RuntimeError("a function that fails")

    with pytest.raises(RuntimeError, match="fails"):
        finite_difference_gradient(failing, tensor)
    assert torch.equal(tensor, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_central_difference_errors_fall_as_the_step_squared_then_rise_with_rounding() -> None:
    from revlib.verify import central_difference_errors

    theta = torch.linspace(-1, 1, 7, dtype=torch.float64)
    # f = sum(θ³ + θ): the central difference's error is exactly ε² Σ v³ (no higher terms), so slope 2
    epsilons = [1e-1, 1e-2, 1e-3, 1e-13]
    errors = central_difference_errors(lambda: (theta**3 + theta).sum(), [theta], [3 * theta**2 + 1], epsilons)
    assert 99 < errors[0] / errors[1] < 101 and 99 < errors[1] / errors[2] < 101
    assert errors[3] > 1e-6
    assert torch.equal(theta, torch.linspace(-1, 1, 7, dtype=torch.float64))  # put back


def test_central_difference_errors_refuse_bad_steps_and_mismatched_gradients() -> None:
    from revlib.verify import central_difference_errors

    theta = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="epsilons must be positive"):
        central_difference_errors(lambda: theta.sum(), [theta], [torch.ones(3)], [0.0])
    with pytest.raises(ValueError, match="same shape"):
        central_difference_errors(lambda: theta.sum(), [theta], [torch.ones(2)], [1e-3])
    with pytest.raises(ValueError, match="directions"):
        central_difference_errors(lambda: theta.sum(), [theta], [torch.ones(3)], [1e-3], directions=0)
