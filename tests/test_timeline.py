"""memory_timeline against hand counts: each category of a training step's memory, byte for byte."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revlib import added_peak, forward_backward, memory_timeline, saved_tensor_bytes
from revlib.checkpoint import CheckpointedSequence
from revlib.timeline import CATEGORIES, MemoryTimeline

FLOAT32, INT64 = 4, 8
# Sizes chosen so that every count below is a different number of bytes.
BATCH, FEATURES, HIDDEN, CLASSES = 7, 13, 29, 5
PARAMETERS = (HIDDEN * FEATURES + HIDDEN + CLASSES * HIDDEN + CLASSES) * FLOAT32  # 2224
BATCH_BYTES = BATCH * FEATURES * FLOAT32 + BATCH * INT64  # the inputs and the class labels: 420
# What autograd saves for the MLP's loss, besides the batch and the parameters: ReLU its output (B×H), log-softmax
# its output (B×C), the negative log-likelihood its total weight (a float32 scalar).
SAVED = (BATCH * HIDDEN + BATCH * CLASSES + 1) * FLOAT32  # 956
# The loss itself and the seed gradient backward() creates for it, a float32 scalar each, are live too.
LOSS_AND_SEED = 2 * FLOAT32
OPTIMIZERS = {
    "sgd": lambda parameters: torch.optim.SGD(parameters, lr=0.1),
    "momentum": lambda parameters: torch.optim.SGD(parameters, lr=0.1, momentum=0.9),
    "adam": lambda parameters: torch.optim.Adam(parameters, lr=0.01),
}
# SGD keeps nothing; momentum one buffer per parameter; Adam two moments per parameter and, per parameter
# tensor (4 here), its step count as a 0-d float32 tensor (checked in the test).
STATE = {"sgd": 0, "momentum": PARAMETERS, "adam": 2 * PARAMETERS + 4 * FLOAT32}


def mlp(device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)).to(device)


def batch(device: str = "cpu") -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(BATCH, FEATURES, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return inputs.to(device), targets.to(device)


def loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(model(inputs), targets)


def step(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()  # releases the gradients (set_to_none=True)
    loss(model, inputs, targets).backward()
    optimizer.step()


def bill(**nonzero: int) -> dict[str, int]:
    return {category: nonzero.get(category, 0) for category in CATEGORIES}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_training_step_holds_exactly_the_parameters_gradients_and_optimizer_state(name: str) -> None:
    model, (inputs, targets) = mlp(), batch()
    optimizer = OPTIMIZERS[name](model.parameters())
    timeline = memory_timeline(step, model, inputs, targets, optimizer)

    assert [phase.name for phase in timeline.phases] == ["forward", "backward", "optimizer step"]
    assert timeline.largest["parameters"] == PARAMETERS
    assert timeline.largest["gradients"] == PARAMETERS
    assert timeline.largest["optimizer_state"] == STATE[name]
    assert timeline.largest["other"] == 0  # Adam's intermediate results, say, are temporaries of its step
    if name == "adam":
        steps = [state["step"] for state in optimizer.state.values()]
        assert len(steps) == 4 and all(count.dim() == 0 and count.dtype == torch.float32 for count in steps)
    # The warm-up left gradients and state; zero_grad() releases the gradients before the forward pass, and the
    # backward pass allocates them again.
    assert timeline.at_start == bill(parameters=PARAMETERS, optimizer_state=STATE[name], gradients=PARAMETERS, inputs=BATCH_BYTES)
    assert timeline.at(timeline.phase("forward").end)["gradients"] == 0
    assert timeline.at_end == timeline.at_start


def test_the_activations_at_the_end_of_the_forward_pass_are_what_autograd_saves() -> None:
    model, (inputs, targets) = mlp(), batch()
    timeline = memory_timeline(step, model, inputs, targets, OPTIMIZERS["sgd"](model.parameters()))
    saved = saved_tensor_bytes(loss, model, inputs, targets, exclude=[*model.parameters(), inputs, targets])
    assert saved == SAVED

    end_of_forward = timeline.at(timeline.phase("forward").end)
    assert end_of_forward == bill(parameters=PARAMETERS, inputs=BATCH_BYTES, activations=saved + LOSS_AND_SEED)
    assert timeline.at_end["activations"] == 0  # backward released them


def test_the_peak_is_the_largest_total_and_splits_into_the_categories_then() -> None:
    model, (inputs, targets) = mlp(), batch()
    timeline = memory_timeline(step, model, inputs, targets, OPTIMIZERS["adam"](model.parameters()))
    totals = [sum(int(timeline.series[category][index]) for category in CATEGORIES) for index in range(len(timeline.times))]

    assert timeline.peak == max(totals)
    assert sum(timeline.at_peak.values()) == timeline.peak
    assert all(timeline.largest[category] >= timeline.at_peak[category] for category in CATEGORIES)
    assert timeline.baseline == sum(timeline.at_start.values()) == PARAMETERS + STATE["adam"] + PARAMETERS + BATCH_BYTES
    assert timeline.added_peak == timeline.peak - timeline.baseline
    # at the end of the forward pass the step holds its activations besides what it started with, less the
    # gradients zero_grad() released
    assert timeline.peak >= timeline.baseline - PARAMETERS + SAVED + LOSS_AND_SEED
    assert np.all(np.diff(timeline.times) >= 0) and timeline.times[0] == 0
    # held(...) is the sum of the categories it names, at every sample
    held = timeline.held("activations", "temporaries", "inputs")
    assert held.shape == timeline.times.shape
    assert np.array_equal(held, timeline.series["activations"] + timeline.series["temporaries"] + timeline.series["inputs"])
    assert np.array_equal(timeline.held(*CATEGORIES), timeline.total)
    assert held[0] == BATCH_BYTES  # at the start: the batch, and none of the parameters' bytes
    # largest_during: the most a phase held, read off the samples within it
    backward = timeline.phase("backward")
    within = (timeline.times >= backward.start) & (timeline.times <= backward.end)
    assert within.any() and not within.all()
    assert timeline.largest_during("backward", "temporaries") == timeline.series["temporaries"][within].max()
    assert timeline.largest_during("backward", "activations", "temporaries") == held_in(timeline, within)
    assert timeline.largest_during("forward", "activations") <= timeline.largest["activations"]


def test_added_peak_is_the_timelines_without_the_analysis() -> None:
    """The peak alone, summed from the allocations, is the timeline's to the byte: for a training step that
    releases and re-creates its gradients, a forward and backward pass, and a checkpointed one."""
    model, (inputs, targets) = mlp(), batch()
    optimizer = OPTIMIZERS["adam"](model.parameters())
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh()) for _ in range(6)]
    calls = [
        (step, (model, inputs, targets, optimizer)),
        (forward_backward, (model, inputs)),
        (forward_backward, (CheckpointedSequence(*blocks, schedule="sqrt"), inputs)),
    ]
    for fn, args in calls:
        measured = added_peak(fn, *args)  # first: its warm-up makes the step a steady one, as the timeline's does
        assert measured == memory_timeline(fn, *args).added_peak > 0
    with pytest.raises(TypeError, match="fn must be callable"):
        added_peak(model(inputs))


def test_a_first_step_and_a_steady_step_differ_by_the_gradients_and_state_the_first_allocates() -> None:
    model, (inputs, targets) = mlp(), batch()

    def first_step(model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
        step(model, inputs, targets, OPTIMIZERS["adam"](model.parameters()))  # a fresh optimiser: no state yet
        model.zero_grad(set_to_none=True)  # and no gradients left: every call allocates both

    first = memory_timeline(first_step, model, inputs, targets)
    steady = memory_timeline(step, model, inputs, targets, OPTIMIZERS["adam"](model.parameters()))

    allocated = bill(gradients=PARAMETERS, optimizer_state=STATE["adam"])
    assert first.at_start == bill(parameters=PARAMETERS, inputs=BATCH_BYTES)
    assert {category: steady.at_start[category] - first.at_start[category] for category in CATEGORIES} == allocated
    assert {category: steady.at_end[category] - first.at_end[category] for category in CATEGORIES} == allocated
    assert first.largest == steady.largest  # what each category needs at its most is the same
    assert first.added_peak > steady.added_peak  # but the first step adds its gradients and state to its baseline


def test_the_parameters_of_a_module_that_runs_are_known_without_an_optimiser() -> None:
    """PyTorch's inference alone takes parameters for inputs when no optimiser step updates them, and every
    activation for an input with them."""
    model, (inputs, targets) = mlp(), batch()
    timeline = memory_timeline(lambda: loss(model, inputs, targets).backward())  # a closure: nothing to find among arguments

    assert [phase.name for phase in timeline.phases] == ["forward", "backward"]
    # the gradients accumulate: the warm-up's stay and are added to in place
    assert timeline.at_start == bill(parameters=PARAMETERS, gradients=PARAMETERS, inputs=BATCH_BYTES)
    assert timeline.at(timeline.phase("forward").end)["activations"] == SAVED + LOSS_AND_SEED


def test_track_attributes_what_a_closure_releases_before_any_operator_reads_it() -> None:
    model, (inputs, targets) = mlp(), batch()
    optimizer = OPTIMIZERS["momentum"](model.parameters())
    untracked = memory_timeline(lambda: step(model, inputs, targets, optimizer))
    tracked = memory_timeline(lambda: step(model, inputs, targets, optimizer), track=[model, optimizer])

    # zero_grad() releases the warm-up's gradients before any operator reads them: the profiler only sees memory
    # freed, "other", unless their owners are known
    assert untracked.at_start == bill(parameters=PARAMETERS, optimizer_state=STATE["momentum"], inputs=BATCH_BYTES, other=PARAMETERS)
    assert tracked.at_start == bill(parameters=PARAMETERS, optimizer_state=STATE["momentum"], inputs=BATCH_BYTES, gradients=PARAMETERS)
    assert tracked.largest["other"] == 0


def test_a_batch_sliced_from_a_larger_tensor_counts_the_whole_storage() -> None:
    model, (inputs, targets) = mlp(), batch()
    data = torch.cat([inputs, inputs])  # the batch is a view of the first half of a tensor twice its size
    timeline = memory_timeline(loss, model, data[:BATCH], targets)
    assert timeline.at_start["inputs"] == BATCH_BYTES + BATCH * FEATURES * FLOAT32


def test_a_tensor_keeps_its_category_through_an_update_the_profiler_cannot_classify() -> None:
    """The autograd engine's nodes have no operator schema, so the profiler takes every tensor a node reads,
    such as the seed gradient ``AddBackward0`` passes on, for updated in place, into a version without category."""
    linear, (inputs, _) = mlp()[0], batch()
    timeline = memory_timeline(lambda: (linear(inputs) + 1).sum().backward(), track=linear)
    assert timeline.largest["other"] == 0


def test_gradients_a_call_keeps_from_torch_autograd_grad_are_other() -> None:
    """They are no parameter's ``.grad`` and no activation (the profiler's inference lets activations flow
    into the autograd engine's own operators, and would call the bias's gradient one)."""
    linear, (inputs, _) = mlp()[0], batch()
    kept: list[tuple[Tensor, ...]] = []
    timeline = memory_timeline(lambda: kept.append(torch.autograd.grad(linear(inputs).sum(), list(linear.parameters()))))
    assert timeline.at_end == bill(parameters=(HIDDEN * FEATURES + HIDDEN) * FLOAT32, inputs=BATCH * FEATURES * FLOAT32,
                                   other=(HIDDEN * FEATURES + HIDDEN) * FLOAT32)


class Exp(torch.autograd.Function):
    """:math:`y = e^x`, keeping its output for backward as revlib's memory-saving sequences do, and the random
    number generator's state as a plain ``ctx`` attribute, as they do to replay dropout."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        y = x.exp()
        ctx.save_for_backward(y)  # d e^x / dx = e^x: the output is all backward needs
        ctx.rng_state = torch.get_rng_state()  # a tensor no operator reads
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * y  # x's gradient


