"""The chapters' experiments at two scales: ``small`` (the default) and ``large`` (meant for a GPU).

Every chapter reads its sizes, depths, epochs and data from one frozen dataclass,

    settings = revlib.chapter_settings("reversible")   # the scale named by REVLIB_SCALE, "small" by default

so that ``REVLIB_SCALE=large`` re-runs the same chapter with bigger networks, more epochs and, for the
image experiments, CIFAR-10 read from the reader's own copy (:func:`revlib.data.load_cifar10`; the digits
when there is none, nothing is downloaded). The small settings are the ones the stored outputs come from:
each chapter runs in minutes on two CPU cores. The large ones are sized for one GPU.

Settings are data: sizes, depths, epochs, learning rates, and which images to load. The networks are built
by the modules of the ideas they illustrate, from these numbers; the test suite builds every chapter's
networks at the large scale and trains each for one step on the CPU (``tests/test_settings.py``). Claims
whose bound depends on the data (a test accuracy) read it from ``accuracy_floor``: the digits are easy,
CIFAR-10 is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from revlib.data import DataSplits, find_cifar10, load_cifar10, load_digits, make_spirals
from revlib.runtime import Scale, book_scale

__all__ = [
    "CHAPTER_SETTINGS",
    "BackpropSettings",
    "CheckpointSettings",
    "FrontierSettings",
    "ImageSettings",
    "IntroSettings",
    "LinearBackpropSettings",
    "ODESettings",
    "PlanningSettings",
    "ResidualSettings",
    "ReversibleSettings",
    "Settings",
    "chapter_settings",
]

ImageData = Literal["digits", "cifar10"]


def _image_data(preferred: ImageData, device: torch.device | str | None) -> DataSplits:
    """``preferred`` images: CIFAR-10 when asked for and the reader has a copy, the digits otherwise."""
    if preferred == "cifar10" and find_cifar10() is not None:
        return load_cifar10(device=device)
    return load_digits(device=device)


_PRINTED_WIDTH = 84


def _printed(settings: object) -> str:
    """``settings`` as its ``repr`` shows it, wrapped to fit a page: what every chapter prints at its top."""
    items = [f"{item.name}={getattr(settings, item.name)!r}" for item in fields(settings)]  # type: ignore[arg-type]
    lines, line = [], f"{type(settings).__name__}({items[0]}"
    for item in items[1:]:
        if len(line) + len(item) + 3 > _PRINTED_WIDTH:  # ", " before it and "," or ")" after it
            lines.append(line + ",")
            line = "    " + item
        else:
            line += ", " + item
    return "\n".join([*lines, line + ")"])


@dataclass(frozen=True)
class ImageSettings:
    """Settings whose experiments classify images, and the accuracy each data set must reach."""

    __str__ = _printed

    image_data: ImageData = "digits"
    accuracy_floor: Mapping[str, float] = field(default_factory=lambda: {"digits": 0.95, "cifar10": 0.6})

    def load_images(self, device: torch.device | str | None = None) -> DataSplits:
        """The chapter's images: CIFAR-10 when ``image_data`` asks for it and :func:`revlib.data.find_cifar10`
        finds a copy (``REVLIB_DATA``), else the digits."""
        return _image_data(self.image_data, device)

    def floor(self, data: DataSplits) -> float:
        """The test accuracy the chapter's claims expect on ``data``."""
        return self.accuracy_floor[data.name]


@dataclass(frozen=True)
class IntroSettings(ImageSettings):
    """Chapter 00: a small CNN trained with :func:`revlib.training.fit`."""

    channels: tuple[int, int] = (16, 32)
    epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 2e-3


