"""Measuring what training costs: bytes saved for backward, peak memory, time, and the bill of one step.

Three instruments, from the most to the least abstract:

* :func:`saved_tensor_bytes` counts the bytes autograd keeps for the backward pass during one forward
  pass. It sees every tensor handed to autograd (``ctx.save_for_backward`` included) through
  ``torch.autograd.graph.saved_tensors_hooks`` and counts each underlying storage once, at its full size: a
  tensor saved twice costs nothing extra, and neither does a view of a storage already counted, but a view
  is charged for the whole storage it looks into (save a slice of a large batch and the whole batch is
  counted: ``.clone()`` the slice). It does not see tensors a custom function keeps as plain attributes of
  ``ctx``. It is exact and identical on every machine. :class:`SavedTensors` records the same inside a
  ``with`` block and says which of the tensors you name were saved.
* :func:`peak_memory` measures the real extra memory of a step (e.g. forward + backward). On CUDA it
  reads the caching allocator's peak statistics. On the CPU it runs the step in a fresh Python process and
  reads the peak resident set size of that process (Linux's ``VmHWM``, reset just before the step; where
  it cannot be reset, the peak so far is first occupied by a ballast buffer).
* :func:`time_call` times a call with warm-up, repeats and the median, synchronising the accelerator;
  :func:`compare_times` times several calls in turns, and :func:`operator_profile` splits one call's time by
  PyTorch operator.

:func:`step_memory` gives the bill of one training step (:func:`revlib.training.training_step`) by
category, from PyTorch's memory profiler (:func:`revlib.timeline.memory_timeline`): parameters, gradients, optimiser
state, activations, the batch, and the peak with what each category held at it.
"""

from __future__ import annotations

import gc
import io
import json
import os
import pickle
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from revlib._checks import positive_integers
from revlib.runtime import resolve_device
from revlib.timeline import MemoryTimeline, memory_timeline
from revlib.training import make_optimizer, training_step

__all__ = [
    "SavedTensors",
    "StepMemory",
    "Timing",
    "compare_times",
    "count_calls",
    "count_calls_per_module",
    "forward_backward",
    "operator_profile",
    "peak_memory",
    "saved_tensor_bytes",
    "step_memory",
    "time_call",
]

BYTES_PER_KIB = 1024  # /proc/self/status reports kibibytes


def _storage_key(tensor: Tensor) -> tuple[str, int]:
    """Identify the memory a tensor lives in, so that views and repeats are counted once."""
    return str(tensor.device), tensor.untyped_storage().data_ptr()


class SavedTensors:
    """What autograd saves for the backward pass inside a ``with`` block, storage by storage.

    ``with SavedTensors() as saved: loss = model(x).sum()`` records every tensor handed to autograd for
    backward while the block runs (through ``torch.autograd.graph.saved_tensors_hooks``), each underlying
    storage once at its full size, as :func:`saved_tensor_bytes` counts them. :meth:`by_name` then says which
    of the tensors you hold were saved: the picture of a computational graph with its stored values.

    Args:
        exclude: tensors whose storages are not recorded (e.g. ``model.parameters()``).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.excluded = {_storage_key(tensor) for tensor in exclude}
        self.sizes: dict[tuple[str, int], int] = {}  # storage key -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in self.excluded:
            self.sizes[key] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exception: Any) -> None:
        self._hooks.__exit__(*exception)

    @property
    def total(self) -> int:
        """Bytes of all the storages recorded."""
        return sum(self.sizes.values())

    def by_name(self, named: Mapping[str, Tensor]) -> dict[str, int]:
        """Bytes saved per named tensor (0 for one autograd did not save), and ``"other"``: the saved storages
        that none of the ``named`` tensors lives in (intermediate results the caller holds no name for).

        A name whose tensor shares its storage with an earlier name is charged 0 (each storage once).

        Raises:
            ValueError: a name is ``"other"``.
        """
        if "other" in named:
            raise ValueError('"other" is the name of the unnamed rest; give the tensor another name')
        bytes_by_name: dict[str, int] = {}
        claimed: set[tuple[str, int]] = set()
        for name, tensor in named.items():
            key = _storage_key(tensor)
            bytes_by_name[name] = self.sizes.get(key, 0) if key not in claimed else 0
            claimed.add(key)
        bytes_by_name["other"] = sum(size for key, size in self.sizes.items() if key not in claimed)
        return bytes_by_name


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, exclude: Iterable[Tensor] = (), **kwargs: Any) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn(*args, **kwargs)`` runs.

    Each storage counts once, at its full size, however many tensors view it. Storages of the tensors in
    ``exclude`` are not counted: pass ``model.parameters()`` to count activations only (a linear layer
    saves its weight to compute the input's gradient, but the weight is resident anyway).

    Under ``torch.no_grad()``, or when no input or parameter requires grad, nothing is saved and the
    result is 0: that is the memory bill of prediction.

    Args:
        fn: the forward computation, e.g. ``model``.
        *args: positional arguments of ``fn``, e.g. the input batch.
        exclude: tensors whose storages are not counted.
        **kwargs: keyword arguments of ``fn``.

    Returns:
        The number of bytes.
    """
    with SavedTensors(exclude) as saved:
        fn(*args, **kwargs)
    return saved.total


