"""Tests of revlib.adjoint: the ODE-ResNet, its adjoint backward pass, initialisations and helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from revlib.adjoint import (
    DepthVectorField,
    ODEResNet,
    adjoint_and_exact_gradients,
    depth_profile,
    gradient_error,
    interpolate_depth,
    limit_distance,
    linear_residuals,
    mean_layer_difference,
    roughness_in_depth,
    smooth_in_depth_,
    tanh_residuals,
)
from revlib.measure import saved_tensor_bytes
from revlib.verify import relative_error


def mlp_residuals(depth: int, width: int = 6, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return tanh_residuals(depth, width)


def squared(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).sum()


@pytest.mark.parametrize("scheme", ["euler", "heun"])
def test_backprop_mode_is_the_plain_resnet(scheme: str) -> None:
    residuals = mlp_residuals(5)
    model = ODEResNet(*residuals, scheme=scheme, memory_saving=False).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = x
    for f in residuals:
        if scheme == "euler":
            expected = expected + f(expected) / 5
        else:
            predictor = expected + f(expected) / 5
            expected = expected + (f(expected) + f(predictor)) / 10
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("scheme", ["euler", "heun", "heunnet"])
def test_adjoint_forward_equals_backprop_forward(scheme: str) -> None:
    model = ODEResNet(*mlp_residuals(6), scheme=scheme).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out = model(x)
    model.memory_saving = False
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["euler", "heun", "heunnet"])
def test_adjoint_is_exact_when_the_inverse_is(scheme: str) -> None:
    """With f = 0 the steps are the identity and the reversal is exact: gradients equal backprop's exactly."""
    residuals = mlp_residuals(4)
    for f in residuals:
        nn.init.zeros_(f[2].weight)
        nn.init.zeros_(f[2].bias)
    model = ODEResNet(*residuals, scheme=scheme).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    assert gradient_error(model, x, squared) < 1e-14


