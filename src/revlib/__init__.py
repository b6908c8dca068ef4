"""revlib: training deep networks without drowning in memory.

The companion library of the book. One module per chapter, plus shared infrastructure:

* :mod:`revlib.runtime` — devices, seeding, the chapters' scale;
* :mod:`revlib.claims` — the chapters' assertions about measured quantities, with their margins;
* :mod:`revlib.settings` — every chapter's experiments at the small and the large scale;
* :mod:`revlib.data` — data sets that need no network (and CIFAR-10 from a local copy);
* :mod:`revlib.training` — the training loop and its history;
* :mod:`revlib.measure` — bytes saved for backward, peak memory, timing;
* :mod:`revlib.timeline` — the memory a call holds over time, by category, from PyTorch's memory profiler;
* :mod:`revlib.verify` — relative errors, finite differences, flat gradients: the checks of every gradient;
* :mod:`revlib.plotting` — the book's figure style (imported on first use, as it loads matplotlib).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from revlib.claims import claim
from revlib.data import Dataset, find_cifar10, load_cifar10, load_digits, make_spirals
from revlib.measure import LineFit, Timing, compare_times, count_calls, fit_line, forward_backward, peak_memory, saved_tensor_bytes, time_call
from revlib.runtime import book_scale, book_seed, default_device, resolve_device, seed_everything
from revlib.settings import chapter_settings
from revlib.timeline import MemoryTimeline, memory_timeline
from revlib.training import History, evaluate, fit

__version__ = "0.1.0"

_LAZY_SUBMODULES = {"plotting"}

__all__ = [
    "Dataset",
    "History",
    "LineFit",
    "MemoryTimeline",
    "Timing",
    "book_scale",
    "book_seed",
    "chapter_settings",
    "claim",
    "compare_times",
    "count_calls",
    "default_device",
    "evaluate",
    "fit",
    "find_cifar10",
    "fit_line",
    "forward_backward",
    "load_cifar10",
    "load_digits",
    "make_spirals",
    "memory_timeline",
    "peak_memory",
    "resolve_device",
    "saved_tensor_bytes",
    "seed_everything",
    "time_call",
]


def __getattr__(name: str) -> ModuleType:
    """Import heavy submodules (``revlib.plotting``) only when first used."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"revlib.{name}")
    raise AttributeError(f"module 'revlib' has no attribute {name!r}")
