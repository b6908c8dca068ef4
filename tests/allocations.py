"""What the code holds while it runs: the running total of bytes allocated, from PyTorch's profiler.

Shared by the tests of the memory-saving sequences, which check what their backward passes hold at every
moment, not what their plans say.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch import nn

MARK = "revlib-test-mark"


def _profiled(fn: Callable[[], object]) -> list:
    fn()  # warm-up: one-off allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted(prof.profiler.kineto_results.events(), key=lambda event: event.start_ns())


def added_peak(fn: Callable[[], object]) -> int:
    """The most bytes ``fn()`` held at once beyond what was allocated before it (CPU allocations)."""
    total = peak = 0
    for event in _profiled(fn):
        if event.name() == "[memory]":
            total += event.nbytes()
            peak = max(peak, total)
    return peak


def live_at_marks(fn: Callable[[], object]) -> list[int]:
    """The bytes ``fn()`` held beyond what it started with, at each entry into a :class:`Marked` module's
    forward with gradients enabled (a recomputation with its graph: a turn)."""
    total, marks = 0, []
    for event in _profiled(fn):
        if event.name() == "[memory]":
            total += event.nbytes()
        elif event.name() == MARK:
            marks.append(total)
    return marks


class Marked(nn.Module):
    """``module``, marking the profile each time it runs with its graph."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            with record_function(MARK):
                pass
        return self.module(x)
