r"""The memory bill of one call, over time and by category: :func:`memory_timeline`.

PyTorch's memory profiler (``torch.profiler.profile(profile_memory=True)``) records every allocation and
free a call makes, on the CPU and on CUDA, to the byte, and its analysis (``torch.profiler._memory_profiler``)
infers from the operators' data flow what each tensor is: a parameter, a gradient, optimiser state, an
input, an activation, a temporary. The inference is right for an ordinary training step and wrong where the
data flow does not tell: without an optimiser step it takes the parameters for inputs (and then every
activation for an input too), and without Python stack tracing it does not know optimiser state.
:func:`memory_timeline` therefore first shows the profiler, tensor by tensor, what is known by identity —
the parameters and buffers of every module that runs, their gradients, the optimisers' state, the call's
input tensors — and lets the inference classify the rest; what it leaves unclassified is a temporary when
it lives within one phase of the call (forward, backward, optimiser step), else "other". The inference is
PyTorch's rules run by ``revlib._memory_flow``, which gives the same categories as PyTorch's own
analysis in a fraction of its time (tested on the book's training steps).

The chapters use it to draw a training step's memory (:func:`revlib.plotting.plot_timeline`) and to read
its peak off by category; :func:`added_peak` gives the peak alone, from the allocations without the
analysis, at a small fraction of the cost.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch._C._profiler import RecordScope, _EventType, _ProfilerEvent
from torch.autograd.profiler import record_function
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, Category

from revlib._memory_flow import Flow, Key, analyse
from revlib.runtime import resolve_device

__all__ = ["CATEGORIES", "PHASES", "MemoryTimeline", "Phase", "added_peak", "memory_timeline"]

CATEGORIES = ("parameters", "optimizer_state", "gradients", "inputs", "activations", "temporaries", "other")
"""The categories of a :class:`MemoryTimeline`, in the order they are stacked in a plot."""

PHASES = ("forward", "backward", "optimizer step")
"""The kinds of :class:`Phase`."""

_CALL = "revlib.timeline call"  # the record_function label around the measured call
_SEGMENT = "revlib.timeline segment"  # the label that separates the segments of a measured computation
_MARK = "revlib.timeline mark: "  # label of a mark: the profiler Category's name, then the storage's bytes
_ENGINE = "autograd::engine::evaluate_function"  # the autograd engine's label around each node it runs

# What the profiler's categories become; the others (INPUT, AUTOGRAD_DETAIL, none) depend on lifetime.
_NAMES = {
    Category.PARAMETER: "parameters",
    Category.OPTIMIZER_STATE: "optimizer_state",
    Category.GRADIENT: "gradients",
    Category.ACTIVATION: "activations",
    Category.TEMPORARY: "temporaries",
}

# Kineto's progress lines, written straight to the process's standard error at every start and stop of a
# profiler, and the CPU allocator's note that it cannot report freeing a block allocated before profiling.
_CHATTER = re.compile(r"^(USDT|STAGE):\d{4}-|^\[W.*Memory block of unknown size was allocated before the profiling started")


@dataclass(frozen=True)
class Phase:
    """An interval of the call: ``name`` is ``"forward"``, ``"backward"`` or ``"optimizer step"``; ``start``
    and ``end`` are seconds since the call started."""

    name: str
    start: float
    end: float


@dataclass(frozen=True, eq=False)
class MemoryTimeline:
    r"""Bytes held on one device during one call, by category, after each allocation and free.

    With :math:`b_c(t)` the bytes of category :math:`c` held at time :math:`t` (:attr:`series`), the total is
    :math:`b(t) = \sum_c b_c(t)`; :attr:`peak` is :math:`\max_t b(t)`, :attr:`at_peak` is :math:`b_c(t^\ast)` at
    the first time :math:`t^\ast` the peak is reached, and :attr:`largest` is :math:`\max_t b_c(t)` per category
    (categories peak at different times, so ``sum(largest.values()) >= peak``).

    Attributes:
        times: ``(T,)`` seconds since the call started: 0 for what was live when it started, then the time of
            each allocation or free (times may repeat), and last the end of the call.
        series: category (one of :data:`CATEGORIES`) → ``(T,)`` bytes held.
        phases: the call's forward, backward and optimiser-step intervals, in time order.
        device: the device measured.
    """

    times: np.ndarray
    series: Mapping[str, np.ndarray]
    phases: tuple[Phase, ...]
    device: torch.device

    @property
    def total(self) -> np.ndarray:
        """``(T,)`` bytes held in all categories together."""
        return np.sum(list(self.series.values()), axis=0)

    @property
    def peak(self) -> int:
        """The most bytes held at any moment of the call, what was live before it (:attr:`baseline`) included."""
        return int(self.total.max())

    @property
    def peak_time(self) -> float:
        """Seconds since the start of the call at which :attr:`peak` is first reached."""
        return float(self.times[int(self.total.argmax())])

    @property
    def at_peak(self) -> dict[str, int]:
        """Bytes per category at the moment of the :attr:`peak`; they sum to it."""
        return self._at(int(self.total.argmax()))

    @property
    def largest(self) -> dict[str, int]:
        """The most bytes each category held at any moment of the call."""
        return {name: int(values.max()) for name, values in self.series.items()}

    @property
    def at_start(self) -> dict[str, int]:
        """Bytes per category live when the call started (that it uses, or of its modules and optimisers)."""
        return self._at(0)

    @property
    def at_end(self) -> dict[str, int]:
        """Bytes per category live when the call returned."""
        return self._at(-1)

    @property
    def baseline(self) -> int:
        """Bytes live when the call started, the sum of :attr:`at_start`."""
        return int(self.total[0])

    @property
    def added_peak(self) -> int:
        """What the call adds at its peak to what was live before it, :attr:`peak` − :attr:`baseline`."""
        return self.peak - self.baseline

    def held(self, *categories: str) -> np.ndarray:
        """``(T,)`` bytes held in the given ``categories`` together (of :data:`CATEGORIES`), e.g.
        ``timeline.held("activations", "temporaries", "inputs").max()``: the most that the step's own tensors
        occupied at once, its parameters and gradients left out.

        Raises:
            ValueError: no category, or one not in :data:`CATEGORIES`.
        """
        if not categories:
            raise ValueError(f"name at least one category of {CATEGORIES}")
        unknown = [name for name in categories if name not in CATEGORIES]
        if unknown:
            raise ValueError(f"categories must be among {CATEGORIES}, got {unknown!r}")
        return np.sum([self.series[name] for name in categories], axis=0)

    def at(self, time: float) -> dict[str, int]:
        """Bytes per category held at ``time`` seconds since the start, after every event up to then (e.g. at
        ``timeline.phase("forward").end``)."""
        return self._at(max(int(np.searchsorted(self.times, time, side="right")) - 1, 0))

    def phase(self, name: str, occurrence: int = 0) -> Phase:
        """The ``occurrence``-th (from 0) phase called ``name``: ``"forward"``, ``"backward"`` or ``"optimizer step"``.

        Raises:
            ValueError: an unknown name, or fewer such phases.
        """
        if name not in PHASES:
            raise ValueError(f"name must be one of {PHASES}, got {name!r}")
        found = [phase for phase in self.phases if phase.name == name]
        if not 0 <= occurrence < len(found):
            raise ValueError(f"the call has {len(found)} {name} phase(s), so there is no occurrence {occurrence}")
        return found[occurrence]

    def largest_during(self, phase: str, *categories: str, occurrence: int = 0) -> int:
        """The most bytes the given ``categories`` held together at any moment of a phase, e.g.
        ``timeline.largest_during("backward", "temporaries")``: what the backward pass's own tensors occupied
        at their most.

        Raises:
            ValueError: an unknown phase or category, no category, or fewer such phases.
        """
        span = self.phase(phase, occurrence)
        held = self.held(*categories)
        during = (self.times >= span.start) & (self.times <= span.end)
        if not during.any():  # no event inside the phase: what was held when it began
            return int(held[max(int(np.searchsorted(self.times, span.start, side="right")) - 1, 0)])
        return int(held[during].max())

    def _at(self, index: int) -> dict[str, int]:
        return {name: int(values[index]) for name, values in self.series.items()}

    def __repr__(self) -> str:
        parts = ", ".join(f"{name} {value / 2**20:.3f}" for name, value in self.at_peak.items() if value)
        return (f"MemoryTimeline(on {self.device}: peak {self.peak / 2**20:.3f} MiB, {self.added_peak / 2**20:.3f} MiB over "
                f"the {self.baseline / 2**20:.3f} MiB live at the start; at the peak, in MiB: {parts}; "
                f"phases: {', '.join(phase.name for phase in self.phases) or 'none'})")


def memory_timeline(
    fn: Callable[..., Any],
    *args: Any,
    device: torch.device | str | None = None,
    track: nn.Module | Optimizer | Iterable[nn.Module | Optimizer] = (),
    **kwargs: Any,
) -> MemoryTimeline:
    r"""Bytes held by category over one call of ``fn(*args, **kwargs)``, measured by PyTorch's memory profiler.

    ``fn`` runs twice (a training step trains twice): once to warm up, then under the profiler. The result
    holds :math:`b_c(t)`, the bytes of each category :math:`c` live after each allocation and free of the
    measured call (:class:`MemoryTimeline`). Counted are the tensors the call allocates and, from its start
    (:attr:`MemoryTimeline.baseline`), those live before it that it uses or that belong to its modules and
    optimisers. Memory it never touches (another model, a data set) is not. The warm-up pays one-off costs
    and creates the ``.grad`` tensors and the state of a persistent optimiser, so the measured call of a
    training step is a steady-state step; to see a first step, let ``fn`` create its optimiser and release
    the gradients at its end (as :func:`revlib.measure.step_memory` does with ``first_step=True``).

    The categories:

    * ``parameters``: the parameters and buffers (BatchNorm's running statistics) of every ``nn.Module``
      that runs its forward, is found among the arguments (``fn`` itself, ``args``, ``kwargs``, in lists,
      tuples and dicts, a ``functools.partial``'s arguments, ``track``) or is optimised by an optimiser that
      steps or is found there; and what the profiler deduces is a parameter (a plain tensor updated with its
      gradient);
    * ``gradients``: their ``.grad`` tensors, and every gradient autograd accumulates into a leaf tensor;
    * ``optimizer_state``: the ``state`` tensors of every ``torch.optim.Optimizer`` that steps or is found
      among the arguments (Adam's two moments and its step counters, 0-d tensors);
    * ``inputs``: the tensors among the arguments; tensors live before the call that it reads and does not
      derive from parameters or gradients (a batch a closure captures); tensors the call creates from
      nothing it is given (random numbers, constants) and that outlive their phase (a batch it generates);
    * ``activations``: what the forward pass computes from the inputs and parameters, as long as it lives:
      the tensors autograd saves for backward (those a custom ``torch.autograd.Function`` saves or keeps
      on ``ctx`` included, when computed from its inputs), intermediate results, the output and the loss,
      and the seed gradient ``backward()`` creates for a scalar loss (4 bytes in float32);
    * ``temporaries``: buffers inside one operator (the profiler's ``TEMPORARY``), and every tensor or
      untyped allocation not classified above that is allocated and freed within one phase: the backward
      pass's gradients with respect to activations and what it recomputes (checkpointing, reversible and
      adjoint networks rebuild their activations there), the optimiser's intermediate results (Adam's
      denominator), convolution workspaces;
    * ``other``: what is not classified above and outlives the phase that allocated it, or was live before
      the call: allocations no operator ever reads as a tensor, such as the random-number-generator states
      (``torch.get_rng_state()``, 5056 bytes on the CPU) revlib's memory-saving sequences keep on ``ctx`` to
      replay dropout; results of the backward pass kept after it (the gradients ``torch.autograd.grad``
      returns); tensors live before the call that the profiler cannot classify.

    A tensor keeps its category through in-place updates the profiler cannot classify. The phases are runs of
    operators: ``"backward"`` of the autograd engine's (``autograd::engine::evaluate_function``),
    ``"optimizer step"`` of ``Optimizer.step`` (labelled ``Optimizer.step#...`` by ``torch.optim``), and
    ``"forward"`` of any others, the loss and ``backward()``'s seed gradient included;
    ``Optimizer.zero_grad`` belongs to no phase, and operators inside a ``torch.profiler.record_function``
    label count as if unlabelled.

    Exactness: on the CPU each allocation counts the bytes requested, and a tensor live before the call the
    bytes of its whole storage (when marked by identity; else the extent the call's views of it reach). The
    CPU allocator can report freeing only the blocks it allocated while a profiler ran: the warm-up runs
    under one, so a block allocated before the warm-up and freed during the measured call would stay counted
    as live (none is in a training step). On CUDA the caching allocator reports the blocks it hands out
    (multiples of 512 bytes): tensors allocated during the call count at their block's size, tensors live
    before it at their storage's size, and only CUDA memory is counted (Adam's step counters live on the
    CPU). Profiling does not change what is allocated, but it costs time: the warm-up and the call
    run under the profiler, and the analysis of the profile takes as long again. A training step of a
    16-block convolutional residual network (32 channels, 64 digits, Adam) that takes 0.17 s on two CPU
    cores takes 1.5 s to measure (some ten times the call; PyTorch's own analysis took twice that).

    Args:
        fn: the call to measure, e.g. a training step.
        *args: its positional arguments.
        device: the device whose memory is measured (``"cpu"`` or ``"cuda"``); ``None`` takes the device
            of the first tensor among the arguments, else of the first module or optimiser's parameters
            (:func:`revlib.runtime.default_device` when there is none).
        track: modules and optimisers to attribute by identity beyond those found among the arguments (the
            model and optimiser a closure uses), so that tensors the call frees before using them, such as
            gradients released by ``zero_grad()``, are attributed too.
        **kwargs: its keyword arguments (other than ``device`` and ``track``, which are this function's).

    Returns:
        The :class:`MemoryTimeline` of the measured call.

    Raises:
        TypeError: ``fn`` is not callable, ``track`` holds something that is neither an ``nn.Module`` nor a
            ``torch.optim.Optimizer``, or ``device`` is neither ``None``, a string nor a ``torch.device``.
        ValueError: ``device`` names no device PyTorch knows, or CUDA where there is none.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    tracked = list(track) if isinstance(track, Iterable) and not isinstance(track, nn.Module) else [track]
    for owner in tracked:
        if not isinstance(owner, (nn.Module, Optimizer)):
            raise TypeError(f"track must hold nn.Module and torch.optim.Optimizer objects, got a {type(owner).__name__}")
    found, inputs = _owners_and_inputs(fn, args, kwargs)
    owners = list(dict.fromkeys(tracked + found))
    device = _device_of(inputs, owners) if device is None else resolve_device(device)
    if device.type == "cuda" and device.index is None:  # the profiler names the device with its index
        device = torch.device("cuda", torch.cuda.current_device())

    with _chatter_dropped(), profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        fn(*args, **kwargs)  # warm-up, profiled so that the CPU allocator learns the sizes of what it allocates
    _synchronize(device)
    measured = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True)
    with _chatter_dropped(), _garbage_collection_paused():
        measured.start()
        try:
            with record_function(_CALL), _identities_marked(owners, inputs):
                fn(*args, **kwargs)
                _synchronize(device)
        finally:
            measured.stop()
    with _garbage_collection_paused():  # the analysis makes many small objects and no cycles
        return _timeline(analyse(measured.profiler.kineto_results.experimental_event_tree(), _MARK), device)  # type: ignore[union-attr]


def added_peak(
    fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None, **kwargs: Any
) -> int:
    r"""The most bytes one call of ``fn(*args, **kwargs)`` adds at once to what was allocated before it: the
    :attr:`MemoryTimeline.added_peak` of :func:`memory_timeline`, without the categories.

    ``fn`` runs twice, a warm-up and the measured call, as for :func:`memory_timeline`. On the CPU the measured
    call's allocations and frees are summed in the order the profiler recorded them (a call on the CPU alone:
    the sum does not tell devices apart); no analysis of the
    profile is made, so the measurement costs a third of a timeline's (three calls, where a timeline
    costs some ten). On CUDA the allocator's peak statistics are read (blocks of 512 bytes). Unlike
    :func:`revlib.measure.peak_memory`, which reads a fresh process's resident memory, it counts what
    PyTorch's allocator hands out, as :func:`memory_timeline` does.

    Args:
        fn: the call to measure, e.g. :func:`revlib.measure.forward_backward` of a model and a batch.
        *args: its positional arguments.
        device: the device whose memory is measured; ``None`` takes it from the arguments as
            :func:`memory_timeline` does.
        **kwargs: its keyword arguments (other than ``device``).

    Raises:
        TypeError: ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    found, inputs = _owners_and_inputs(fn, args, kwargs)
    device = _device_of(inputs, found) if device is None else resolve_device(device)
    ((peak, _),) = _segments([functools.partial(fn, *args, **kwargs)], device)
    return peak


def _segments(steps: list[Callable[[], Any]], device: torch.device) -> list[tuple[int, int]]:
    """Run ``steps`` twice (the first a warm-up) and return, for each step of the second run, the most bytes
    allocated during it and the bytes allocated at its end, both above those at its start."""
    if device.type == "cuda":
        for step in steps:
            step()
        found = []
        for step in steps:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            found.append((torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before))
        return found
    with _chatter_dropped(), profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        for step in steps:  # warm-up, profiled so that the allocator can report freeing what it allocates
            step()
    with _chatter_dropped(), _garbage_collection_paused(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        for step in steps:
            with record_function(_SEGMENT):
                pass
            step()
    events = sorted(profiled.profiler.kineto_results.events(), key=lambda event: event.start_ns())  # type: ignore[union-attr]
    found: list[tuple[int, int]] = []
    total, start, peak = 0, None, 0
    for event in events:
        if event.name() == _SEGMENT:
            if start is not None:
                found.append((peak - start, total - start))
            start = peak = total
        elif event.name() == "[memory]":
            total += event.nbytes()
            peak = max(peak, total)
    found.append((peak - start, total - start))  # type: ignore[operator]
    return found


# --- what is known by identity: marks the profiler records ----------------------------------------------


def _mark(category: Category, tensors: Iterable[Tensor | None]) -> None:
    """Show ``tensors`` to the profiler as the input of a no-op labelled with ``category`` and their storage's
    size, so that the analysis (``revlib._memory_flow``) can find their storages and impose the category on them."""
    with torch.no_grad():
        for tensor in tensors:
            if tensor is not None and tensor.layout == torch.strided:
                with record_function(f"{_MARK}{category.name} {tensor.untyped_storage().nbytes()}"):
                    torch.ops.aten.alias.default(tensor)  # a view: allocates nothing


def _mark_module(module: nn.Module, recurse: bool = True) -> None:
    parameters = list(module.parameters(recurse=recurse))
    _mark(Category.PARAMETER, [*parameters, *module.buffers(recurse=recurse)])
    _mark(Category.GRADIENT, (parameter.grad for parameter in parameters))


def _mark_optimizer(optimizer: Optimizer) -> None:
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    _mark(Category.PARAMETER, parameters)
    _mark(Category.GRADIENT, (parameter.grad for parameter in parameters))
    _mark(Category.OPTIMIZER_STATE, (value for state in optimizer.state.values() for value in state.values() if isinstance(value, Tensor)))


def _mark_owners(owners: Iterable[nn.Module | Optimizer]) -> None:
    for owner in owners:
        _mark_module(owner) if isinstance(owner, nn.Module) else _mark_optimizer(owner)


@contextlib.contextmanager
def _identities_marked(owners: list[nn.Module | Optimizer], inputs: list[Tensor]) -> Iterator[None]:
    """Mark the owners' tensors and the inputs at the start and the owners' again at the end; meanwhile, through
    global hooks, every module's own tensors before its first forward and every optimiser's after each step."""
    seen: set[int] = set()

    def module_ran(module: nn.Module, _: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            _mark_module(module, recurse=False)

    handles = [
        register_module_forward_pre_hook(module_ran),
        register_optimizer_step_post_hook(lambda optimizer, *_: _mark_optimizer(optimizer)),
    ]
    try:
        _mark_owners(owners)
        _mark(Category.INPUT, inputs)
        yield
        _mark_owners(owners)
    finally:
        for handle in handles:
            handle.remove()


# --- from the profile to the timeline ---------------------------------------------------------------------


def _timeline(flow: Flow, device: torch.device) -> MemoryTimeline:
    call = next(event for event in flow.roots if event.name == _CALL)
    start, end = call.start_time_ns, call.end_time_ns
    phases = _phases(flow.roots)
    boundaries = [time for phase in phases for time in (phase.start, phase.end)]

    def segment(time: int) -> int:
        """Which phase (odd: the phase number ``segment // 2``) or gap between phases (even) ``time`` is in."""
        return bisect.bisect_right(boundaries, time)

    def category_of(key: Key, version: int) -> Category | None:
        """The version's category, or the latest earlier version's when the profiler gave it none: an in-place
        update does not change what a tensor is."""
        for earlier in range(version, -1, -1):
            category = flow.category(key, earlier)
            if category is not None:
                return category
        return None

    def in_backward(time: int | None) -> bool:
        return time is not None and segment(time) % 2 == 1 and phases[segment(time) // 2].name == "backward"

    def name(category: Category | None, born: int | None, died: int | None) -> str:
        if category == Category.ACTIVATION and in_backward(born):
            category = None  # the profiler lets activations flow into the engine's own operators (sum_to, say)
        if category in _NAMES:
            return _NAMES[category]
        if born is not None and died is not None and segment(born) == segment(died):
            return "temporaries"
        return "inputs" if category == Category.INPUT else "other"

    events = [event for event in flow.timeline if event[2][2] == device]
    born = {key: time for time, action, key, _, _ in events if action == Action.CREATE}
    died = {key: time for time, action, key, _, _ in events if action == Action.DESTROY}
    initial = dict.fromkeys(CATEGORIES, 0)  # what was live when the call started
    changes: list[tuple[int, int, str, int]] = []  # (time, order, category, bytes added): allocations before frees
    for time, action, key, version, nbytes in events:
        category = name(category_of(key, version), born.get(key), died.get(key))
        if action == Action.PREEXISTING:
            initial[category] += nbytes
        elif action == Action.CREATE:
            changes.append((time, 0, category, nbytes))
        elif action == Action.INCREMENT_VERSION:  # the new version may belong to another category
            changes.append((time, 1, category, -nbytes))
            changes.append((time, 1, name(category_of(key, version + 1), born.get(key), died.get(key)), nbytes))
        else:
            changes.append((time, 2, category, -nbytes))
    for allocated, freed, nbytes in _untyped_blocks(flow, device):
        category = name(None, allocated, freed)
        if allocated is None:
            initial[category] += nbytes
        else:
            changes.append((allocated, 0, category, nbytes))
        if freed is not None:
            changes.append((freed, 2, category, -nbytes))
    changes.sort(key=lambda change: change[:2])

    times = np.clip(np.array([start, *(time for time, *_ in changes), end], dtype=np.int64), start, end)
    series = {}
    for category in CATEGORIES:
        steps = np.zeros(len(times), dtype=np.int64)
        steps[0] = initial[category]
        steps[1:-1] = [nbytes if changed == category else 0 for _, _, changed, nbytes in changes]
        series[category] = np.cumsum(steps)  # the last entry, at the end of the call, repeats the one before
    return MemoryTimeline(
        times=(times - start) / 1e9,
        series=series,
        phases=tuple(Phase(phase.name, (phase.start - start) / 1e9, (phase.end - start) / 1e9) for phase in phases),
        device=device,
    )


def _untyped_blocks(flow: Flow, device: torch.device) -> list[tuple[int | None, int | None, int]]:
    """The allocations the profiler could not tie to a tensor, as ``(allocated, freed, bytes)`` with ``None``
    for a time outside the profile (allocated before it, or still live at its end)."""
    live: dict[int, tuple[int, int]] = {}
    blocks: list[tuple[int | None, int | None, int]] = []
    for time, pointer, nbytes, _ in sorted((event for event in flow.untyped if event[3] == device), key=lambda event: event[0]):
        if nbytes > 0:
            live[pointer] = (time, nbytes)
        elif pointer in live:
            allocated, size = live.pop(pointer)
            blocks.append((allocated, time, size))
        else:
            blocks.append((None, time, -nbytes))
    return blocks + [(allocated, None, nbytes) for allocated, nbytes in live.values()]


def _phases(roots: Iterable[_ProfilerEvent]) -> list[Phase]:
    """Runs of forward, backward and optimiser-step operators, in nanoseconds of the profiler's clock."""
    units: list[tuple[int, int, str]] = []

    def visit(event: _ProfilerEvent) -> None:
        if event.typed[0] != _EventType.TorchOp or event.name.startswith((_MARK, "Optimizer.zero_grad#")):
            return
        if event.name.startswith("Optimizer.step#"):
            units.append((event.start_time_ns, event.end_time_ns, "optimizer step"))
        elif event.name.startswith(_ENGINE) or event.typed[1].scope == RecordScope.BACKWARD_FUNCTION:
            units.append((event.start_time_ns, event.end_time_ns, "backward"))
        elif event.typed[1].scope == RecordScope.USER_SCOPE:  # a label: what it holds decides
            for child in event.children:
                visit(child)
        else:
            units.append((event.start_time_ns, event.end_time_ns, "forward"))

    for root in roots:
        visit(root)
    phases: list[Phase] = []
    for start, end, kind in sorted(units):
        if phases and phases[-1].name == kind:
            phases[-1] = Phase(kind, phases[-1].start, max(phases[-1].end, end))
        else:
            phases.append(Phase(kind, start, end))
    return phases


# --- arguments, devices and output ------------------------------------------------------------------------


def _owners_and_inputs(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], list[Tensor]]:
    """The modules and optimisers found in ``fn`` and its arguments, and the tensors among the arguments."""
    owners = [value for value in _leaves([*_arguments_of(fn), *args, *kwargs.values()]) if isinstance(value, (nn.Module, Optimizer))]
    inputs = [value for value in _leaves([*args, *kwargs.values()]) if isinstance(value, Tensor)]
    return owners, inputs


def _arguments_of(fn: Callable[..., Any]) -> list[Any]:
    """What ``fn`` carries: itself (a module), its ``__self__`` (a bound method), a partial's arguments."""
    if isinstance(fn, functools.partial):
        return [*_arguments_of(fn.func), *fn.args, *fn.keywords.values()]
    return [fn, getattr(fn, "__self__", None)]


def _leaves(values: Iterable[Any]) -> Iterator[Any]:
    """The values, with lists, tuples and dicts opened (recursively)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _leaves(value)
        elif isinstance(value, dict):
            yield from _leaves(value.values())
        else:
            yield value


def _device_of(inputs: list[Tensor], owners: list[nn.Module | Optimizer]) -> torch.device:
    for tensor in inputs:
        return tensor.device
    for owner in owners:
        parameters = owner.parameters() if isinstance(owner, nn.Module) else (p for group in owner.param_groups for p in group["params"])
        for parameter in parameters:
            return parameter.device
    return resolve_device(None)  # nothing to follow: the default device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """No collection of reference cycles meanwhile: it would free, at a moment of its own, garbage made before
    the call (cheaper than collecting it all first)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


@contextlib.contextmanager
def _chatter_dropped() -> Iterator[None]:
    """Catch what native code writes to the standard error's file descriptor meanwhile and pass it on at the
    end, less the profiler's chatter (:data:`_CHATTER`), which a notebook would show in every cell that profiles."""
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to filter
        yield
        return
    if sys.stderr is None:  # pythonw: nothing to pass anything on to
        os.close(saved)
        yield
        return
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _CHATTER.match(line))
            if kept:
                sys.stderr.write(kept)