@dataclass(frozen=True)
class BackpropSettings:
    """Chapter 01: the hand-written MLP, and the sizes of the memory and timing measurements."""

    __str__ = _printed

    hidden: tuple[int, ...] = (128, 64)
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 0.05
    weight_decay: float = 1e-4
    sweep_width: int = 256
    sweep_batch: int = 512
    sweep_depths: tuple[int, ...] = (1, 2, 4, 8, 12, 16)
    peak_width: int = 512
    peak_batch: int = 1024
    peak_depths: tuple[int, ...] = (2, 4, 8, 12, 16)
    timing_width: int = 512
    timing_batch: int = 1024
    bill_width: int = 512
    bill_depths: tuple[int, ...] = (2, 8)
    bill_batches: tuple[int, ...] = (32, 1024)
    mode_input_sizes: tuple[int, ...] = (8, 16, 32, 64)
    mode_batch: int = 16


@dataclass(frozen=True)
class ResidualSettings:
    """Chapter 02: plain and residual tanh MLPs over a range of depths, plain and residual conv nets with BatchNorm
    (whose deepest pair also gives the loss landscapes), and ReLU MLPs on the spirals for the lesion study."""

    __str__ = _printed

    width: int = 64
    depths: tuple[int, ...] = (1, 2, 4, 8, 16)
    epochs: int = 15
    learning_rate: float = 0.05
    lesion_samples: int = 3000
    lesion_noise: float = 0.05
    lesion_width: int = 32
    lesion_depths: tuple[int, int] = (4, 16)
    lesion_epochs: int = 60
    lesion_learning_rate: float = 3e-3
    lesion_trials: int = 20
    batch_norm_channels: int = 16
    batch_norm_depths: tuple[int, ...] = (3, 8, 16)
    batch_norm_epochs: int = 20
    batch_norm_learning_rate: float = 0.05
    landscape_directions: int = 8
    landscape_images: int = 256

    def lesion_networks(self) -> list[tuple[bool, int]]:
        """(residual, blocks) of the lesion study's networks: a shallow plain one (the chapter trains
        no deeper plain one) and residual ones of every depth in ``lesion_depths``."""
        return [(False, self.lesion_depths[0])] + [(True, depth) for depth in self.lesion_depths]

    def lesion_data(self, seed: int = 0, device: torch.device | str | None = None) -> DataSplits:
        """The lesion study's task: three spirals (:func:`revlib.data.make_spirals`), on which a trained network
        with every block deleted (its stem and head) is near chance, so that the blocks carry the accuracy."""
        return make_spirals(self.lesion_samples, noise=self.lesion_noise, seed=seed, device=device)


@dataclass(frozen=True)
class ReversibleSettings(ImageSettings):
    """Chapter 03: RevNet against ResNet, the memory and time sweeps, and the reversible Transformer."""

    widths: tuple[int, ...] = (32, 64)
    revnet_blocks: int = 4
    resnet_blocks: int = 2
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3
    runs: int = 3
    memory_channels: int = 32
    memory_batch: int = 64
    memory_depths: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    peak_depths: tuple[int, ...] = (4, 16, 64)
    timing_depths: tuple[int, int] = (8, 32)
    transformer_features: int = 32
    transformer_layers: int = 4
    transformer_epochs: int = 10
    transformer_floor: Mapping[str, float] = field(default_factory=lambda: {"digits": 0.9, "cifar10": 0.45})


@dataclass(frozen=True)
class ODESettings:
    """Chapter 04: ODE-ResNets of tanh residual functions on the flat digits, and linear ODE-ResNets fitted
    by gradient descent to a linear map (``linear_depths``, ``linear_steps``)."""

    __str__ = _printed

    width: int = 64
    error_depths: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    interpolated_depths: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    training_depths: tuple[int, ...] = (1, 2, 4, 8, 16)
    epochs: int = 10
    learning_rate: float = 1e-2
    memory_depths: tuple[int, ...] = (4, 16, 64, 256)
    comparison_depths: tuple[int, ...] = (8, 32, 128)
    heunnet_depths: tuple[int, ...] = (4, 8, 16, 32, 64)
    roughness_depth: int = 16
    linear_depths: tuple[int, ...] = (8, 16, 32, 64, 128)
    linear_steps: int = 100


