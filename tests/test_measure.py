import functools

import pytest
import torch
from torch import nn

from revlib.measure import (SavedTensors, Timing, count_calls, count_calls_per_module, forward_backward, peak_memory, saved_tensor_bytes,
                           time_call)

FLOAT32 = 4


def linear_chain(depth: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_saved_bytes_of_a_linear_chain_match_hand_count(depth: int) -> None:
    batch, width = 5, 12
    model = linear_chain(depth, width)
    x = torch.randn(batch, width)
    # Each layer y = x Wᵀ saves its input x (for dW); layers after the first also save W (for dx),
    # the first does not since the data x needs no gradient.
    activations = depth * batch * width * FLOAT32
    weights = (depth - 1) * width * width * FLOAT32
    assert saved_tensor_bytes(model, x) == activations + weights
    assert saved_tensor_bytes(model, x, exclude=model.parameters()) == activations


def test_prediction_saves_nothing() -> None:
    model = linear_chain(4, 8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert saved_tensor_bytes(model, x) == 0
    model.requires_grad_(False)
    assert saved_tensor_bytes(model, x) == 0


def test_each_storage_counts_once_at_full_size() -> None:
    x = torch.randn(10, 10, requires_grad=True)
    assert saved_tensor_bytes(lambda t: t * t, x) == 100 * FLOAT32  # x saved twice, counted once
    base = torch.randn(1000, requires_grad=True)
    assert saved_tensor_bytes(lambda t: t[:10] * t[:10], base) == 1000 * FLOAT32  # a view keeps its storage


def test_custom_function_save_for_backward_is_seen() -> None:
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    x = torch.randn(7, requires_grad=True)
    assert saved_tensor_bytes(Square.apply, x) == 7 * FLOAT32


def test_peak_memory_on_cpu_grows_with_the_activations() -> None:
    batch, width = 4096, 256  # one activation: 4 MiB
    activation = batch * width * FLOAT32
    x = torch.randn(batch, width)
    shallow = peak_memory(forward_backward, linear_chain(2, width), x)
    deep = peak_memory(forward_backward, linear_chain(10, width), x)
    # Eight more layers keep eight more activations alive until the backward pass.
    assert 6 * activation < deep - shallow < 10 * activation
    assert shallow > activation


def test_peak_memory_of_a_step_that_allocates_nothing_is_small() -> None:
    assert peak_memory(torch.Tensor.zero_, torch.zeros(10)) < 2**20


def test_peak_memory_without_a_resettable_peak_still_measures_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the peak cannot be reset (macOS), the figure is the call's own growth of the peak, not the whole
    process's peak (which, with PyTorch loaded, is hundreds of MiB)."""
    import functools

    import revlib.measure

    monkeypatch.setattr(revlib.measure, "_RESET_PEAK_RSS", False)
    sixty_four_mib = functools.partial(torch.ones, 16 * 2**20)  # 16 Mi float32 numbers, all written
    measured = peak_memory(sixty_four_mib, device="cpu")
    assert 60 * 2**20 < measured < 72 * 2**20, f"measured {measured / 2**20:.1f} MiB for a 64 MiB allocation"
    assert peak_memory(torch.Tensor.zero_, torch.zeros(10), device="cpu") < 4 * 2**20


def test_peak_memory_explains_unpicklable_steps() -> None:
    with pytest.raises(TypeError, match="picklable"):
        peak_memory(lambda x: x, torch.zeros(3))


def test_peak_memory_reports_failures_of_the_measuring_process() -> None:
    with pytest.raises(RuntimeError, match="peak-memory process failed"):
        peak_memory(torch.Tensor.view, torch.zeros(6), 4)


@pytest.mark.cuda
def test_peak_memory_on_cuda_counts_the_activations() -> None:
    batch, width = 4096, 256
    x = torch.randn(batch, width, device="cuda")
    shallow = peak_memory(forward_backward, linear_chain(2, width).cuda(), x)
    deep = peak_memory(forward_backward, linear_chain(10, width).cuda(), x)
    assert 7 * batch * width * FLOAT32 <= deep - shallow <= 9 * batch * width * FLOAT32


def test_time_call_counts_calls_and_summarises() -> None:
    calls = []
    timing = time_call(calls.append, 1, warmup=2, repeats=5)
    assert len(calls) == 7 and len(timing.times) == 5
    assert timing.median >= 0 and timing.spread >= 0
    assert "median" in repr(timing)
    assert Timing((1.0, 2.0, 3.0)).median == 2.0


def test_central_range_sets_aside_a_quarter_at_each_end() -> None:
    assert Timing((5.0, 1.0, 3.0, 2.0, 4.0, 7.0, 60.0)).central_range == (2.0, 7.0), "the middle five of seven"
    assert Timing((2.0, 1.0, 3.0)).central_range == (1.0, 3.0), "fewer than four: nothing set aside"
    assert Timing((4.0,)).central_range == (4.0, 4.0)


@pytest.mark.parametrize("kwargs, match", [({"warmup": -1}, "warmup"), ({"repeats": 0}, "repeats")])
def test_time_call_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        time_call(print, **kwargs)


def test_fit_line_recovers_lines_and_power_laws() -> None:
    from revlib.analysis import fit_line

    line = fit_line([1, 2, 3, 4], [5, 7, 9, 11])
    assert line.slope == pytest.approx(2) and line.intercept == pytest.approx(3) and line.r_squared == pytest.approx(1)
    power = fit_line([4, 8, 16, 32], [1 / 4**2, 1 / 8**2, 1 / 16**2, 1 / 32**2], loglog=True)
    assert power.slope == pytest.approx(-2)
    assert line.predict(10) == pytest.approx(23) and power.predict(64) == pytest.approx(1 / 64**2)
    noisy = fit_line([1, 2, 3, 4], [1, 3, 2, 4])
    assert 0 < noisy.r_squared < 1
    with pytest.raises(ValueError, match="at least 2"):
        fit_line([1], [2])
    with pytest.raises(ValueError, match="positive"):
        fit_line([1, 2], [0, 1], loglog=True)


def test_compare_times_interleaves_the_calls() -> None:
    from revlib.measure import compare_times

    order: list[str] = []
    timings = compare_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, repeats=3, device="cpu")
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert set(timings) == {"a", "b"} and all(len(t.times) == 3 for t in timings.values())
    with pytest.raises(ValueError, match="at least one"):
        compare_times({})
    with pytest.raises(ValueError, match="repeats must be a positive integer, got 0"):
        compare_times({"a": lambda: None}, repeats=0)


def test_compare_times_can_run_each_round_in_a_new_order() -> None:
    from revlib.measure import compare_times

    def run() -> tuple[list[str], dict]:
        order: list[str] = []
        calls = {name: functools.partial(order.append, name) for name in "abcd"}
        return order, compare_times(calls, warmup=1, repeats=12, device="cpu", shuffle=True)

    order, timings = run()
    assert order[:4] == list("abcd"), "the warm-up round in the given order"
    rounds = [order[i:i + 4] for i in range(4, len(order), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds), "each call once per round"
    after_a = {r[r.index("a") + 1] for r in rounds if r[-1] != "a"}
    assert len(after_a) >= 2 and len({"".join(r) for r in rounds}) >= 4, "no call always follows the same one"
    assert run()[0] == order, "the same order in every run"
    assert set(timings) == set("abcd") and all(len(t.times) == 12 for t in timings.values())


def test_import_revlib_needs_no_posix_only_module() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['resource'] = None; import revlib, revlib.measure; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_peak_memory_on_the_cpu_stops_a_process_that_runs_too_long() -> None:
    import time

    with pytest.raises(RuntimeError, match="longer than timeout=0.5 seconds"):
        peak_memory(time.sleep, 30, device="cpu", timeout=0.5)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        peak_memory(time.sleep, 0, device="cpu", timeout=0)


def test_count_calls_counts_forwards_of_the_given_modules_only() -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    model = nn.Sequential(first, nn.ReLU(), second)

    def twice(x: torch.Tensor) -> None:
        model(x)
        first(x)

    assert count_calls([first, second], twice, torch.randn(2, 3)) == 3
    assert count_calls([second], twice, torch.randn(2, 3)) == 1
    assert not first._forward_hooks and not second._forward_hooks, "the hooks are removed"


def test_count_calls_removes_its_hooks_when_the_call_fails() -> None:
    layer = nn.Linear(3, 3)
    with pytest.raises(RuntimeError):
        count_calls([layer], layer, torch.randn(2, 4))
    assert not layer._forward_hooks


def test_saved_tensors_names_what_autograd_keeps_for_a_tanh_layer_and_cross_entropy() -> None:
    # z = x W1ᵀ, h = tanh(z), o = h W2ᵀ, cross-entropy: the first product saves x (for W1's gradient), tanh
    # saves its output h, the second product saves h and W2, the loss its log-probabilities, the targets
    # and a one-number normaliser; z and o are not saved
    torch.manual_seed(0)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    w1 = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with SavedTensors() as saved:
        z = x @ w1.T
        h = torch.tanh(z)
        o = h @ w2.T
        loss = nn.functional.cross_entropy(o, y)
    found = saved.by_name({"x": x, "z": z, "h": h, "o": o, "y": y, "W1": w1, "W2": w2})
    assert found["x"] == x.nbytes and found["h"] == h.nbytes and found["W2"] == w2.nbytes and found["y"] == y.nbytes
    assert found["z"] == 0 and found["o"] == 0 and found["W1"] == 0
    assert found["other"] == o.nbytes + 8  # the log-probabilities, one per logit, and the normaliser
    assert saved.total == sum(found.values()) == saved_tensor_bytes(
        lambda: nn.functional.cross_entropy(torch.tanh(x @ w1.T) @ w2.T, y))
    loss.backward()  # the recorder returns the saved tensors unchanged
    assert w1.grad is not None and w2.grad is not None


def test_saved_tensors_counts_a_shared_storage_once_and_honours_exclude() -> None:
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 4)
    with SavedTensors(exclude=[w]) as saved:
        (x @ w).sum()
    assert saved.by_name({"x": x, "x again": x[0], "w": w}) == {"x": x.nbytes, "x again": 0, "w": 0, "other": 0}
    with pytest.raises(ValueError, match='"other"'):
        saved.by_name({"other": x})


def test_step_memory_floor_holds_a_persistent_state_with_the_activations() -> None:
    """A steady step holds the optimiser's state while the activations are at their most; a first step
    creates it in the update. The floor says so, and both floors stay below their peaks."""
    from revlib.measure import StepMemory, step_memory

    parts = dict(parameters=10, gradients=10, optimizer_state=20, activations=50, inputs=5, peak=100, at_peak={})
    assert StepMemory(**parts, timeline=None).floor == 10 + 5 + 50 + 20  # type: ignore[arg-type]
    assert StepMemory(**parts, timeline=None, persistent_state=False).floor == 10 + 5 + 50  # type: ignore[arg-type]
    assert StepMemory(**{**parts, "activations": 5}, timeline=None).floor == 10 + 5 + 10 + 20  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    inputs, targets = torch.randn(1024, 64), torch.randint(0, 10, (1024,))
    steady = step_memory(model, inputs, targets, "adam")
    first = step_memory(model, inputs, targets, "adam", first_step=True)
    assert steady.persistent_state and not first.persistent_state
    state_and_activations = steady.parameters + steady.inputs + steady.activations + steady.optimizer_state
    assert steady.floor == state_and_activations <= steady.peak
    assert first.floor < steady.floor and first.floor <= first.peak


def test_count_calls_per_module_counts_each_module_in_one_call() -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)

    def twice(x: torch.Tensor) -> torch.Tensor:
        return second(first(first(x)))

    assert count_calls_per_module([first, second, first], twice, torch.randn(2, 3)) == (2, 1, 2)
    assert not first._forward_pre_hooks and not second._forward_pre_hooks
