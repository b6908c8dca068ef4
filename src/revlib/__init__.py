"""revlib: training deep networks without drowning in memory.

The companion library of the book. ``import revlib`` is cheap: it imports nothing until a name is used, so
``revlib.ReversibleSequence`` or ``revlib.reversible.ReversibleSequence`` loads the module that defines it
on first use. One module per idea, in the book's order,

* :mod:`revlib.backprop` — backpropagation written out by hand (chapter 01);
* :mod:`revlib.residual` — plain and residual networks, gradient flow, lesions, loss landscapes (02);
* :mod:`revlib.reversible` — reversible blocks and sequences, RevNet, the reversible Transformer (03);
* :mod:`revlib.adjoint` — ResNets as Neural ODEs and adjoint backprop (04);
* :mod:`revlib.reversible_heun` — the reversible Heun method: exact gradients in memory flat in depth (04);
* :mod:`revlib.linear_backprop` — linear backprop and the straight-through estimator (05);
* :mod:`revlib.checkpoint` — gradient checkpointing, from every block to the optimal schedule (06);
* :mod:`revlib.momentum` — momentum residual networks (07);
* :mod:`revlib.frontier` — every method on one training step (07);
* :mod:`revlib.planner` — fit a chain of blocks into a memory budget at the least predicted time (06–07),

built from :mod:`revlib.blocks` (activations, residual functions, residual blocks) and measured with the
infrastructure: :mod:`revlib.runtime` (devices, seeds, scale), :mod:`revlib.settings` (each chapter's
experiments at two scales), :mod:`revlib.data`, :mod:`revlib.training`, :mod:`revlib.measure` (saved bytes,
peak memory, time, a step's bill), :mod:`revlib.timeline` (the memory a call holds over time, by
category, from PyTorch's memory profiler), :mod:`revlib.analysis` (fits), :mod:`revlib.verify` (gradient checks),
:mod:`revlib.claims` (asserted claims) and :mod:`revlib.plotting` (the book's figures; loads matplotlib).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = (
    "adjoint", "analysis", "backprop", "blocks", "checkpoint", "claims", "data", "frontier", "linear_backprop",
    "measure", "momentum", "planner", "plotting", "pytorch_tools", "residual", "reversible", "reversible_heun", "runtime",
    "settings", "timeline", "training", "verify",
)

_EXPORTS = {  # name → the module that defines it
    # the book's memory-saving modules and the networks built from them
    "ReversibleBlock": "reversible",
    "ReversibleSequence": "reversible",
    "RevNet": "reversible",
    "ResNet": "reversible",
    "ReversibleTransformer": "reversible",
    "ODEResNet": "adjoint",
    "ReversibleHeunResNet": "reversible_heun",
    "LinearBackprop": "linear_backprop",
    "convert_to_linear_backprop": "linear_backprop",
    "CheckpointedSequence": "checkpoint",
    "checkpoint_plan": "checkpoint",
    "BlockCosts": "checkpoint",
    "measure_block_costs": "checkpoint",
    "plan": "planner",
    "PlanReport": "planner",
    "Planner": "planner",
    "MomentumSequence": "momentum",
    "MLP": "backprop",
    "ResidualBlock": "blocks",
    # infrastructure
    "DataSplits": "data",
    "find_cifar10": "data",
    "load_cifar10": "data",
    "load_digits": "data",
    "make_spirals": "data",
    "History": "training",
    "evaluate": "training",
    "fit": "training",
    "gradient_descent_": "training",
    "make_optimizer": "training",
    "training_step": "training",
    "StepMemory": "measure",
    "Timing": "measure",
    "compare_times": "measure",
    "count_calls": "measure",
    "count_calls_per_module": "measure",
    "forward_backward": "measure",
    "peak_memory": "measure",
    "saved_tensor_bytes": "measure",
    "step_memory": "measure",
    "time_call": "measure",
    "MemoryTimeline": "timeline",
    "added_peak": "timeline",
    "memory_timeline": "timeline",
    "LineFit": "analysis",
    "fit_line": "analysis",
    "relative_error": "verify",
    "claim": "claims",
    "chapter_settings": "settings",
    "book_scale": "runtime",
    "book_seed": "runtime",
    "default_device": "runtime",
    "evaluation_mode": "runtime",
    "resolve_device": "runtime",
    "seed_everything": "runtime",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static tools see; at run time the names are looked up on first use
    from revlib.adjoint import ODEResNet
    from revlib.reversible_heun import ReversibleHeunResNet
    from revlib.analysis import LineFit, fit_line
    from revlib.backprop import MLP
    from revlib.blocks import ResidualBlock
    from revlib.checkpoint import BlockCosts, CheckpointedSequence, checkpoint_plan, measure_block_costs
    from revlib.claims import claim
    from revlib.data import DataSplits, find_cifar10, load_cifar10, load_digits, make_spirals
    from revlib.linear_backprop import LinearBackprop, convert_to_linear_backprop
    from revlib.measure import (StepMemory, Timing, compare_times, count_calls, count_calls_per_module,
                                forward_backward, peak_memory,
                                saved_tensor_bytes, step_memory, time_call)
    from revlib.momentum import MomentumSequence
    from revlib.planner import PlanReport, Planner, plan
    from revlib.reversible import ResNet, ReversibleBlock, ReversibleSequence, ReversibleTransformer, RevNet
    from revlib.runtime import book_scale, book_seed, default_device, evaluation_mode, resolve_device, seed_everything
    from revlib.settings import chapter_settings
    from revlib.timeline import MemoryTimeline, added_peak, memory_timeline
    from revlib.training import History, evaluate, fit, gradient_descent_, make_optimizer, training_step
    from revlib.verify import relative_error


def __getattr__(name: str) -> ModuleType | Any:
    """Import a submodule, or the module that defines a top-level name, when it is first used."""
    if name in _SUBMODULES:
        return importlib.import_module(f"revlib.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"revlib.{_EXPORTS[name]}"), name)
    raise AttributeError(
        f"module 'revlib' has no attribute {name!r}; its modules are {', '.join(_SUBMODULES)}, "
        f"and its top-level names {', '.join(__all__)}"
    )


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_EXPORTS})