@dataclass(frozen=True)
class LinearBackpropSettings(ImageSettings):
    """Chapter 05: the five-point problem, MLPs and a residual CNN under both rules, binary networks, timing."""

    accuracy_floor: Mapping[str, float] = field(default_factory=lambda: {"digits": 0.9, "cifar10": 0.5})
    five_point_inits: int = 50
    five_point_steps: int = 300
    mlp_width: int = 128
    mlp_epochs: int = 15
    cnn_channels: int = 16
    cnn_blocks: int = 3
    cnn_epochs: int = 8
    binary_width: int = 256
    binary_epochs: int = 10
    timing_width: int = 1024
    timing_batch: int = 512
    gelu_width: int = 256
    gelu_blocks: int = 4


@dataclass(frozen=True)
class CheckpointSettings(ImageSettings):
    """Chapter 06: the checkpointing schedules on one stack of reversible blocks, the optimal schedule on a staged ResNet
    of unequal blocks, and a checkpointed ResNet trained."""

    channels: int = 32
    batch: int = 64
    memory_depths: tuple[int, ...] = (8, 16, 32, 64)
    frontier_depth: int = 32
    budgets: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    timing_repeats: int = 7
    train_channels: int = 16
    train_blocks: int = 8
    train_slots: int = 2
    unequal_widths: tuple[int, ...] = (8, 16, 32)
    unequal_blocks_per_stage: int = 2
    unequal_batch: int = 128
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 0.1


@dataclass(frozen=True)
class FrontierSettings:
    """Chapter 07: every method on one training step, training under each, the adjoint over depth, momentum over γ."""

    __str__ = _printed

    family: str = "conv"
    depth: int = 16
    width: int = 32
    batch: int = 64
    optimizer: str = "adam"
    timing_repeats: int = 3
    batch_sweep: tuple[int, ...] = (1, 4, 16, 64, 256)
    train_family: str = "mlp"
    train_depth: int = 8
    train_width: int = 64
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 2e-3
    adjoint_depths: tuple[int, ...] = (4, 8, 16, 32, 64)
    momentum_depth: int = 16
    gammas: tuple[float, ...] = (0.99, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1)
    rounding_depths: tuple[int, ...] = (16, 32, 64)


@dataclass(frozen=True)
class PlanningSettings:
    """Chapter 08: a staged ResNet and a GPT-2 stack fitted into memory budgets by the planner, the GPT-2 stack's
    frontier and its reversible (Reformer) variant."""

    __str__ = _printed

    plan_widths: tuple[int, ...] = (16, 32, 64)
    plan_blocks_per_stage: int = 3
    plan_batch: int = 256
    gpt_depth: int = 8
    gpt_width: int = 64
    batch: int = 64
    optimizer: str = "adam"
    timing_repeats: int = 3


Settings = IntroSettings | BackpropSettings | ResidualSettings | ReversibleSettings | ODESettings | LinearBackpropSettings | CheckpointSettings | FrontierSettings | PlanningSettings

