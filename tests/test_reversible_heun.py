"""The reversible Heun ODE-ResNet (exact inverse, gradients equal to autograd's, memory flat in depth during
backward) and the fixed-point rebuild of the approximate adjoint's reversed steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from revlib.adjoint import (
    ODEResNet,
    _reverse_step,
    _Stage,
    adjoint_and_exact_gradients,
    fixed_point_reverse,
    fixed_point_reverse_step,
    heun_fixed_point_reverse_step,
    smooth_in_depth_,
    tanh_residuals,
)
from revlib.analysis import fit_line
from revlib.measure import saved_tensor_bytes
from revlib.reversible_heun import ReversibleHeunResNet
from revlib.verify import relative_error


def residual_functions(count: int, width: int = 6, *, dropout: float = 0.0, batch_norm: bool = False, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    functions = []
    for _ in range(count):
        layers: list[nn.Module] = [nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)]
        if batch_norm:
            layers.insert(0, nn.BatchNorm1d(width))
        if dropout:
            layers.insert(2, nn.Dropout(dropout))
        functions.append(nn.Sequential(*layers))
    return functions


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is neither constant nor proportional to the output."""
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return (out * weights).sum() + out.pow(2).sum()


def gradients(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of the loss with respect to the input and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    return list(torch.autograd.grad(loss_of(model(x)), [x, *model.parameters()]))


def memory_saving_and_plain(model: ReversibleHeunResNet, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    found = []
    for memory_saving in (True, False):
        model.memory_saving = memory_saving
        found.append(gradients(model, x))
    model.memory_saving = True
    return found[0], found[1]


def constant_linear_field(count: int, weight: torch.Tensor) -> list[nn.Module]:
    """``count`` residual functions :math:`f(x) = W x`, all the same."""
    functions = []
    for _ in range(count):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
        functions.append(layer)
    return functions


# ---------------------------------------------------------------------------------------------- the scheme


def test_forward_is_the_reversible_heun_scheme_on_both_paths() -> None:
    functions = residual_functions(6)
    model = ReversibleHeunResNet(*functions).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    h = 1 / 5
    y, z = x, x
    for f, g in zip(functions[:-1], functions[1:]):
        z_next = 2 * y - z + h * f(z)
        y, z = y + h / 2 * (f(z) + g(z_next)), z_next
    torch.testing.assert_close(model(x), y)
    assert model.depth == 5
    x.requires_grad_(True)
    y_saving, z_saving = model.run(x)
    model.memory_saving = False
    y_plain, z_plain = model.run(x)
    assert torch.equal(y_saving, y_plain) and torch.equal(z_saving, z_plain), "the same operations in the same order"


def test_gradcheck_on_input_and_parameters() -> None:
    model = ReversibleHeunResNet(*residual_functions(4, width=3)).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    parameters = list(model.parameters())
    # gradcheck perturbs the tensors it is given in place, parameters included, so the model sees the perturbations
    assert torch.autograd.gradcheck(lambda x, *_: model(x), (x, *parameters))
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, z: torch.cat(model.run(y, z)), (x, z)), "both states in, both out"


@pytest.mark.parametrize("depth", [4, 64, 256])
def test_gradients_equal_plain_autograd_to_float64_rounding(depth: int) -> None:
    """1e-12 relative, for the input and every parameter tensor: an error of 1e-6 in the rebuilt states would fail."""
    model = ReversibleHeunResNet(*residual_functions(depth + 1)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    saving, plain = memory_saving_and_plain(model, x)
    assert relative_error(saving, plain) < 1e-12


def test_gradients_of_both_final_states_from_both_initial_states() -> None:
    model = ReversibleHeunResNet(*residual_functions(17)).double()
    y = torch.randn(5, 6, dtype=torch.float64)
    z = torch.randn(5, 6, dtype=torch.float64)
    found = []
    for memory_saving in (True, False):
        model.memory_saving = memory_saving
        inputs = [y.clone().requires_grad_(True), z.clone().requires_grad_(True)]
        y_out, z_out = model.run(*inputs)
        found.append(torch.autograd.grad(loss_of(y_out) + 3 * loss_of(z_out.flip(0)), [*inputs, *model.parameters()]))
    assert relative_error(list(found[0]), list(found[1])) < 1e-12


def test_the_inverse_rebuilds_the_initial_states_at_depth_256() -> None:
    model = ReversibleHeunResNet(*residual_functions(257)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    with torch.no_grad():
        y, z = model.run(x)
    y0, z0 = model.inverse(y, z)
    assert relative_error(y0, x) < 1e-13 and relative_error(z0, x) < 1e-13, (relative_error(y0, x), relative_error(z0, x))
    assert relative_error(y, x) > 1e-2, "the network moved the input (a test of something)"


# --------------------------------------------------------------------------------------------------- memory


def test_saved_bytes_are_the_two_final_states_at_every_depth() -> None:
    x = torch.randn(32, 6, requires_grad=True)
    saved, plain = [], []
    for depth in (4, 64, 256):
        model = ReversibleHeunResNet(*residual_functions(depth + 1))
        saved.append(saved_tensor_bytes(model, x, exclude=model.parameters()))
        model.memory_saving = False
        plain.append(saved_tensor_bytes(model, x, exclude=model.parameters()))
    assert saved == [2 * x.numel() * 4] * 3, "y_N and z_N only"
    assert plain[2] > 30 * plain[0]


def live_bytes_during_backward(model: nn.Module, x: torch.Tensor) -> int:
    """The most bytes allocated at once during the backward pass of one training step, counted from before the
    forward pass (so that what forward keeps for backward is included), less the parameters' gradients (which
    every method produces). Read from the PyTorch profiler's record of every allocation and free."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        loss = loss_of(model(x))
        with torch.profiler.record_function("revlib-backward"):
            loss.backward()
    allocations, spans = [], []

    def walk(nodes: list) -> None:
        for node in nodes:
            if node.tag == _EventType.Allocation:
                allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
            elif node.name == "revlib-backward":
                spans.append((node.start_time_ns, node.end_time_ns))
            walk(node.children)

    walk(profiler.profiler.kineto_results.experimental_event_tree())
    ((start, end),) = spans
    live = peak = 0
    for time_ns, size in sorted(allocations):
        live += size
        if start <= time_ns <= end:
            peak = max(peak, live)
    gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return peak - gradient_bytes


def test_live_memory_during_backward_does_not_grow_with_depth() -> None:
    """What a count of saved tensors cannot see: the memory held *while* backward runs. Flat for the rebuilding
    backward pass (a dozen or so states, whatever the depth); growing with depth for ordinary autograd."""
    x = torch.randn(512, 8, dtype=torch.float64, requires_grad=True)
    state = x.numel() * x.element_size()
    live: dict[bool, list[int]] = {True: [], False: []}
    for depth in (16, 128):
        model = ReversibleHeunResNet(*tanh_residuals(depth + 1, 8)).double()
        for memory_saving in (True, False):
            model.memory_saving = memory_saving
            live[memory_saving].append(live_bytes_during_backward(model, x))
    assert abs(live[True][1] - live[True][0]) <= state, f"memory-saving backward: {live[True]} bytes, states of {state}"
    assert live[True][1] < 24 * state, f"a few states at any depth: {live[True][1] / state:.1f} states"
    assert live[False][1] - live[False][0] > 50 * state, f"plain autograd grows: {live[False]}, states of {state}"


# ---------------------------------------------------------------------------------- the recompute mechanism


def test_dropout_masks_are_replayed_and_the_callers_random_stream_is_untouched() -> None:
    model = ReversibleHeunResNet(*residual_functions(17, dropout=0.3)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    torch.manual_seed(1)
    model.memory_saving = False
    expected = gradients(model, x)
    after_plain = torch.rand(1)
    torch.manual_seed(1)
    model.memory_saving = True
    found = gradients(model, x)
    after_memory_saving = torch.rand(1)
    assert relative_error(found, expected) < 1e-12
    assert torch.equal(after_plain, after_memory_saving), "the recomputation must not advance the global generator"
    model.preserve_rng_state = False
    torch.manual_seed(1)
    without_replay = gradients(model, x)
    assert relative_error(without_replay, expected) > 1e-2, "without the replay the masks differ (negative control)"


def test_no_random_state_is_kept_when_no_function_draws_random_numbers() -> None:
    x = torch.randn(5, 6, requires_grad=True)
    plain = ReversibleHeunResNet(*residual_functions(9))(x).grad_fn.states  # type: ignore[union-attr]
    assert len(plain) == 9 and all(state.cpu_rng is None for state in plain), "none is replayed"
    random = ReversibleHeunResNet(*residual_functions(9, dropout=0.5))(x).grad_fn.states  # type: ignore[union-attr]
    kept = {id(state.cpu_rng) for state in random if state.cpu_rng is not None}
    assert len(kept) == 9, "one per function evaluation"


def test_dropout_replay_on_every_device(device: torch.device) -> None:
    model = ReversibleHeunResNet(*residual_functions(9, dropout=0.3)).to(device, torch.float64)
    x = torch.randn(8, 6, dtype=torch.float64, device=device)
    found = []
    for memory_saving in (True, False):
        model.memory_saving = memory_saving
        torch.manual_seed(2)
        found.append(gradients(model, x))
    assert relative_error(*found) < 1e-12


def test_batch_norm_statistics_are_updated_once_per_forward() -> None:
    model = ReversibleHeunResNet(*residual_functions(9, batch_norm=True)).double()
    twin = ReversibleHeunResNet(*residual_functions(9, batch_norm=True), memory_saving=False).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 6, dtype=torch.float64)
    found, expected = gradients(model, x), gradients(twin, x)
    for key, value in model.state_dict().items():
        assert torch.allclose(value, twin.state_dict()[key], rtol=1e-14, atol=0), f"{key} differs from one forward pass's update"
    assert all(int(m.num_batches_tracked) == 1 for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert relative_error(found, expected) < 1e-10


def test_autocast_is_re_entered_in_the_recomputation() -> None:
    functions = residual_functions(5)
    seen: list[bool] = []
    for function in functions:
        function.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    x = torch.randn(8, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ReversibleHeunResNet(*functions)(x)
    out.float().sum().backward()  # outside autocast: the recomputation must re-enter it
    assert len(seen) == 10 and all(seen), "every function evaluated once in forward and once in backward, under autocast"
    assert functions[0][0].weight.grad is not None


def test_a_shared_function_accumulates_and_a_frozen_input_still_trains() -> None:
    shared = residual_functions(1)[0]
    model = ReversibleHeunResNet(shared, *residual_functions(2, seed=1), shared).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    saving, plain = memory_saving_and_plain(model, x)
    assert relative_error(saving, plain) < 1e-12
    before = x.clone()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters()) and torch.equal(x, before)


def test_no_grad_runs_plainly_and_double_backward_is_refused() -> None:
    model = ReversibleHeunResNet(*residual_functions(3))
    with torch.no_grad():
        assert not model(torch.randn(2, 6)).requires_grad
    x = torch.randn(2, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_parameters_changed_or_replaced_before_backward_are_refused() -> None:
    model = ReversibleHeunResNet(*residual_functions(3))
    out = model(torch.randn(2, 6, requires_grad=True)).sum()
    with torch.no_grad():
        model.residuals[0][0].weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    out = model(torch.randn(2, 6, requires_grad=True)).sum()
    model.residuals[1][0].weight = nn.Parameter(model.residuals[1][0].weight.detach().clone())
    with pytest.raises(RuntimeError, match="changed between its forward and backward"):
        out.backward()


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("memory_saving", [True, False])
def test_a_residual_function_that_changes_the_shape_is_named(memory_saving: bool) -> None:
    model = ReversibleHeunResNet(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3), memory_saving=memory_saving)
    message = r"residual function 2 must preserve the shape of its input: it maps an input of shape \(2, 6\) to an output of shape \(2, 3\)"
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 6, requires_grad=True))
    with pytest.raises(ValueError, match=message):
        model.inverse(torch.randn(2, 6), torch.randn(2, 6))


def test_bad_arguments_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least 2, got 1"):
        ReversibleHeunResNet(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="residual function 1 must be an nn.Module"):
        ReversibleHeunResNet(nn.Linear(2, 2), torch.tanh)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one by one"):
        ReversibleHeunResNet([nn.Linear(2, 2), nn.Linear(2, 2)])  # type: ignore[arg-type]
    model = ReversibleHeunResNet(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="z must have the shape of y"):
        model.run(torch.randn(3, 2), torch.randn(3, 3))
    with pytest.raises(ValueError, match="z must have the shape of y"):
        model.inverse(torch.randn(3, 2), torch.randn(2, 2))


# ----------------------------------------------------------------------------------- rounding and stability


def float32_gradient_errors(residuals: list[nn.Module], x: torch.Tensor) -> tuple[float, float]:
    """Relative errors against float64 plain autograd of the float32 gradients, rebuilt and plain."""
    model = ReversibleHeunResNet(*residuals, memory_saving=False).double()
    reference = gradients(model, x.double())
    model.float()
    errors = [relative_error(g, reference) for g in memory_saving_and_plain(model, x.float())]
    model.double()
    return errors[0], errors[1]


def test_float32_rounding_of_the_rebuilt_gradient_grows_slowly_with_depth() -> None:
    """Reported, loosely asserted: on tanh residuals the rebuilt float32 gradient is about as accurate as plain
    float32 backprop, and both errors grow slowly with depth."""
    x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = []
    for depth in (4, 16, 64, 256):
        torch.manual_seed(1)
        rebuilt, plain = float32_gradient_errors(tanh_residuals(depth + 1, 8), x)
        rows.append((depth, rebuilt, plain))
        print(f"depth {depth:4d}: float32 gradient error, rebuilt {rebuilt:.2e}, plain backprop {plain:.2e}")
    assert all(rebuilt < 1e-4 and rebuilt < 10 * plain for _, rebuilt, plain in rows), rows


def test_a_contracting_field_amplifies_rounding_in_the_reversal() -> None:
    """f(x) = −c x, depth 64. The reversal expands the solution's mode by e^c while the forward pass has grown the
    parasitic mode (root ≈ −e^{c/N}) by e^c: rounding errors grow like e^{2c}. At c = 16 the float64 rebuild loses
    about ten digits and the rebuilt float32 gradient is worthless, while plain float32 backprop is fine."""
    x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rebuild, rebuilt32, plain32 = {}, {}, {}
    for c in (1, 8, 16):
        residuals = constant_linear_field(65, -c * torch.eye(8))
        model = ReversibleHeunResNet(*residuals).double()
        with torch.no_grad():
            y0, z0 = model.inverse(*model.run(x))
        rebuild[c] = max(relative_error(y0, x), relative_error(z0, x))
        rebuilt32[c], plain32[c] = float32_gradient_errors(residuals, x)
        print(f"c = {c:2d}: float64 rebuild error {rebuild[c]:.1e}; float32 gradient error rebuilt {rebuilt32[c]:.1e}, plain {plain32[c]:.1e}")
    assert rebuild[1] < 1e-14 and rebuild[16] > 1e-9, rebuild
    assert rebuilt32[16] > 1 and plain32[16] < 1e-3, (rebuilt32, plain32)


def test_the_forward_pass_is_stable_only_for_oscillating_fields_with_step_at_most_one() -> None:
    """f(x) = λ x: the step's roots are hλ ± √(1 + (hλ)²). For hλ on [−i, i] both have modulus one; for real
    hλ < 0 the parasitic root has modulus > 1."""
    for w in (0.5j, 1j, -0.1, -0.5):
        w = complex(w)
        roots = [w + (1 + w * w) ** 0.5, w - (1 + w * w) ** 0.5]
        matrix = torch.tensor([[1 + w, w * w / 2], [2, w - 1]], dtype=torch.complex128)  # (y, z) ↦ (y', z')
        eigenvalues = sorted(torch.linalg.eigvals(matrix).tolist(), key=lambda r: r.real)
        # at hλ = i the root is double (a Jordan block), and eigvals finds it to about √ε only
        assert all(abs(a - b) < 1e-7 for a, b in zip(eigenvalues, sorted(roots, key=lambda r: r.real))), (w, eigenvalues, roots)
        largest = max(abs(r) for r in roots)
        assert (largest < 1 + 1e-12) == (w.real == 0), (w, roots)
    h, lam = 1 / 64, -8.0  # the matrix is the scheme's
    model = ReversibleHeunResNet(*constant_linear_field(65, lam * torch.eye(1))).double()
    y, z = model.run(torch.ones(1, 1, dtype=torch.float64))
    matrix = torch.tensor([[1 + h * lam, (h * lam) ** 2 / 2], [2, h * lam - 1]], dtype=torch.float64)
    expected = torch.linalg.matrix_power(matrix, 64) @ torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(torch.cat([y.flatten(), z.flatten()]).detach(), expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------- fixed-point rebuild


def smooth_field(width: int = 8, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    weight = 1.5 * torch.randn(width, width, dtype=torch.float64, generator=generator) / math.sqrt(width)
    bias = torch.randn(width, dtype=torch.float64, generator=generator)
    x = torch.randn(16, width, dtype=torch.float64, generator=generator)
    return (lambda z: torch.tanh(z @ weight.T + bias)), x


STEPS = (0.2, 0.1, 0.05, 0.025, 0.0125)


def order_of(errors: list[float]) -> float:
    return fit_line(STEPS, errors, loglog=True).slope


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_euler_fixed_point_rebuild_has_local_error_of_order_k_plus_one(iterations: int) -> None:
    f, x = smooth_field()
    errors = [(fixed_point_reverse_step(f, x + h * f(x), h, iterations) - x).norm().item() for h in STEPS]
    assert abs(order_of(errors) - (iterations + 1)) < 0.15, errors


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_heun_fixed_point_rebuild_has_local_error_of_order_k_plus_three(iterations: int) -> None:
    f, x = smooth_field()

    def heun(z: torch.Tensor, h: float) -> torch.Tensor:
        return z + h / 2 * (f(z) + f(z + h * f(z)))

    errors = [(heun_fixed_point_reverse_step(f, f, heun(x, h), h, iterations) - x).norm().item() for h in STEPS]
    assert abs(order_of(errors) - (iterations + 3)) < 0.25, errors


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_heunnet_fixed_point_rebuild_with_unrelated_functions_gains_one_order_per_iteration(iterations: int) -> None:
    (f, x), (g, _) = smooth_field(seed=0), smooth_field(seed=1)
    errors = [(heun_fixed_point_reverse_step(f, g, x + h / 2 * (f(x) + g(x + h * f(x))), h, iterations) - x).norm().item() for h in STEPS]
    assert abs(order_of(errors) - (iterations + 1)) < 0.25, errors


@pytest.mark.parametrize("scheme", ["euler", "heun"])
def test_the_first_iterate_is_the_adjoints_reversed_step(scheme: str) -> None:
    f, g = residual_functions(2)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = _reverse_step(_Stage(f, f, 0, 0), x, 0.1, scheme)
        found = fixed_point_reverse_step(f, x, 0.1, 1) if scheme == "euler" else heun_fixed_point_reverse_step(f, f, x, 0.1, 1)
    assert torch.equal(found, expected)


def test_fixed_point_iteration_converges_iff_the_increment_contracts() -> None:
    """f(x) = a Q x with Q orthogonal has Lipschitz constant a exactly, and the Euler iteration multiplies the
    error by −haQ: it converges for ha < 1, stalls at ha = 1 and diverges beyond."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=generator))
    x = torch.randn(4, 8, dtype=torch.float64, generator=generator)
    h = 0.1
    errors = {}
    for a in (5.0, 9.0, 10.0, 15.0):
        f = lambda z, a=a: a * z @ q.T  # noqa: E731
        x_next = x + h * f(x)
        errors[a] = [(fixed_point_reverse_step(f, x_next, h, k) - x).norm().item() / (h * f(x)).norm().item() for k in (1, 20, 40)]
    assert errors[5.0][2] < 1e-11, errors[5.0]  # 0.5^40
    assert errors[9.0][2] < 0.02, errors[9.0]  # 0.9^40, slowly
    assert all(abs(e - 1) < 1e-9 for e in errors[10.0]), errors[10.0]  # |−Q|^k = 1: no progress
    assert errors[15.0][2] > 1e6, errors[15.0]  # 1.5^40
    # Heun with f = g = λ id: the error is multiplied by −(hλ + (hλ)²/2), below 1 in modulus only for hλ < √3 − 1
    for w, factor in ((0.4, 0.48), (0.9, 1.305)):
        f = lambda z, w=w: (w / h) * z  # noqa: E731
        x_next = x + h / 2 * (f(x) + f(x + h * f(x)))
        first, later = (heun_fixed_point_reverse_step(f, f, x_next, h, k) - x for k in (1, 21))
        torch.testing.assert_close(later, first * (-factor) ** 20, rtol=1e-6, atol=1e-15)


def test_fixed_point_arguments_are_checked() -> None:
    x = torch.randn(2, 3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="iterations must be a positive integer"):
            fixed_point_reverse_step(torch.tanh, x, 0.1, bad)  # type: ignore[arg-type]
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="h must be a positive finite step"):
            heun_fixed_point_reverse_step(torch.tanh, torch.tanh, x, bad, 1)
    assert torch.equal(fixed_point_reverse(lambda z: 0 * z, x, 3), x)


def test_fixed_point_rebuild_improves_the_euler_adjoint_gradient() -> None:
    """Used as the adjoint's rebuild, each iteration shrinks the gradient error by about a factor hL (a preview of
    ODEResNet(..., rebuild_iterations=k), below): here the rebuilt inputs of every step, compared with the true ones."""
    torch.manual_seed(0)
    residuals = [f.double() for f in tanh_residuals(32, 6)]
    x = torch.randn(8, 6, dtype=torch.float64)
    with torch.no_grad():
        states = [x]
        for f in residuals:
            states.append(states[-1] + f(states[-1]) / 32)
        errors = []
        for k in (1, 2, 3):
            rebuilt = states[-1]
            for f in reversed(residuals):
                rebuilt = fixed_point_reverse_step(f, rebuilt, 1 / 32, k)
            errors.append(relative_error(rebuilt, x))
    assert errors[0] > 10 * errors[1] > 100 * errors[2], errors


@pytest.mark.parametrize("scheme", ["euler", "heun"])
def test_rebuild_iterations_make_the_adjoint_gradient_more_accurate(scheme: str) -> None:
    """ODEResNet(..., rebuild_iterations=k): further iterates shrink the adjoint's gradient error (Euler by about
    hL per iterate; for Heun the second iterate already brings it to 1e-9, where the third no longer helps:
    measured 1.8e-7, 2.8e-9, 7.7e-9), and k = 1 is the reversed step."""
    torch.manual_seed(0)
    residuals = [f.double() for f in tanh_residuals(16, 6)]
    x = torch.randn(8, 6, dtype=torch.float64)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.pow(2).sum()

    errors = []
    for k in (1, 2, 3):
        model = smooth_in_depth_(ODEResNet(*residuals, scheme=scheme, rebuild_iterations=k), generator=torch.Generator().manual_seed(0))
        adjoint, exact = adjoint_and_exact_gradients(model, x, loss)
        errors.append(relative_error(adjoint, exact))
    if scheme == "euler":
        assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    else:
        assert errors[0] > 10 * max(errors[1:]), errors
    assert "rebuild_iterations=3" in repr(model)
    with pytest.raises(ValueError, match="rebuild_iterations must be a positive integer"):
        ODEResNet(*residuals, rebuild_iterations=0)