def forward_backward(model: nn.Module, inputs: Tensor) -> None:
    """One training step without an optimiser: ``model(inputs).sum().backward()``.

    The step whose memory :func:`peak_memory` measures in the chapters; the sum's gradient is a tensor of
    ones, so the backward pass does the same work as for any loss.
    """
    model(inputs).sum().backward()


def count_calls(modules: Iterable[nn.Module], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """How many times the ``modules`` together ran their forward during ``fn(*args, **kwargs)``.

    Counts evaluations of a network's blocks in one step, e.g. the recomputations of a checkpointing schedule:
    ``count_calls(model.blocks, forward_backward, model, inputs)``. Counted with forward pre-hooks (removed
    afterwards), so an evaluation counts when it begins: PyTorch's checkpoint stops a recomputation once it has
    rebuilt the last tensor the backward pass needs, before the module's forward returns.
    """
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    hooks = [module.register_forward_pre_hook(count) for module in modules]
    try:
        fn(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def count_calls_per_module(modules: Iterable[nn.Module], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, ...]:
    """How many times each of ``modules`` ran its forward during ``fn(*args, **kwargs)``, in the order given.

    :func:`count_calls` block by block, in one call of ``fn``: e.g. a checkpointing schedule's evaluations of
    each block in one step, to compare with :attr:`revlib.checkpoint.CheckpointPlan.runs`. A module given twice
    gets the same count at both places.
    """
    modules = list(modules)
    calls: dict[int, int] = {}

    def count(module: nn.Module, _: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1

    hooks = [module.register_forward_pre_hook(count) for module in {id(m): m for m in modules}.values()]
    try:
        fn(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(calls.get(id(module), 0) for module in modules)


def _device_of(args: tuple[Any, ...]) -> torch.device:
    for value in args:
        if isinstance(value, Tensor):
            return value.device
        if isinstance(value, nn.Module):
            for parameter in value.parameters():
                return parameter.device
    return resolve_device(None)  # nothing to follow: the default device


def peak_memory(fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None, timeout: float = 600.0) -> int:
    """Peak memory, in bytes, that one call of ``fn(*args)`` adds to what is already allocated.

    ``fn`` is called twice; the second call is measured. The first (warm-up) pays one-off costs: lazy
    initialisation of kernels and thread pools, and allocation of the parameters' ``.grad`` tensors, which
    the second call accumulates into. What is reported is therefore the memory of the step itself —
    activations kept for backward plus temporaries — on top of the model, its inputs and its gradients.

    * **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
      allocated before the call. Exact for tensors; excludes the caching allocator's reserve and the CUDA
      context.
    * **CPU**: ``fn`` and ``args`` are pickled into a fresh Python process (with
      ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns freed large blocks to the system) which, after
      the warm-up, resets its peak resident set size (``/proc/self/clear_refs``) and reports
      ``VmHWM − VmRSS`` around the measured call. Limits: resolution is one page (4 KiB); resident memory
      also counts the interpreter's and libraries' own pages touched during the call (typically well under
      a megabyte after warm-up), and small allocations served from glibc's heap may stay resident after
      being freed; pages allocated but never written are not counted. Where the peak cannot be reset
      (no ``/proc/self/clear_refs``, e.g. macOS), the child fills the gap between its resident memory and
      its peak so far (``ru_maxrss``) with a written ballast buffer before the measured call, so that only
      the call can raise the peak, and reports the peak after the call less the resident memory before it.
      ``fn`` must be picklable: a module-level function (e.g. :func:`forward_backward`) whose arguments
      are built from importable classes, not classes defined in a notebook.

    Args:
        fn: the step, e.g. :func:`forward_backward`.
        *args: its arguments, e.g. ``(model, inputs)``.
        device: ``"cuda"`` or ``"cpu"`` (other accelerators are refused); ``None`` takes the device of the
            first tensor or module in ``args`` (:func:`revlib.runtime.default_device` when there is none).
        timeout: on the CPU, seconds the measuring process may run (both calls and its start) before it is
            stopped.

    Raises:
        TypeError: on the CPU, ``fn`` or ``args`` cannot be pickled.
        ValueError: ``timeout`` is not positive, or the device is neither the CPU nor CUDA.
        RuntimeError: the measuring process failed (its error output is included) or ran out of time.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    device = _device_of(args) if device is None else resolve_device(device)
    if device.type == "cuda":
        return _peak_cuda(fn, args, device)
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures the CPU and CUDA devices, not {device.type!r}")
    return _peak_cpu_subprocess(fn, args, timeout)


def _peak_cuda(fn: Callable[..., Any], args: tuple[Any, ...], device: torch.device) -> int:
    fn(*args)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _peak_cpu_subprocess(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> int:
    payload = io.BytesIO()
    try:
        torch.save({"fn": fn, "args": args, "threads": torch.get_num_threads(), "reset_peak": _RESET_PEAK_RSS}, payload)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(
            "peak_memory on the CPU runs fn(*args) in a fresh process, so fn and args must be picklable "
            f"(module-level functions and importable classes): {error}"
        ) from error
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        child = subprocess.run(
            [sys.executable, "-c", "from revlib.measure import _peak_rss_child; _peak_rss_child()"],
            input=payload.getvalue(),
            capture_output=True,
            env=environment,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"the peak-memory process ran longer than timeout={timeout} seconds and was stopped") from error
    if child.returncode != 0:
        raise RuntimeError(
            "the peak-memory process failed; if fn or an argument's class is defined in a notebook or "
            "__main__, move it into a module. Its error output ends with:\n"
            + child.stderr.decode(errors="replace")[-2000:]
        )
    return int(json.loads(child.stdout.decode().strip().splitlines()[-1])["bytes"])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _resident_bytes() -> int:
    """This process's resident memory now: from /proc where there is one, else from ``ps`` (macOS, BSD)."""
    if os.path.exists("/proc/self/status"):
        return _status_kib("VmRSS") * BYTES_PER_KIB
    output = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, check=True).stdout
    return int(output.split()[0]) * BYTES_PER_KIB  # ps reports kilobytes


def _reset_peak_rss() -> bool:
    """Reset Linux's high-water mark of resident memory; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


# Whether the measuring process may reset its peak resident memory (Linux); tests turn it off to check the fallback.
_RESET_PEAK_RSS = True


def _peak_rss_child() -> None:
    """Entry point of the measuring process started by :func:`peak_memory` (reads its payload on stdin)."""
    payload = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)
    torch.set_num_threads(payload["threads"])
    fn, args, may_reset = payload["fn"], payload["args"], payload["reset_peak"]
    del payload
    fn(*args)  # warm-up: one-off costs (kernels, thread pools, .grad buffers) are paid here
    gc.collect()
    if may_reset and _reset_peak_rss():
        before = _status_kib("VmRSS") * BYTES_PER_KIB
        fn(*args)
        peak_bytes = _status_kib("VmHWM") * BYTES_PER_KIB - before
    else:  # the peak cannot be reset (macOS and others): lift resident memory up to it, so that only the call raises it
        import resource  # POSIX only, so imported where it is needed: `import revlib` works on Windows

        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
        gap = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - _resident_bytes()
        ballast = np.ones(max(gap, 0), dtype=np.uint8)  # written, so resident: the earlier peak, now occupied
        before = _resident_bytes()
        fn(*args)
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - before
        del ballast
    print(json.dumps({"bytes": max(peak_bytes, 0)}))


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated calls, in seconds."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        """The median time, robust to the odd slow repeat."""
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """The interquartile range divided by the median, a measure of how noisy the timing was."""
        if len(self.times) < 4:
            return 0.0
        quartiles = statistics.quantiles(self.times, n=4)
        return (quartiles[2] - quartiles[0]) / self.median

    @property
    def central_range(self) -> tuple[float, float]:
        """The fastest and slowest of the repeats left when the fastest and the slowest quarter
        (:math:`\\lfloor n/4 \\rfloor` repeats each) are set aside: the middle five of seven, an error bar
        that the odd slow repeat does not stretch."""
        ordered = sorted(self.times)
        trimmed = len(ordered) // 4
        return ordered[trimmed], ordered[len(ordered) - 1 - trimmed]

    def __repr__(self) -> str:
        return f"Timing(median {self.median * 1e3:.3f} ms over {len(self.times)} repeats, spread {self.spread:.0%})"


def time_call(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 2,
    repeats: int = 7,
    device: torch.device | str | None = None,
) -> Timing:
    """Time ``fn(*args)``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On an accelerator (CUDA, MPS, …) each timed call is bracketed by ``torch.accelerator.synchronize`` so
    that the time covers the kernels, not just their launch.

    Args:
        fn: the call to time.
        *args: its arguments.
        warmup: untimed calls first (caches, lazy initialisation, allocator growth).
        repeats: timed calls (at least 1).
        device: the device to synchronise (``None``: taken from ``args`` as in :func:`peak_memory`).

    Raises:
        ValueError: ``warmup`` is negative or ``repeats`` is not positive.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}")
    positive_integers(repeats=repeats)
    device = _device_of(args) if device is None else resolve_device(device)

    def synchronise() -> None:
        if device.type != "cpu":  # wait for the accelerator's queued kernels (CUDA, MPS, XPU, …)
            torch.accelerator.synchronize(device)

    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        synchronise()
        start = time.perf_counter()
        fn(*args)
        synchronise()
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def compare_times(
    calls: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    device: torch.device | str | None = None,
    shuffle: bool = False,
) -> dict[str, Timing]:
    """Time several calls in turns (round-robin), so that a change of machine load hits them all alike.

    Ratios of the returned medians are far more stable on a noisy machine than those of separate
    :func:`time_call` runs, which measure each call in a different stretch of time. In the fixed order each
    call always follows the same one, and a call runs slower after one that filled the caches with its own
    data: the variant timed right after plain autograd in ``benchmarks/reversible.py`` took some 1 % longer.
    ``shuffle=True`` runs each timed round in a new order instead (shuffled from a fixed seed, so the order
    is the same from run to run), for comparisons of three or more calls that this could decide.

    Args:
        calls: zero-argument calls by name.
        warmup: untimed rounds first.
        repeats: timed rounds.
        device: the device to synchronise (``None``: :func:`revlib.runtime.default_device`, since the calls'
            tensors are not visible here).
        shuffle: run each timed round in a new order (the warm-up rounds run in the given order).

    Raises:
        ValueError: ``calls`` is empty, ``warmup`` is negative or ``repeats`` is not positive.
    """
    if not calls:
        raise ValueError("calls must name at least one call")
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}")
    positive_integers(repeats=repeats)
    device = resolve_device(device)
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order, generator = list(calls.items()), random.Random(0)
    for _ in range(repeats):
        if shuffle:
            generator.shuffle(order)
        for name, call in order:
            samples[name].extend(time_call(call, warmup=0, repeats=1, device=device).times)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


class _quiet_stderr:
    """Send the process's standard error (file descriptor 2, which C++ libraries write to) to the null device
    for the duration of a ``with`` block."""

    def __enter__(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 2)

    def __exit__(self, *exception: Any) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        os.close(self._null)

def operator_profile(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, tuple[float, int]]:
    """Where one call ``fn(*args, **kwargs)`` spends its time, by PyTorch operator, from ``torch.profiler``:
    ``{name: (share, calls)}`` with ``share`` the operator's self CPU time over the total self CPU time of the
    call (the shares add up to 1) and ``calls`` how many times it ran, most expensive first.

    Self time counts an operator without the operators it calls, so ``aten::cat`` is the concatenations
    themselves. On a GPU the CPU time is what launching the kernels costs, not what they run for. The counts
    are exact; the shares vary from run to run like any timing. The profiler's own start and stop messages
    (written by its C++ library to the standard error) are silenced; what ``fn`` writes there is lost too.
    """
    from torch.profiler import profile

    with _quiet_stderr(), profile() as profiler:
        fn(*args, **kwargs)
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    shares = {event.key: (event.self_cpu_time_total / total, event.count) for event in events}
    return dict(sorted(shares.items(), key=lambda item: -item[1][0]))


@dataclass(frozen=True)
class StepMemory:
    """The memory bill of one training step (:func:`revlib.training.training_step`), measured by category.

    Every figure is read off the step's :class:`~revlib.timeline.MemoryTimeline` (PyTorch's memory profiler,
    exact to the byte on the CPU). ``parameters``, ``gradients``, ``optimizer_state``, ``activations`` and
    ``inputs`` are the most bytes each category held at any moment of the step (they peak at different
    moments); ``peak`` is the most held at once, everything included, and ``at_peak`` what each category held
    then (``temporaries``: gradients with respect to activations, recomputed activations, workspaces).

    Attributes:
        parameters: the model's parameters and buffers.
        gradients: the parameters' ``.grad`` tensors.
        optimizer_state: the optimiser's state (Adam: two moments per parameter and its step counters).
        activations: what the forward pass computed and kept, at its most (usually at the end of forward).
        inputs: the batch and the targets.
        peak: the most bytes held at once during the step.
        at_peak: category → bytes at the moment of the peak; they sum to ``peak``.
        timeline: the whole measurement, to plot (:func:`revlib.plotting.plot_timeline`).
        persistent_state: whether the optimiser's state was there before the step and stays through it (a
            steady-state step), rather than created in the update (a first step).
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    inputs: int
    peak: int
    at_peak: Mapping[str, int] = field(repr=False)
    timeline: MemoryTimeline = field(repr=False, compare=False)
    persistent_state: bool = True

    @property
    def parts(self) -> int:
        """The naive bill, every category at its most, added as if all were held at once."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.inputs

    @property
    def floor(self) -> int:
        """What the step must hold at once at some moment. That is the parameters and the batch, and either the
        activations at their most (in the forward pass; with the optimiser's state too when that state
        persists from step to step) or the gradients and the optimiser state (during the update). The peak
        is at least this, and above :attr:`parts` only by temporaries."""
        held_with_activations = self.optimizer_state if self.persistent_state else 0
        update = self.gradients + self.optimizer_state
        return self.parameters + self.inputs + max(self.activations + held_with_activations, update)


def _first_step(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: str) -> None:
    """A training step with a fresh optimiser, its gradients released afterwards: what a first step
    allocates (its activations, gradients and optimiser state) is allocated inside every call."""
    training_step(model, inputs, targets, make_optimizer(optimizer, model.parameters()))
    model.zero_grad(set_to_none=True)


def step_memory(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: str = "adam", *, first_step: bool = False,
                micro_batches: int = 1) -> StepMemory:
    """The memory bill of one training step of ``model`` on a batch, measured by category.

    By default a steady-state step: an optimiser that persists from step to step (its state already there)
    and the gradients released at the start of each step, as a training loop's ``zero_grad()`` does. With
    ``first_step=True`` the step of a fresh optimiser, which allocates its state *after* the activations are
    freed (Adam's first step), so its peak can be lower than training's. The model is trained by the two steps
    the measurement runs (a warm-up and the measured one). ``micro_batches > 1``: a steady-state step that
    accumulates the gradients of that many parts of the batch (:func:`revlib.training.training_step`).

    Raises:
        ValueError: an unknown optimiser.
    """
    make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)])  # checks the name
    if first_step:
        timeline = memory_timeline(_first_step, model, inputs, targets, optimizer)
    else:
        timeline = memory_timeline(training_step, model, inputs, targets, make_optimizer(optimizer, model.parameters()),
                                   micro_batches=micro_batches)
    largest = timeline.largest
    return StepMemory(
        parameters=largest["parameters"],
        gradients=largest["gradients"],
        optimizer_state=largest["optimizer_state"],
        activations=largest["activations"],
        inputs=largest["inputs"],
        peak=timeline.peak,
        at_peak=timeline.at_peak,
        timeline=timeline,
        persistent_state=not first_step,
    )