CHAPTER_SETTINGS: dict[str, dict[str, Settings]] = {
    "intro": {
        "small": IntroSettings(),
        "large": IntroSettings(image_data="cifar10", channels=(64, 128), epochs=30, batch_size=128),
    },
    "backprop": {
        "small": BackpropSettings(),
        "large": BackpropSettings(hidden=(1024, 512), epochs=40, sweep_width=1024, sweep_batch=4096, peak_width=2048,
                                  peak_batch=8192, timing_width=2048, timing_batch=8192, bill_width=2048, bill_depths=(2, 8, 32),
                                  bill_batches=(32, 1024, 8192), mode_input_sizes=(8, 16, 32, 64, 128)),
    },
    "residual": {
        "small": ResidualSettings(),
        "large": ResidualSettings(width=256, depths=(1, 2, 4, 8, 16, 32), epochs=30, batch_norm_channels=32,
                                  batch_norm_depths=(3, 9, 27), batch_norm_epochs=40, landscape_directions=16,
                                  landscape_images=1024, lesion_width=64, lesion_depths=(4, 32), lesion_epochs=100),
    },
    "reversible": {
        "small": ReversibleSettings(),
        "large": ReversibleSettings(image_data="cifar10", accuracy_floor={"digits": 0.95, "cifar10": 0.8}, widths=(64, 128, 256),
                                    revnet_blocks=8, resnet_blocks=4, epochs=40, batch_size=128, memory_channels=64,
                                    memory_batch=128, memory_depths=(4, 8, 16, 32, 64, 128, 256), peak_depths=(4, 16, 64, 256),
                                    transformer_features=128, transformer_layers=8, transformer_epochs=20),
    },
    "odes": {
        "small": ODESettings(),
        "large": ODESettings(width=256, error_depths=(4, 8, 16, 32, 64, 128, 256, 512, 1024), interpolated_depths=(8, 16, 32, 64, 128, 256, 512, 1024),
                             training_depths=(1, 2, 4, 8, 16, 32, 64), epochs=30, memory_depths=(4, 16, 64, 256, 1024),
                             comparison_depths=(8, 32, 128, 512), heunnet_depths=(4, 8, 16, 32, 64, 128, 256), roughness_depth=64,
                             linear_depths=(8, 16, 32, 64, 128, 256, 512), linear_steps=200),
    },
    "linear_backprop": {
        "small": LinearBackpropSettings(),
        "large": LinearBackpropSettings(image_data="cifar10", five_point_inits=200, mlp_width=512, mlp_epochs=40, cnn_channels=64,
                                        cnn_blocks=6, cnn_epochs=30, binary_width=1024, binary_epochs=30, timing_width=4096,
                                        timing_batch=4096, gelu_width=1024, gelu_blocks=12),
    },
    "checkpointing": {
        "small": CheckpointSettings(),
        "large": CheckpointSettings(image_data="cifar10", accuracy_floor={"digits": 0.95, "cifar10": 0.7}, channels=64, batch=256,
                                    memory_depths=(16, 32, 64, 128, 256), frontier_depth=128, budgets=(1, 2, 3, 4, 6, 8, 16),
                                    timing_repeats=15, train_channels=64, train_blocks=16, train_slots=4,
                                    unequal_widths=(16, 32, 64), unequal_blocks_per_stage=3, unequal_batch=512, epochs=30,
                                    batch_size=128),
    },
    "frontier": {
        "small": FrontierSettings(),
        "large": FrontierSettings(depth=64, width=128, batch=256, timing_repeats=5, batch_sweep=(1, 4, 16, 64, 256, 1024),
                                  train_depth=32, train_width=256, epochs=20, adjoint_depths=(4, 8, 16, 32, 64, 128, 256),
                                  momentum_depth=64, rounding_depths=(16, 64, 256)),
    },
    "planning": {
        "small": PlanningSettings(),
        "large": PlanningSettings(plan_widths=(32, 64, 128), plan_batch=1024, gpt_depth=12, gpt_width=256, batch=256,
                                  timing_repeats=5),
    },
}


def chapter_settings(chapter: str, scale: Scale | None = None) -> Settings:
    """The settings of ``chapter`` at ``scale``.

    Args:
        chapter: one of ``"intro"``, ``"backprop"``, ``"residual"``, ``"reversible"``, ``"odes"``,
            ``"linear_backprop"``, ``"checkpointing"``, ``"frontier"``, ``"planning"``.
        scale: ``"small"`` or ``"large"``; ``None`` reads ``REVLIB_SCALE`` (:func:`revlib.runtime.book_scale`).

    Raises:
        ValueError: an unknown chapter or scale.
    """
    if chapter not in CHAPTER_SETTINGS:
        raise ValueError(f"chapter must be one of {sorted(CHAPTER_SETTINGS)}, got {chapter!r}")
    if scale is None:
        scale = book_scale()
    if scale not in ("small", "large"):
        raise ValueError(f"scale must be 'small' or 'large', got {scale!r}")
    return CHAPTER_SETTINGS[chapter][scale]


