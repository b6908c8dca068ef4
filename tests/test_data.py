import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from revlib.data import find_cifar10, load_cifar10, load_digits, make_spirals


def write_cifar10(root: Path, per_batch: int = 12, seed: int = 0) -> Path:
    """A miniature CIFAR-10 in the distributed format: pickled dicts with bytes keys, rows of 3 x 1024 pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": generator.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(label) for label in generator.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_digits_images_and_vectors(device: torch.device) -> None:
    images = load_digits(device=device)
    vectors = load_digits(flat=True, device=device)
    assert images.x_train.shape == (1347, 1, 8, 8) and images.x_test.shape == (450, 1, 8, 8)
    assert vectors.x_train.shape == (1347, 64) and vectors.x_test.shape == (450, 64)
    assert torch.equal(images.x_train.flatten(1), vectors.x_train)
    for tensor in (images.x_train, images.y_train, images.x_test, images.y_test):
        assert tensor.device.type == device.type
    assert images.x_train.dtype == torch.float32 and images.y_train.dtype == torch.long
    assert images.classes == 10 and images.feature_shape == (1, 8, 8)


def test_digits_are_normalised_on_the_training_set() -> None:
    data = load_digits(flat=True, dtype=torch.float64)
    assert data.x_train.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert data.x_train.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-12)
    assert data.x_test.dtype == torch.float64


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    first, second = load_digits(flat=True), load_digits(flat=True)
    assert torch.equal(first.x_test, second.x_test) and torch.equal(first.y_train, second.y_train)
    counts = torch.bincount(first.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # stratified: about 45 per class
    train_rows = {tuple(row.tolist()) for row in first.x_train}
    overlap = sum(tuple(row.tolist()) in train_rows for row in first.x_test)
    assert overlap <= 5  # the raw data holds a few exact duplicate images; the split itself is disjoint
    other = load_digits(flat=True, split_seed=1)
    assert not torch.equal(first.y_test, other.y_test)


def test_digits_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(TypeError, match="dtype"):
        load_digits(dtype=torch.int64)


def test_spirals_shapes_classes_and_seed(device: torch.device) -> None:
    data = make_spirals(600, classes=4, device=device)
    assert data.x_train.shape == (450, 2) and data.x_test.shape == (150, 2)
    assert data.x_train.device.type == device.type
    assert set(torch.cat((data.y_train, data.y_test)).tolist()) == {0, 1, 2, 3}
    again = make_spirals(600, classes=4, device=device)
    assert torch.equal(data.x_train, again.x_train)
    assert not torch.equal(data.x_train, make_spirals(600, classes=4, seed=1, device=device).x_train)


def test_spirals_without_noise_lie_on_their_arms() -> None:
    data = make_spirals(300, classes=3, noise=0.0, dtype=torch.float64)
    points = torch.cat((data.x_train, data.x_test))
    labels = torch.cat((data.y_train, data.y_test))
    radius = points.norm(dim=1)
    angle = torch.atan2(points[:, 1], points[:, 0])
    expected = 2 * torch.pi * (1.5 * radius + labels.double() / 3)
    wrapped = torch.remainder(angle - expected + torch.pi, 2 * torch.pi) - torch.pi
    assert wrapped.abs().max() < 1e-9


@pytest.mark.parametrize(
    "kwargs, match",
    [({"classes": 1}, "classes"), ({"samples": 3}, "samples"), ({"noise": -0.1}, "noise"), ({"test_fraction": 0}, "test_fraction")],
)
def test_spirals_reject_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_spirals(**kwargs)


def test_dataset_to_moves_and_casts() -> None:
    data = load_digits(flat=True).to("cpu", dtype=torch.float64)
    assert data.x_train.dtype == torch.float64 and data.y_train.dtype == torch.long
    assert "digits" in repr(data) and "1347 train" in repr(data)


def test_cifar10_is_read_from_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_cifar10(tmp_path)
    with open(folder / "data_batch_1", "rb") as file:
        first = pickle.load(file, encoding="bytes")
    for root in (tmp_path, folder):
        assert find_cifar10(root) == folder
    monkeypatch.setenv("REVLIB_DATA", str(tmp_path))
    data = load_cifar10(dtype=torch.float64, device="cpu")
    assert data.name == "cifar10" and data.classes == 10
    assert data.x_train.shape == (60, 3, 32, 32) and data.x_test.shape == (12, 3, 32, 32)
    assert data.y_train[:12].tolist() == first[b"labels"]
    per_channel = data.x_train.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-12)
    red = first[b"data"][0, :1024].reshape(32, 32).astype(np.float64)  # the first image's red channel, as stored
    recovered = data.x_train[0, 0].numpy()
    assert np.allclose((red - red.mean()) / red.std(), (recovered - recovered.mean()) / recovered.std())


def test_cifar10_missing_or_malformed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVLIB_DATA", raising=False)
    assert find_cifar10() is None and find_cifar10(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_cifar10(tmp_path)
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"pixels": []}))
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path)
    with pytest.raises(TypeError, match="dtype"):
        load_cifar10(tmp_path, dtype=torch.int64)
