"""Where computations run and how they are made repeatable.

Every model, experiment and measurement in revlib takes a ``device`` argument. When it is ``None`` the
library falls back to :func:`default_device`: CUDA when PyTorch sees a GPU, else the CPU, unless the
environment variable ``REVLIB_DEVICE`` names another device (``REVLIB_DEVICE=cpu`` on a GPU machine
reproduces the book's CPU figures).

Chapters run at a small default scale (minutes on two CPU cores); :func:`book_scale` reads
``REVLIB_SCALE``, and ``REVLIB_SCALE=large`` selects each chapter's larger configuration, meant for a GPU
(:func:`revlib.settings.chapter_settings`).
Every chapter starts its experiments from :func:`book_seed` (``REVLIB_SEED``), so that its claims can be
checked from several seeds.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "book_scale",
    "book_seed",
    "default_device",
    "evaluation_mode",
    "resolve_device",
    "seed_everything",
]

DEVICE_VARIABLE = "REVLIB_DEVICE"
SCALE_VARIABLE = "REVLIB_SCALE"
SEED_VARIABLE = "REVLIB_SEED"

Scale = Literal["small", "large"]


def default_device() -> torch.device:
    """The device revlib uses when none is given.

    Returns:
        ``torch.device(os.environ["REVLIB_DEVICE"])`` when that variable is set, else ``cuda`` when a GPU is
        available, else ``cpu``.

    Raises:
        ValueError: ``REVLIB_DEVICE`` does not name a device PyTorch knows, or names CUDA on a machine
            without one.
    """
    requested = os.environ.get(DEVICE_VARIABLE)
    if requested:
        return resolve_device(requested, argument=DEVICE_VARIABLE)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None, argument: str = "device") -> torch.device:
    """Turn a device argument (``None``, a string or a ``torch.device``) into a usable ``torch.device``.

    Args:
        device: ``None`` for :func:`default_device`, or anything ``torch.device`` accepts.
        argument: the argument's name, used in error messages.

    Any accelerator PyTorch has a device module for (CUDA, MPS, XPU, …) is accepted when it is available:
    revlib's recomputations replay its random state through ``torch.get_device_module``.

    Raises:
        TypeError: ``device`` is neither ``None``, a string nor a ``torch.device``.
        ValueError: the string is not a device, or it names an accelerator that is not available here.
    """
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{argument} must be None, a string or a torch.device, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"{argument}={device!r} is not a device PyTorch knows (e.g. 'cpu', 'cuda:0', 'mps')") from error
    if resolved.type not in ("cpu", "meta") and not _available(resolved.type):
        raise ValueError(f"{argument}={device!r} asks for {resolved.type.upper()}, but PyTorch sees no such device here")
    return resolved


def _available(device_type: str) -> bool:
    """Whether PyTorch can use devices of this type here (an accelerator's module says so)."""
    try:
        module = torch.get_device_module(device_type)
    except (RuntimeError, AttributeError):
        return False
    is_available = getattr(module, "is_available", None)
    return bool(is_available()) if is_available is not None else False


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and every CUDA device's) random number generators.

    Args:
        seed: a non-negative integer.

    Raises:
        TypeError: ``seed`` is not an integer.
        ValueError: ``seed`` is negative.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def book_scale() -> Scale:
    """The scale the chapters run at: ``"small"`` (default, CPU-friendly) or ``"large"`` (``REVLIB_SCALE``).

    Raises:
        ValueError: ``REVLIB_SCALE`` is set to anything else.
    """
    scale = os.environ.get(SCALE_VARIABLE, "small")
    if scale not in ("small", "large"):
        raise ValueError(f"{SCALE_VARIABLE} must be 'small' or 'large', got {scale!r}")
    return scale  # type: ignore[return-value]


def book_seed() -> int:
    """The seed the chapters' experiments start from: ``REVLIB_SEED``, or 0 when it is unset.

    The stored outputs of the book come from seed 0; a chapter that claims its findings hold for other
    seeds names the ones it was run with, and ``REVLIB_SEED`` lets a reader re-run it with any other.

    Raises:
        ValueError: ``REVLIB_SEED`` is not a non-negative integer.
    """
    value = os.environ.get(SEED_VARIABLE, "0")
    if not value.isdigit():
        raise ValueError(f"{SEED_VARIABLE} must be a non-negative integer, got {value!r}")
    return int(value)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode and without gradients; its mode is restored on leaving, even
    when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