@pytest.mark.parametrize(("scheme", "order"), [("euler", 1), ("heun", 3)])
def test_adjoint_gradients_converge_to_exact_ones_for_a_linear_residual(scheme: str, order: int) -> None:
    """f(x) = A x with A shared by all layers: the reversed steps approximate (I + hA)^{-1}; the error of
    the gradients falls like N^{-order} (Heun: the round trip's leading errors cancel, see the chapter)."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6, bias=False).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    errors = []
    for depth in (16, 32, 64):
        layers = [nn.Linear(6, 6, bias=False).double() for _ in range(depth)]
        for layer in layers:
            layer.load_state_dict(shared.state_dict())
        errors.append(gradient_error(ODEResNet(*layers, scheme=scheme), x, squared))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert errors[-1] < 1e-2
    for ratio in ratios:
        assert 2 ** (order - 0.3) < ratio < 2 ** (order + 0.3), (errors, ratios)


def test_heunnet_step_uses_the_next_layer_in_its_corrector() -> None:
    """HeunNet (Maleki et al. 2021): y = x_n + h f_n(x_n), x_{n+1} = x_n + h/2 (f_n(x_n) + f_{n+1}(y)); N + 1 functions, N steps."""
    residuals = mlp_residuals(5)
    model = ODEResNet(*residuals, scheme="heunnet", memory_saving=False).double()
    assert model.depth == 4 and len(model) == 5
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = x
    for f, g in zip(residuals[:-1], residuals[1:]):
        predictor = expected + f(expected) / 4
        expected = expected + (f(expected) + g(predictor)) / 8
    torch.testing.assert_close(model(x), expected)
    rebuilt = out = model(x)
    for f, g in reversed(list(zip(residuals[:-1], residuals[1:]))):  # the reverse step exchanges the stages
        predictor = rebuilt - g(rebuilt) / 4
        rebuilt = rebuilt - (g(rebuilt) + f(predictor)) / 8
    torch.testing.assert_close(model.inverse(out), rebuilt)
    with pytest.raises(ValueError, match="at least 2"):
        ODEResNet(*mlp_residuals(1), scheme="heunnet")


def heunnet_errors(smooth: bool) -> list[float]:
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (16, 64):
        model = ODEResNet(*mlp_residuals(steps + 1), scheme="heunnet").double()
        if smooth:
            smooth_in_depth_(model, generator=torch.Generator().manual_seed(1))
        errors.append(gradient_error(model, x, squared))
    return errors


def test_heunnet_adjoint_is_high_order_only_for_weights_smooth_in_depth() -> None:
    """Smooth weights: the error falls about 64-fold from 16 to 64 steps (N^-3); i.i.d. weights, about 7-fold:
    the next layer's function is then no better a guess than this layer's."""
    smooth, independent = heunnet_errors(True), heunnet_errors(False)
    assert smooth[0] / smooth[1] > 30, smooth
    assert independent[0] / independent[1] < 12, independent
    assert smooth[1] < 1e-5 < independent[1]


def test_adjoint_input_gradient_gradcheck_at_zero_step_error() -> None:
    """gradcheck in float64 on a model whose reversal is exact (zero residual output, non-zero parameters)."""
    residuals = mlp_residuals(3)
    for f in residuals:
        nn.init.zeros_(f[2].weight)
        nn.init.zeros_(f[2].bias)
    model = ODEResNet(*residuals).double()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))


def test_adjoint_gradients_close_to_backprop_for_the_input_and_every_parameter() -> None:
    model = smooth_in_depth_(ODEResNet(*mlp_residuals(64), scheme="heun").double(), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    grads = {}
    for memory_saving in (False, True):
        model.memory_saving = memory_saving
        grads[memory_saving] = torch.autograd.grad(squared(model(x)), [x, *model.parameters()])
    for adjoint, exact in zip(grads[True], grads[False]):
        torch.testing.assert_close(adjoint, exact, rtol=1e-6, atol=1e-9)


def test_shared_residual_function_accumulates_gradients() -> None:
    shared = mlp_residuals(1)[0].double()
    model = ODEResNet(shared, shared, shared, scheme="heun")
    x = torch.randn(3, 6, dtype=torch.float64)
    assert gradient_error(model, x, squared) < 0.05


def test_adjoint_memory_is_flat_in_depth_and_backprop_grows() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    saved = {}
    for mode in ("backprop", "adjoint"):
        saved[mode] = []
        for depth in (4, 16):
            model = ODEResNet(*mlp_residuals(depth, width=32), memory_saving=mode == "adjoint")
            saved[mode].append(saved_tensor_bytes(model, x, exclude=model.parameters()))
    assert saved["adjoint"][0] == saved["adjoint"][1] == 64 * 32 * 4, "only the output is kept"
    assert saved["backprop"][1] > 3.5 * saved["backprop"][0]


def test_no_grad_and_frozen_models_run_plainly() -> None:
    model = ODEResNet(*mlp_residuals(3))
    x = torch.randn(2, 6)
    with torch.no_grad():
        y = model(x)
    assert not y.requires_grad
    model.requires_grad_(False)
    assert not model(x).requires_grad


def test_inverse_rebuilds_the_input_approximately() -> None:
    model = smooth_in_depth_(ODEResNet(*mlp_residuals(128), scheme="heun").double(), generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 6, dtype=torch.float64)
    assert relative_error(model.inverse(model(x)), x) < 1e-6


def test_bad_arguments_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="scheme must be one of"):
        ODEResNet(*mlp_residuals(2), scheme="rk4")  # type: ignore[arg-type]
    model = ODEResNet(*mlp_residuals(2))
    with pytest.raises(ValueError, match="scheme must be one of"):
        model.scheme = "heun2"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="at least one"):
        ODEResNet()
    with pytest.raises(TypeError, match="residual function 0 must be an nn.Module"):
        ODEResNet(torch.tanh)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one by one"):
        ODEResNet(mlp_residuals(2))  # type: ignore[arg-type]
    for memory_saving in (False, True):
        shrinking = ODEResNet(nn.Tanh(), nn.Linear(6, 3), memory_saving=memory_saving)
        with pytest.raises(ValueError, match=r"residual function 1 must preserve the shape of its input: it mapped \(2, 6\) to \(2, 3\)"):
            shrinking(torch.randn(2, 6, requires_grad=True))


def test_smooth_in_depth_makes_neighbours_close() -> None:
    gaps = []
    for depth in (16, 64):
        model = smooth_in_depth_(ODEResNet(*mlp_residuals(depth)), generator=torch.Generator().manual_seed(0))
        weights = torch.stack([f[0].weight.detach() for f in model.residuals])  # (N, 6, 6)
        gaps.append((weights[1:] - weights[:-1]).norm(dim=(1, 2)).max().item())
        again = smooth_in_depth_(ODEResNet(*mlp_residuals(depth)), generator=torch.Generator().manual_seed(0))
        assert torch.equal(again.residuals[3][0].weight, model.residuals[3][0].weight), "repeatable with a seeded generator"
    assert 3 < gaps[0] / gaps[1] < 5, "neighbouring layers differ by O(1/N)"
    iid = torch.stack([f[0].weight.detach() for f in ODEResNet(*mlp_residuals(64)).residuals])
    assert (iid[1:] - iid[:-1]).norm(dim=(1, 2)).max() > 10 * gaps[1]
    with pytest.raises(ValueError, match="modes"):
        smooth_in_depth_(ODEResNet(*mlp_residuals(2)), modes=0)
    with pytest.raises(ValueError, match="same parameter"):
        smooth_in_depth_(ODEResNet(nn.Linear(6, 6), nn.Linear(6, 6, bias=False)))


def test_interpolate_depth_keeps_the_ends_and_interpolates_between() -> None:
    model = ODEResNet(*mlp_residuals(3), scheme="heun", memory_saving=False, preserve_rng_state=False)
    deeper = interpolate_depth(model, 5)
    assert deeper.depth == 5 and deeper.scheme == "heun" and not deeper.memory_saving and not deeper.preserve_rng_state
    first, middle, last = (f[0].weight for f in model.residuals)
    torch.testing.assert_close(deeper.residuals[0][0].weight, first)
    torch.testing.assert_close(deeper.residuals[1][0].weight, (first + middle) / 2)
    torch.testing.assert_close(deeper.residuals[2][0].weight, middle)
    torch.testing.assert_close(deeper.residuals[4][0].weight, last)
    assert deeper.residuals[0][0].weight is not first, "the copy has its own parameters"
    with pytest.raises(ValueError, match="depth"):
        interpolate_depth(model, 1)


def test_depth_vector_field_is_each_layer_on_its_interval_of_layer_time() -> None:
    residuals = mlp_residuals(4)
    field = DepthVectorField(ODEResNet(*residuals))
    x = torch.randn(2, 6)
    below_two = torch.nextafter(torch.tensor(2.0), torch.tensor(0.0))
    for tau, index in ((torch.tensor(0.0), 0), (torch.tensor(1.0), 1), (below_two, 1), (torch.tensor(2.5), 2), (torch.tensor(3.99), 3)):
        torch.testing.assert_close(field(tau, x), residuals[index](x) / 4)
    for outside in (-0.5, 4.0):
        with pytest.raises(ValueError, match="perturb"):
            field(torch.tensor(outside), x)


def test_roughness_in_depth_by_hand_and_for_smooth_and_independent_weights() -> None:
    model = ODEResNet(*[nn.Linear(1, 1, bias=False) for _ in range(3)])
    with torch.no_grad():
        for f, w in zip(model.residuals, (1.0, 2.0, 3.0)):
            f.weight.fill_(w)
    assert roughness_in_depth(model) == pytest.approx((1 / 1 + 1 / 2) / 2)  # |2-1|/1 and |3-2|/2
    independent = ODEResNet(*mlp_residuals(64, width=32))
    smooth = smooth_in_depth_(ODEResNet(*mlp_residuals(64, width=32)), generator=torch.Generator().manual_seed(0))
    assert 1.2 < roughness_in_depth(independent) < 1.6, "independent draws of equal norm: about √2"
    assert roughness_in_depth(smooth) < 0.1
    with pytest.raises(ValueError, match="two"):
        roughness_in_depth(ODEResNet(*mlp_residuals(1)))


def test_linear_residuals_and_depth_profile() -> None:
    torch.manual_seed(0)
    model = ODEResNet(*linear_residuals(5, 3)).double()
    assert all(isinstance(f, nn.Linear) and f.bias is None and f.weight.shape == (3, 3) for f in model.residuals)
    x = torch.randn(4, 3, dtype=torch.float64)
    product = torch.eye(3, dtype=torch.float64)
    for f in model.residuals:
        product = (torch.eye(3, dtype=torch.float64) + f.weight.detach() / 5) @ product
    torch.testing.assert_close(model(x), x @ product.T, msg="x_N = Π (I + Θ_n/N) x_0")
    profile = depth_profile(model)
    assert profile.shape == (5, 9) and profile.dtype == torch.float64 and not profile.requires_grad
    torch.testing.assert_close(profile[2], model.residuals[2].weight.detach().flatten())
    assert roughness_in_depth(profile) == pytest.approx(roughness_in_depth(model))
    assert roughness_in_depth(profile.reshape(5, 3, 3)) == pytest.approx(roughness_in_depth(model)), "flattened"
    with pytest.raises(ValueError, match="two"):
        roughness_in_depth(profile[:1])
    with pytest.raises(ValueError, match="width"):
        linear_residuals(2, 0)


def test_mean_layer_difference_is_roughness_undivided() -> None:
    model = ODEResNet(*[nn.Linear(1, 1, bias=False) for _ in range(3)])
    with torch.no_grad():
        for f, w in zip(model.residuals, (1.0, 2.0, 4.0)):
            f.weight.fill_(w)
    assert mean_layer_difference(model) == pytest.approx((1 + 2) / 2)  # |2-1| and |4-2|
    assert roughness_in_depth(model) == pytest.approx((1 / 1 + 2 / 2) / 2), "the same, divided by |θ_n|"
    profile = depth_profile(model)
    assert mean_layer_difference(10 * profile) == pytest.approx(10 * mean_layer_difference(profile))
    with pytest.raises(ValueError, match="mean_layer_difference needs at least two"):
        mean_layer_difference(profile[:1])


def test_limit_distance_of_one_function_sampled_twice_and_of_unrelated_weights() -> None:
    def sampled(rows: int) -> torch.Tensor:  # θ(t) = (sin 2t, cos t, t²) at t_n = n/(rows-1)
        t = torch.linspace(0, 1, rows, dtype=torch.float64)
        return torch.stack((torch.sin(2 * t), torch.cos(t), t**2), dim=1)

    assert limit_distance(sampled(8), sampled(8)) == 0.0
    coarse, fine = limit_distance(sampled(8), sampled(16)), limit_distance(sampled(8), sampled(32))
    assert 0 < fine < coarse < 1e-2, "only the interpolation's error, falling with the deep grid"
    assert coarse / fine == pytest.approx(4, rel=0.3), "O(1/M²)"
    by_hand = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # t = 0, 1
    deep = torch.tensor([[1.0], [0.0], [3.0]], dtype=torch.float64)  # t = 0, 1/2, 1
    assert limit_distance(by_hand, deep) == pytest.approx((1 + 1) / (0 + 2)), "|0-1| + |2-3| over |0| + |2|"
    generator = torch.Generator().manual_seed(0)
    unrelated = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    assert limit_distance(unrelated, torch.randn(16, 3, generator=generator, dtype=torch.float64)) > 0.5
    model = smooth_in_depth_(ODEResNet(*linear_residuals(8, 3)), generator=torch.Generator().manual_seed(0))
    assert limit_distance(model, depth_profile(model)) == 0.0, "a network is read as its depth profile"
    with pytest.raises(ValueError, match="same width"):
        limit_distance(sampled(8), sampled(16)[:, :2])
    with pytest.raises(ValueError, match="at least two"):
        limit_distance(sampled(8), sampled(1))
    with pytest.raises(ValueError, match="not zero"):
        limit_distance(torch.zeros(4, 3), sampled(8))


def test_gradient_descent_is_plain_full_batch_sgd_and_restores_the_threads() -> None:
    from revlib.training import gradient_descent_

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    model = ODEResNet(*linear_residuals(4, 3), memory_saving=False).double()
    by_hand = copy.deepcopy(model)
    threads = torch.get_num_threads()
    losses = gradient_descent_(model, x, y, steps=2, learning_rate=0.5)
    assert torch.get_num_threads() == threads
    for step in range(2):
        loss = 0.5 * (by_hand(x) - y).pow(2).sum(dim=1).mean()
        assert losses[step] == pytest.approx(loss.item())
        gradients = torch.autograd.grad(loss, list(by_hand.parameters()))
        with torch.no_grad():
            for parameter, gradient in zip(by_hand.parameters(), gradients):
                parameter -= 0.5 * gradient
    for trained, manual in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(trained, manual)
    assert len(losses) == 3 and losses[2] == pytest.approx(0.5 * (by_hand(x) - y).pow(2).sum(dim=1).mean().item())
    assert losses[2] < losses[0]
    with pytest.raises(ValueError, match="steps"):
        gradient_descent_(model, x, y, steps=0, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        gradient_descent_(model, x, y, steps=1, learning_rate=0.0)


def test_gradient_of_a_linear_resnet_is_smooth_in_depth_even_for_independent_weights() -> None:
    # the mechanism of Sander et al.'s theorem: dL/dΘ_n = (1/N) S_n^T (dL/dx_N) x_n^T with x_n and the
    # products S_n of the layers above changing by O(1/N) from one layer to the next, whatever the weights
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    gradient_roughness = []
    for depth in (16, 64):
        model = ODEResNet(*linear_residuals(depth, 4), memory_saving=False).double()
        assert roughness_in_depth(model) > 1.0, "independent layers"
        (model(x) - y).pow(2).sum().backward()
        gradients = torch.stack([f.weight.grad for f in model.residuals])
        gradient_roughness.append(roughness_in_depth(gradients))
    assert 3 < gradient_roughness[0] / gradient_roughness[1] < 5, "consecutive layers' gradients differ by O(1/N)"


def test_adjoint_and_exact_gradients_match_gradient_error_and_leave_the_mode() -> None:
    model = ODEResNet(*mlp_residuals(4)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    adjoint, exact = adjoint_and_exact_gradients(model, x, squared)
    assert model.memory_saving
    plain = ODEResNet(*model.residuals, memory_saving=False)
    torch.testing.assert_close(exact, torch.cat([g.flatten() for g in torch.autograd.grad(squared(plain(x)), list(model.parameters()))]))
    assert relative_error(adjoint, exact) == pytest.approx(gradient_error(model, x, squared))
    assert 0 < relative_error(adjoint, exact) < 0.5


def test_gradient_error_needs_trainable_parameters() -> None:
    model = ODEResNet(*mlp_residuals(2)).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        gradient_error(model, torch.randn(2, 6), squared)


@pytest.mark.cuda
def test_adjoint_on_cuda_matches_cpu(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("needs CUDA")
    model = smooth_in_depth_(ODEResNet(*mlp_residuals(32), scheme="heun"), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)
    cpu_error = gradient_error(model, x, squared)
    cuda_error = gradient_error(model.to(device), x.to(device), squared)
    assert abs(cuda_error - cpu_error) < 1e-4


def test_torchdiffeq_runs_the_same_network() -> None:
    pytest.importorskip("torchdiffeq")
    from revlib.adjoint import TorchdiffeqResNet

    model = smooth_in_depth_(ODEResNet(*mlp_residuals(8), memory_saving=False).double(), generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(TorchdiffeqResNet(model)(x), model(x), rtol=0, atol=0)
    exact = torch.autograd.grad(squared(model(x)), list(model.parameters()))
    through_solver = torch.autograd.grad(squared(TorchdiffeqResNet(model, adjoint=False)(x)), list(model.parameters()))
    for a, b in zip(through_solver, exact):
        torch.testing.assert_close(a, b)
    continuous = torch.autograd.grad(squared(TorchdiffeqResNet(model)(x)), list(model.parameters()))
    error = relative_error(torch.cat([a.flatten() for a in continuous]), torch.cat([b.flatten() for b in exact]))
    assert 1e-3 < error < 1, "the continuous adjoint is an approximation of the network's gradient"
    with pytest.raises(ValueError, match="Euler"):
        TorchdiffeqResNet(ODEResNet(*mlp_residuals(2), scheme="heun"))


@pytest.mark.parametrize("depth", [3, 5, 8])
def test_torchdiffeq_continuous_adjoint_pairs_each_reverse_step_with_its_own_layer(depth: int) -> None:
    """odeint_adjoint's reverse Euler steps, written out: from x̃_{n+1} to x̃_n with layer n's function,
    a_n = a_{n+1} + J_n(x̃_{n+1})ᵀ a_{n+1} / N and θ̄_n = (∂f_n/∂θ at x̃_{n+1})ᵀ a_{n+1} / N — the same layer as
    the discrete adjoint, its Jacobian taken at the step's start instead of at x̃_n."""
    pytest.importorskip("torchdiffeq")
    from revlib.adjoint import TorchdiffeqResNet

    model = ODEResNet(*mlp_residuals(depth), memory_saving=False).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    continuous = torch.autograd.grad(squared(TorchdiffeqResNet(model)(x)), list(model.parameters()))
    with torch.no_grad():
        state = model(x)
    adjoint, expected = 2 * state, []  # a_N = ∂L/∂x_N for L = ‖x_N‖²
    for f in reversed(model.residuals):
        point = state.detach().requires_grad_(True)
        velocity = f(point) / depth
        found = torch.autograd.grad(velocity, [point, *f.parameters()], adjoint)
        expected = list(found[1:]) + expected
        with torch.no_grad():
            state = state - velocity
        adjoint = adjoint + found[0]
    for got, want in zip(continuous, expected, strict=True):
        torch.testing.assert_close(got, want)


