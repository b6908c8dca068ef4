"""Real data sets that need no network.

* :func:`load_digits` — scikit-learn's bundled handwritten digits (1,797 grey-scale 8×8 images of the
  digits 0–9, from the UCI optical-recognition data set), as image tensors ``(N, 1, 8, 8)`` or flat vectors
  ``(N, 64)``, with a fixed stratified train/test split. Small enough to train on two CPU cores in seconds,
  real enough that depth, residuals and memory behave as they do on larger image data.
* :func:`make_spirals` — interleaved 2-D spirals generated in code. The classes are not linearly
  separable, every decision boundary can be drawn in the plane, and the set can be made as large as a
  GPU experiment wants; that is why the book uses it next to the digits (the Neural-ODE chapter watches
  how a flow moves these points).
* :func:`load_cifar10` — CIFAR-10 (60,000 colour 32×32 images in 10 classes, Krizhevsky 2009), read from
  the user's own copy of the "python version" (the folder ``cifar-10-batches-py``) for the chapters'
  larger, GPU-sized configurations. It is never downloaded: :func:`find_cifar10` says whether it is there.

All return a :class:`DataSplits`, the training and test tensors of one data set on the requested device
(not a ``torch.utils.data.Dataset``: the data sets are small enough to be held whole, and batches are taken
by indexing). :func:`image_rows` reads images as sequences of rows, for the Transformer.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from revlib.runtime import resolve_device

__all__ = ["DataSplits", "find_cifar10", "image_rows", "load_cifar10", "load_digits", "make_spirals"]

DATA_VARIABLE = "REVLIB_DATA"
CIFAR10_FOLDER = "cifar-10-batches-py"


@dataclass(frozen=True)
class DataSplits:
    """A classification data set split into a training and a test part, held as whole tensors.

    Attributes:
        name: a short name for tables and legends.
        x_train: inputs ``(N_train, *feature_shape)``.
        y_train: class labels ``(N_train,)``, ``torch.long``.
        x_test: inputs ``(N_test, *feature_shape)``.
        y_test: class labels ``(N_test,)``, ``torch.long``.
        classes: the number of classes.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. ``(64,)`` or ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DataSplits:
        """A copy on ``device`` (inputs also cast to ``dtype`` when given; labels stay ``long``)."""
        device = resolve_device(device)
        return DataSplits(
            name=self.name,
            x_train=self.x_train.to(device=device, dtype=dtype),
            y_train=self.y_train.to(device=device),
            x_test=self.x_test.to(device=device, dtype=dtype),
            y_test=self.y_test.to(device=device),
            classes=self.classes,
        )

    def __repr__(self) -> str:
        return (
            f"DataSplits({self.name!r}: {len(self.x_train)} train / {len(self.x_test)} test, "
            f"inputs {self.feature_shape}, {self.classes} classes, {self.x_train.dtype}, {self.x_train.device.type})"
        )


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")