def exp_loss(linear: nn.Linear, inputs: Tensor) -> Tensor:
    return Exp.apply(linear(inputs)).sum()


def test_what_a_custom_function_keeps_is_an_activation_and_its_random_state_other() -> None:
    linear, (inputs, _) = mlp()[0], batch()
    timeline = memory_timeline(lambda: exp_loss(linear, inputs).backward(), track=linear)
    saved = saved_tensor_bytes(exp_loss, linear, inputs, exclude=[*linear.parameters(), inputs])
    assert saved == BATCH * HIDDEN * FLOAT32  # the output only: the linear layer's input is the batch

    end_of_forward = timeline.at(timeline.phase("forward").end)
    assert end_of_forward["activations"] == saved + LOSS_AND_SEED
    assert end_of_forward["other"] == torch.get_rng_state().numel()  # bytes of a uint8 tensor
    assert timeline.at_end["other"] == timeline.at_end["activations"] == 0  # released with the graph


def held_in(timeline: MemoryTimeline, within: np.ndarray) -> int:
    return int((timeline.series["activations"] + timeline.series["temporaries"])[within].max())


def test_bad_arguments_are_refused_naming_the_argument() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        memory_timeline(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="track must hold"):
        memory_timeline(lambda: None, track=[torch.zeros(1)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="track must hold"):
        memory_timeline(lambda: None, track=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="device must be"):
        memory_timeline(lambda: None, device=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device="):
        memory_timeline(lambda: None, device="abacus")

    timeline = memory_timeline(lambda x: x * 2, torch.ones(3))
    assert [phase.name for phase in timeline.phases] == ["forward"]
    with pytest.raises(ValueError, match="name must be one of"):
        timeline.phase("sideways")
    with pytest.raises(ValueError, match="no occurrence 0"):
        timeline.phase("backward")
    with pytest.raises(ValueError, match="categories must be among.*'weights'"):
        timeline.held("activations", "weights")
    with pytest.raises(ValueError, match="at least one category"):
        timeline.held()
    with pytest.raises(ValueError, match="no occurrence 0"):
        timeline.largest_during("backward", "temporaries")
    with pytest.raises(ValueError, match="categories must be among"):
        timeline.largest_during("forward", "weights")


def test_a_failing_call_leaves_no_hook_and_no_profiler_running() -> None:
    model, (inputs, _) = mlp(), batch()
    hooks = len(nn.modules.module._global_forward_pre_hooks)
    calls = 0

    def fails_when_measured(model: nn.Module, inputs: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("the measured call failed")
        return model(inputs)

    with pytest.raises(RuntimeError, match="the measured call failed"):
        memory_timeline(fails_when_measured, model, inputs)
    assert len(nn.modules.module._global_forward_pre_hooks) == hooks
    assert memory_timeline(model, inputs).largest["parameters"] == PARAMETERS  # a new profiler can start


def test_plot_timeline_stacks_the_categories_and_names_the_phases() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from revlib import plotting

    model, (inputs, targets) = mlp(), batch()
    timeline = memory_timeline(step, model, inputs, targets, OPTIMIZERS["adam"](model.parameters()))
    figure = plotting.plot_timeline(timeline, unit="KiB", title="one step")
    axis = figure.axes[0]
    assert (axis.get_xlabel(), axis.get_ylabel(), axis.get_title()) == ("time (ms)", "memory (KiB)", "one step")
    assert [text.get_text() for text in axis.texts] == ["forward", "backward", "optimizer step"]
    shown = [name for name in CATEGORIES if timeline.largest[name]]
    assert sorted(text.get_text() for text in axis.get_legend().get_texts()) == sorted(name.replace("_", " ") for name in shown)
    assert axis.get_ylim()[1] >= timeline.peak / 2**10
    renderer = figure.canvas.get_renderer()
    title = axis.title.get_window_extent(renderer)
    assert not any(text.get_window_extent(renderer).overlaps(title) for text in axis.texts), "a phase's name runs into the title"
    with pytest.raises(ValueError, match="unit must be one of"):
        plotting.plot_timeline(timeline, unit="MB")


def test_the_timeline_is_a_plain_record() -> None:
    timeline = memory_timeline(lambda x: x * 2, torch.ones(3))
    assert isinstance(timeline, MemoryTimeline) and timeline.device == torch.device("cpu")
    assert set(timeline.series) == set(CATEGORIES) and all(len(values) == len(timeline.times) for values in timeline.series.values())
    assert "MemoryTimeline(on cpu: peak" in repr(timeline)


@pytest.mark.cuda
def test_the_same_bill_on_cuda() -> None:
    model, (inputs, targets) = mlp("cuda"), batch("cuda")
    optimizer = OPTIMIZERS["adam"](model.parameters())

    def steady_step(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, zeroed in place
        loss(model, inputs, targets).backward()
        optimizer.step()

    timeline = memory_timeline(steady_step, model, inputs, targets, optimizer)
    assert timeline.device.type == "cuda"
    assert [phase.name for phase in timeline.phases] == ["forward", "backward", "optimizer step"]
    # Live before the call, so counted at their exact size: the parameters, the gradients and Adam's moments; its
    # step counts live on the CPU, whose memory a CUDA timeline leaves out.
    assert all(state["step"].device.type == "cpu" for state in optimizer.state.values())
    assert timeline.at_start == bill(parameters=PARAMETERS, gradients=PARAMETERS, optimizer_state=2 * PARAMETERS, inputs=BATCH_BYTES)
    # Allocated during the call, so counted at the caching allocator's block size, a multiple of 512 bytes: ReLU's
    # and log-softmax's outputs, the total weight, the loss and the seed gradient.
    blocks = sum(512 * math.ceil(nbytes / 512) for nbytes in (BATCH * HIDDEN * FLOAT32, BATCH * CLASSES * FLOAT32, FLOAT32, FLOAT32, FLOAT32))
    assert timeline.at(timeline.phase("forward").end)["activations"] == blocks
    assert timeline.peak == timeline.total.max() and timeline.at_end == timeline.at_start