class CountingResidual(nn.Module):
    """A residual function that counts its evaluations and the vector-Jacobian products taken with respect to
    its input (a hook on every input that needs a gradient while a graph is built)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.evaluations = 0
        self.input_products = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        if torch.is_grad_enabled() and x.requires_grad:
            x.register_hook(self._count_product)
        return self.inner(x)

    def _count_product(self, gradient: torch.Tensor) -> None:
        self.input_products += 1


def counted_step(scheme: str, iterations: int, memory_saving: bool, input_wants_gradient: bool, depth: int = 5) -> tuple[list[int], list[int]]:
    """Each residual function's evaluations and input products in one forward+backward step."""
    functions = depth + 1 if scheme == "heunnet" else depth
    residuals = [CountingResidual(f) for f in mlp_residuals(functions)]
    model = ODEResNet(*residuals, scheme=scheme, memory_saving=memory_saving, rebuild_iterations=iterations).double()  # type: ignore[arg-type]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=input_wants_gradient)
    model(x).pow(2).sum().backward()
    return [f.evaluations for f in residuals], [f.input_products for f in residuals]


@pytest.mark.parametrize(("scheme", "iterations", "per_step"), [
    ("euler", 1, 3), ("euler", 2, 4), ("euler", 3, 5), ("heun", 1, 6), ("heun", 2, 8), ("heunnet", 1, 6), ("heunnet", 2, 8),
])
def test_adjoint_evaluates_each_step_as_often_as_its_operation_count_says(scheme: str, iterations: int, per_step: int) -> None:
    """Per step with s stages (1 Euler, 2 Heun/HeunNet) and k rebuild iterates: s in forward, s·k to rebuild, s
    recomputed with the graph — s(2 + k) evaluations against backprop's s, and as many vector-Jacobian
    products as backprop (one per stage; none with respect to the network's input when it wants no gradient)."""
    stages = 1 if scheme == "euler" else 2
    assert per_step == stages * (2 + iterations)
    for input_wants_gradient in (False, True):
        evaluations, products = counted_step(scheme, iterations, True, input_wants_gradient)
        plain_evaluations, plain_products = counted_step(scheme, iterations, False, input_wants_gradient)
        assert sum(evaluations) == 5 * per_step and sum(plain_evaluations) == 5 * stages
        if scheme != "heunnet":  # every function runs every stage of its own step
            assert evaluations == [per_step] * 5 and plain_evaluations == [stages] * 5
        assert products == plain_products, "the adjoint takes backprop's products, no more"
        assert sum(products) == 5 * stages - (0 if input_wants_gradient else 1)
