"""Momentum residual networks: exact inverse, gradients equal to autograd's, no stored activations."""

import pytest
import torch
from torch import nn

from allocations import added_peak
from revlib.measure import saved_tensor_bytes
from revlib.momentum import MomentumSequence
from revlib.verify import relative_error


def residual_functions(depth: int, width: int = 6, *, dropout: float = 0.0, batch_norm: bool = False, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    functions = []
    for _ in range(depth):
        layers: list[nn.Module] = [nn.Linear(width, width), nn.Tanh()]
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))  # after the activation: a bias before BatchNorm has no gradient
        if dropout:
            layers.append(nn.Dropout(dropout))
        functions.append(nn.Sequential(*layers))
    return functions


def gradients(model: nn.Module, x: torch.Tensor, v: torch.Tensor | None = None) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    inputs = [t for t in (x, v) if t is not None and t.requires_grad]
    out = model(x, v)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum() + (out**2).sum()
    found = torch.autograd.grad(loss, inputs + list(model.parameters()))
    return list(found)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_memory_saving_gradients_equal_autograd_in_float64(gamma: float) -> None:
    functions = residual_functions(8)
    memory_saving = MomentumSequence(*functions, gamma=gamma).double()
    stored = MomentumSequence(*functions, gamma=gamma, memory_saving=False).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert relative_error(gradients(memory_saving, x, v), gradients(stored, x, v)) < 1e-12
    assert torch.equal(memory_saving(x, v), stored(x, v))


def test_gradcheck_on_input_velocity_and_parameters() -> None:
    model = MomentumSequence(*residual_functions(3, width=3), gamma=0.8).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    weight = model.functions[1][0].weight

    def output(x: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight.copy_(w)
        return model(x, v)

    assert torch.autograd.gradcheck(lambda x, v: model(x, v), (x, v))
    # the parameters through finite differences of the loss
    loss = lambda: model(x.detach(), v.detach()).pow(2).sum()  # noqa: E731
    analytic = torch.autograd.grad(loss(), weight)[0]
    numeric = torch.zeros_like(weight)
    with torch.no_grad():
        for index in range(weight.numel()):
            original = weight.view(-1)[index].item()
            weight.view(-1)[index] = original + 1e-6
            up = loss()
            weight.view(-1)[index] = original - 1e-6
            down = loss()
            weight.view(-1)[index] = original
            numeric.view(-1)[index] = (up - down) / 2e-6
    assert relative_error(analytic, numeric) < 1e-7


def test_inverse_rebuilds_the_input_and_its_error_grows_as_gamma_shrinks() -> None:
    x = torch.randn(64, 6)
    errors = {}
    for gamma in (0.9, 0.3, 0.05):
        model = MomentumSequence(*residual_functions(16), gamma=gamma)
        with torch.no_grad():
            out, velocity = model.run(x)
        rebuilt, initial_velocity = model.inverse(out, velocity)
        errors[gamma] = relative_error(rebuilt, x)
        if gamma == 0.9:
            assert initial_velocity.abs().max() < 1e-4, "the initial velocity was zero"
    assert errors[0.9] < 1e-5
    assert errors[0.05] > 100 * errors[0.9], errors


def test_saved_bytes_do_not_grow_with_depth() -> None:
    x = torch.randn(32, 6)
    saved, plain = [], []
    for depth in (2, 8, 32):
        model = MomentumSequence(*residual_functions(depth))
        saved.append(saved_tensor_bytes(model, x, exclude=model.parameters()))
        model.memory_saving = False
        plain.append(saved_tensor_bytes(model, x, exclude=model.parameters()))
    assert saved == [2 * x.numel() * 4] * 3, "x_N and v_N only"
    assert plain[2] > 10 * plain[0]


def test_dropout_masks_are_replayed_and_the_callers_random_stream_is_untouched() -> None:
    functions = residual_functions(6, dropout=0.3)
    x = torch.randn(8, 6, requires_grad=True)
    torch.manual_seed(1)
    expected = gradients(MomentumSequence(*functions, memory_saving=False), x)
    after_plain = torch.rand(1)
    torch.manual_seed(1)
    found = gradients(MomentumSequence(*functions), x)
    after_memory_saving = torch.rand(1)
    assert relative_error(found, expected) < 1e-5
    assert torch.equal(after_plain, after_memory_saving), "recomputation must not advance the global generator"
    torch.manual_seed(1)
    without_replay = gradients(MomentumSequence(*functions, preserve_rng_state=False), x)
    assert relative_error(without_replay, expected) > 1e-2, "without the replay the masks differ (negative control)"


def test_batch_norm_statistics_are_updated_once() -> None:
    functions = residual_functions(4, batch_norm=True)
    model = MomentumSequence(*functions)
    gradients(model, torch.randn(16, 6, requires_grad=True))
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm1d)]
    assert all(norm.num_batches_tracked.item() == 1 for norm in norms)
    reference = MomentumSequence(*residual_functions(4, batch_norm=True), memory_saving=False)
    x = torch.randn(16, 6, requires_grad=True)
    assert relative_error(gradients(MomentumSequence(*residual_functions(4, batch_norm=True)), x), gradients(reference, x)) < 1e-4


