"""revlib's analysis of a memory profile against PyTorch's own (``MemoryProfile``), on the same profiles.

:mod:`revlib._memory_flow` re-implements the data-flow inference of ``torch.profiler._memory_profiler`` to
make it fast. These tests run both on one recorded profile of the book's training steps — every kind of
memory-saving sequence, PyTorch's checkpointing, autocast, micro-batching, a first step, ``autograd.grad`` —
with revlib's marks imposed on both, and require the same category for every version of every storage, the
same creations, updates and destructions at the same times with the same sizes, and the same timeline.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Category, MemoryProfile, TensorKey

from revlib import timeline
from revlib._memory_flow import Flow, analyse
from revlib.data import load_digits
from revlib.frontier import methods
from revlib.measure import _first_step
from revlib.training import make_optimizer, training_step


def _key(key: TensorKey) -> tuple[int, int, torch.device]:
    return (key.id, key.storage.allocation_id, key.device)


class _MarkedProfile(MemoryProfile):
    """PyTorch's analysis with the marks imposed as revlib imposes them: before the inference and again after
    the deduction of parameters; marked storages live before the profile counted whole."""

    def _set_gradients_and_temporaries(self) -> None:
        marks: dict[int, tuple[TensorKey, Category, int]] = {}
        precedence = (Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE, Category.INPUT, Category.ACTIVATION)
        for event in self._op_tree.dfs():
            if event.name.startswith(timeline._MARK):
                name, nbytes = event.name.removeprefix(timeline._MARK).split()
                alias = next((child for child in event.children if child.name == "aten::alias" and child.typed[1].inputs), None)
                key = None if alias is None else TensorKey.from_tensor(alias.typed[1].inputs[0])
                if key is not None:
                    kept = marks.get(key.id)
                    if kept is None or precedence.index(Category[name]) < precedence.index(kept[1]):
                        marks[key.id] = (key, Category[name], int(nbytes))
        allocated = {TensorKey.from_allocation(event.typed[1]) for event in self._op_tree.dfs()
                     if event.typed[0].name == "Allocation" and event.typed[1].alloc_size > 0}
        self._marks = [(key, category) for key, category, _ in marks.values()]
        for key, _, nbytes in marks.values():
            if key not in allocated:
                self._size_map._values[key] = nbytes
        self._impose()
        super()._set_gradients_and_temporaries()

    def _set_parameters_using_data_flow(self) -> None:
        super()._set_parameters_using_data_flow()
        self._impose()

    def _impose(self) -> None:
        for key, category in self._marks:
            self._categories.set_by_id(key, category)


def _profiled(fn: Callable[..., Any], *args: Any) -> Any:
    """The profile of ``fn(*args)`` as :func:`revlib.memory_timeline` records it (after a warm-up)."""
    owners, inputs = timeline._owners_and_inputs(fn, args, {})
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        fn(*args)
    recorder = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True)
    with timeline._chatter_dropped():
        recorder.start()
        with record_function(timeline._CALL), timeline._identities_marked(owners, inputs):
            fn(*args)
        recorder.stop()
    return recorder.profiler.kineto_results


def _steps() -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
    images, flat = load_digits(flat=False), load_digits(flat=True)
    steps: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
    for family, width, data, names in (
        ("conv", 8, images, ("backprop", "checkpoint sqrt", "revolve-2", "reversible", "momentum", "adjoint heun",
                             "reversible heun", "torch every", "torch sequential", "SAC matmuls", "bf16 autocast",
                             "micro-batch 4")),
        ("transformer", 16, images, ("backprop", "SAC matmul+norm", "checkpoint every + bf16")),
        ("mlp", 16, flat, ("backprop", "adjoint euler")),
    ):
        builders = methods(family, 4, width, torch.device("cpu"), pytorch=True, combined=True)
        inputs, targets = data.x_train[:8].clone(), data.y_train[:8].clone()
        for name in names:
            torch.manual_seed(0)
            network = builders[name]()
            optimizer = make_optimizer("adam", network.model.parameters())
            steps[f"{family} {name}"] = (lambda n=network, x=inputs, y=targets, o=optimizer:
                                         training_step(n.model, x, y, o, micro_batches=n.micro_batches), ())
    torch.manual_seed(0)
    network = methods("conv", 4, 8, torch.device("cpu"))["checkpoint every"]()
    inputs, targets = images.x_train[:8].clone(), images.y_train[:8].clone()
    steps["a first step"] = (_first_step, (network.model, inputs, targets, "adam"))
    kept: list[Any] = []
    linear = torch.nn.Linear(13, 5)
    steps["autograd.grad, kept"] = (lambda: kept.append(torch.autograd.grad(linear(torch.ones(7, 13)).square().sum(),
                                                                            list(linear.parameters()))), ())
    return steps


STEPS = _steps()


def _assert_same(reference: MemoryProfile, flow: Flow) -> None:
    """The same timeline, the same category for every (storage, version), the same untyped allocations."""
    expected = sorted((time, action.value, _key(key), version, nbytes)
                      for time, action, (key, version), nbytes in reference.timeline if isinstance(key, TensorKey))
    found = sorted((time, action.value, key, version, nbytes) for time, action, key, version, nbytes in flow.timeline)
    assert found == expected
    versions = {(key, version) for _, _, (key, version), _ in reference.timeline if isinstance(key, TensorKey)}
    versions |= {(key, version + 1) for _, action, (key, version), _ in reference.timeline if action.name == "INCREMENT_VERSION"}
    categories = {(_key(key), version): reference._categories.get(key, version) for key, version in versions}
    assert {key: flow.category(*key) for key in categories} == categories
    assert len(set(categories.values())) >= 3  # a step classifies storages into several categories
    device = torch.device("cpu")
    untyped = sorted((event.start_time_ns, event.typed[1].ptr, event.typed[1].alloc_size) for event in reference._op_tree.dfs()
                     if event.typed[0].name == "Allocation" and event.typed[1].device == device
                     and TensorKey.from_allocation(event.typed[1]) is None)
    assert sorted(event[:3] for event in flow.untyped if event[3] == device) == untyped


@pytest.mark.parametrize("name", STEPS)
def test_the_analysis_is_pytorchs(name: str) -> None:
    fn, args = STEPS[name]
    result = _profiled(fn, *args)
    _assert_same(_MarkedProfile(result), analyse(result.experimental_event_tree(), timeline._MARK))


@pytest.mark.parametrize("name", ["conv backprop", "conv micro-batch 4", "a first step"])
def test_without_marks_the_inference_is_pytorchs_own(name: str) -> None:
    """Unmarked, PyTorch's inference decides alone (without Python stack tracing its two tracer steps add
    nothing), so the deductions the marks override are compared too: parameters from the data flow, inputs."""
    fn, args = STEPS[name]
    result = _profiled(fn, *args)
    _assert_same(MemoryProfile(result), analyse(result.experimental_event_tree(), "no such mark: "))


def test_the_timeline_of_a_step_is_read_off_the_analysis() -> None:
    """The categories a step's timeline shows are the analysis's, marks included (a negative control: without
    the marks, optimiser state is not known and bytes move between categories)."""
    fn, args = STEPS["conv backprop"]
    result = _profiled(fn, *args)
    flow = analyse(result.experimental_event_tree(), timeline._MARK)
    memory = timeline._timeline(flow, torch.device("cpu"))
    assert memory.largest["parameters"] > 0 and memory.largest["optimizer_state"] > memory.largest["parameters"]
    unmarked = timeline._timeline(analyse(result.experimental_event_tree(), "no such mark: "), torch.device("cpu"))
    assert unmarked.largest != memory.largest