def load_digits(
    flat: bool = False,
    *,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    r"""scikit-learn's handwritten digits, normalised, with a fixed stratified train/test split.

    Pixel intensities (0–16) are standardised with the training set's mean :math:`\mu` and standard
    deviation :math:`\sigma` (one scalar each, so that blank border pixels stay well defined):

    .. math:: x = (p - \mu) / \sigma .

    Args:
        flat: return inputs as vectors ``(N, 64)`` instead of images ``(N, 1, 8, 8)``.
        test_fraction: the share of the 1,797 samples held out for testing (default 450 of them).
        split_seed: seed of the split; the default gives the split every chapter uses.
        device: where the tensors live (``None``: :func:`revlib.runtime.default_device`).
        dtype: floating dtype of the inputs.

    Raises:
        ValueError: ``test_fraction`` is not in (0, 1).
        TypeError: ``dtype`` is not a floating-point dtype.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    _check_fraction(test_fraction)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    bunch = sklearn_digits()
    pixels = bunch.images.astype(np.float64)  # (1797, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    train_pixels, test_pixels, train_labels, test_labels = train_test_split(
        pixels, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    shape = (-1, 64) if flat else (-1, 1, 8, 8)
    train_pixels, test_pixels = train_pixels.reshape(shape), test_pixels.reshape(shape)
    return _standardised("digits", (train_pixels, train_labels), (test_pixels, test_labels), axis=None, dtype=dtype, device=device)


def _standardised(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    axis: tuple[int, ...] | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> DataSplits:
    """A 10-class :class:`DataSplits` of ``(inputs, labels)`` arrays, the inputs standardised with the training
    set's mean and standard deviation over ``axis`` (``None``: one scalar each)."""
    mean = train[0].mean(axis=axis, keepdims=axis is not None)
    std = train[0].std(axis=axis, keepdims=axis is not None)
    device = resolve_device(device)

    def inputs(array: np.ndarray) -> Tensor:
        return torch.as_tensor((array - mean) / std, dtype=dtype, device=device)

    return DataSplits(
        name=name,
        x_train=inputs(train[0]),
        y_train=torch.as_tensor(train[1], device=device),
        x_test=inputs(test[0]),
        y_test=torch.as_tensor(test[1], device=device),
        classes=10,
    )


def make_spirals(
    samples: int = 1500,
    *,
    classes: int = 3,
    turns: float = 1.5,
    noise: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    r"""Interleaved spirals in the plane, one arm per class.

    Point :math:`i` of arm :math:`k` has radius :math:`r = t` and angle
    :math:`\phi = 2\pi (\text{turns}\cdot t + k / \text{classes})` for :math:`t` uniform in
    :math:`[0.05, 1]`, plus Gaussian noise of standard deviation ``noise`` scaled by :math:`r`
    (so the centre stays separable):

    .. math:: x = r\,(\cos\phi, \sin\phi) + \text{noise}\cdot r\,\varepsilon, \quad \varepsilon\sim\mathcal N(0, I_2).

    Args:
        samples: total number of points (split evenly between the arms).
        classes: number of arms (at least 2).
        turns: how many times each arm winds around the origin.
        noise: relative standard deviation of the noise.
        test_fraction: the share held out for testing.
        seed: seed of this generator only (the global random state is untouched).
        device: where the tensors live.
        dtype: floating dtype of the inputs.

    Raises:
        ValueError: a count or fraction is out of range.
    """
    if classes < 2:
        raise ValueError(f"classes must be at least 2, got {classes}")
    if samples < 2 * classes:
        raise ValueError(f"samples must be at least 2 * classes = {2 * classes}, got {samples}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    _check_fraction(test_fraction)
    generator = torch.Generator().manual_seed(seed)
    per_class = samples // classes
    t = 0.05 + 0.95 * torch.rand(classes, per_class, generator=generator, dtype=torch.float64)
    arm = torch.arange(classes, dtype=torch.float64).unsqueeze(1)  # (classes, 1)
    angle = 2 * math.pi * (turns * t + arm / classes)  # (classes, per_class)
    points = torch.stack((t * torch.cos(angle), t * torch.sin(angle)), dim=-1)  # (classes, per_class, 2)
    points = points + noise * t.unsqueeze(-1) * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    x = points.reshape(-1, 2)
    y = torch.arange(classes).repeat_interleave(per_class)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    test_size = max(1, round(test_fraction * len(y)))
    device = resolve_device(device)
    return DataSplits(
        name="spirals",
        x_train=x[test_size:].to(device=device, dtype=dtype),
        y_train=y[test_size:].to(device),
        x_test=x[:test_size].to(device=device, dtype=dtype),
        y_test=y[:test_size].to(device),
        classes=classes,
    )


def find_cifar10(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder of the user's CIFAR-10 copy (python version), or ``None`` when there is none.

    Looks in ``root`` when given, else in the directory named by ``REVLIB_DATA``; either may be the
    ``cifar-10-batches-py`` folder itself or its parent. Nothing is ever downloaded.
    """
    if root is None:
        root = os.environ.get(DATA_VARIABLE)
        if not root:
            return None
    for folder in (Path(root), Path(root) / CIFAR10_FOLDER):
        if (folder / "test_batch").is_file() and (folder / "data_batch_1").is_file():
            return folder
    return None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch: pixels ``(n, 3, 32, 32)`` uint8 and labels ``(n,)`` int64."""
    with open(path, "rb") as file:
        batch = pickle.load(file, encoding="bytes")  # the files were written by Python 2: keys are bytes
    try:
        pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows: 1024 R, 1024 G, 1024 B
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a CIFAR-10 batch (a dict with b'data' of n x 3072 bytes and b'labels')") from error
    if len(pixels) != len(labels):
        raise ValueError(f"{path} holds {len(pixels)} images but {len(labels)} labels")
    return pixels, labels


def load_cifar10(
    root: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DataSplits:
    r"""CIFAR-10 from a local copy of its python version: 50,000 training and 10,000 test images ``(N, 3, 32, 32)``.

    Each colour channel :math:`c` is standardised with the training set's mean and standard deviation,
    :math:`x_c = (p_c - \mu_c) / \sigma_c`. The files are read as they are distributed (``data_batch_1``
    … ``data_batch_5`` and ``test_batch`` in ``cifar-10-batches-py``); revlib never downloads them.

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent (``None``: the directory in ``REVLIB_DATA``).
        device: where the tensors live (``None``: :func:`revlib.runtime.default_device`).
        dtype: floating dtype of the inputs.

    Raises:
        FileNotFoundError: no CIFAR-10 copy at ``root`` (or ``REVLIB_DATA``); the message says where to put it.
        ValueError: a batch file is not in the CIFAR-10 format.
        TypeError: ``dtype`` is not a floating-point dtype.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    folder = find_cifar10(root)
    if folder is None:
        where = f"root={str(root)!r}" if root is not None else f"{DATA_VARIABLE}={os.environ.get(DATA_VARIABLE, '')!r}"
        raise FileNotFoundError(
            f"no CIFAR-10 copy found ({where}): unpack the python version (cifar-10-python.tar.gz) so that "
            f"{CIFAR10_FOLDER}/data_batch_1 ... test_batch lie there, and pass root= or set {DATA_VARIABLE}; "
            "revlib never downloads data"
        )
    train_files = sorted(folder.glob("data_batch_*"))
    parts = [_read_cifar_batch(path) for path in train_files]
    train_pixels = np.concatenate([pixels for pixels, _ in parts])
    train_labels = np.concatenate([labels for _, labels in parts])
    test_pixels, test_labels = _read_cifar_batch(folder / "test_batch")
    per_channel = (0, 2, 3)  # statistics of (1, 3, 1, 1)
    return _standardised("cifar10", (train_pixels, train_labels), (test_pixels, test_labels), axis=per_channel, dtype=dtype, device=device)


def image_rows(data: DataSplits) -> DataSplits:
    """``data``'s images ``(N, C, H, W)`` read as sequences of ``H`` tokens, one per row: ``(N, H, C·W)``.

    Raises:
        ValueError: the inputs are not images ``(N, C, H, W)``.
    """
    if data.x_train.dim() != 4:
        raise ValueError(f"image_rows needs images (N, C, H, W), got inputs of shape {tuple(data.x_train.shape)}")

    def rows(images: Tensor) -> Tensor:
        count, channels, height, width = images.shape
        return images.permute(0, 2, 1, 3).reshape(count, height, channels * width)  # (N, H, C·W)

    return DataSplits(f"{data.name} rows", rows(data.x_train), data.y_train, rows(data.x_test), data.y_test, data.classes)