def test_autocast_is_re_entered_in_the_recomputation() -> None:
    functions = residual_functions(4)
    seen: list[bool] = []
    for function in functions:
        function.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    x = torch.randn(8, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MomentumSequence(*functions)(x)
    out.float().sum().backward()  # outside autocast: the recomputation must re-enter it
    assert len(seen) == 8 and all(seen), "every function recomputed once, under autocast as in forward"
    assert functions[0][0].weight.grad is not None


def test_input_without_grad_still_trains_the_parameters_and_is_untouched() -> None:
    model = MomentumSequence(*residual_functions(3))
    x = torch.randn(4, 6)
    before = x.clone()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert torch.equal(x, before)


def test_no_grad_runs_plainly_and_double_backward_is_refused() -> None:
    model = MomentumSequence(*residual_functions(2))
    with torch.no_grad():
        assert not model(torch.randn(2, 6)).requires_grad
    x = torch.randn(2, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_a_parameter_changed_in_place_before_backward_is_caught() -> None:
    model = MomentumSequence(*residual_functions(2))
    out = model(torch.randn(2, 6, requires_grad=True)).sum()
    with torch.no_grad():
        model.functions[0][0].weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"gamma": 0.0}, ValueError, "gamma must lie in"),
    ({"gamma": 1.0}, ValueError, "gamma must lie in"),
    ({"gamma": "0.9"}, TypeError, "gamma must be a number"),
])
def test_bad_gamma_is_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MomentumSequence(nn.Linear(2, 2), **kwargs)


def test_bad_functions_and_velocity_are_refused() -> None:
    x = torch.randn(3, 2)
    assert torch.equal(MomentumSequence()(x), x), "no residual function is the identity"
    with pytest.raises(TypeError, match="function 0 must be an nn.Module"):
        MomentumSequence(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="v must have the shape of x"):
        MomentumSequence(nn.Linear(2, 2))(torch.randn(3, 2), torch.randn(3, 3))


@pytest.mark.parametrize("memory_saving", [True, False])
def test_a_residual_function_of_the_wrong_shape_is_refused_by_name(memory_saving: bool) -> None:
    """Linear(8, 1) on (2, 8) would broadcast its (2, 1) output into the velocity: a different model, silently."""
    sequence = MomentumSequence(nn.Tanh(), nn.Linear(8, 1), memory_saving=memory_saving)
    with pytest.raises(ValueError, match=r"residual function 1 must preserve the shape of its input: it mapped \(2, 8\) to \(2, 1\)"):
        sequence(torch.randn(2, 8, requires_grad=True))


def test_a_function_that_changes_its_input_in_place_is_refused() -> None:
    sequence = MomentumSequence(nn.Tanh(), nn.ReLU(inplace=True))
    with pytest.raises(ValueError, match="residual function 1 changed its input in place"):
        sequence(torch.randn(2, 8, requires_grad=True))


def test_memory_held_during_backward_does_not_grow_with_depth() -> None:
    x = torch.randn(64, 16, requires_grad=True)
    peaks = []
    for depth in (2, 32):
        torch.manual_seed(0)
        sequence = MomentumSequence(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(depth)]).requires_grad_(False)
        peaks.append(added_peak(lambda: sequence(x).sum().backward()))
    assert peaks[0] == peaks[1] > 0
