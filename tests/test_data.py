import pytest
import torch

from revlib.data import load_digits, make_spirals


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
