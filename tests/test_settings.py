"""Tests of revlib.settings: every chapter's small and large configuration builds and trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import revlib
from revlib.settings import CHAPTER_SETTINGS, chapter_settings
from test_data import write_cifar10


@pytest.mark.parametrize("chapter", sorted(CHAPTER_SETTINGS))
def test_large_configuration_trains_one_step(chapter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each network the chapter trains at REVLIB_SCALE=large is built from its real data (a miniature CIFAR-10
    where the chapter reads images) and takes one optimiser step that changes it and keeps the loss finite."""
    write_cifar10(tmp_path)
    monkeypatch.setenv("REVLIB_DATA", str(tmp_path))
    monkeypatch.setenv("REVLIB_SCALE", "large")
    settings = revlib.chapter_settings(chapter)
    assert settings is CHAPTER_SETTINGS[chapter]["large"]
    runs = settings.training_runs("cpu")
    assert runs, "every chapter trains at least one network"
    for name, run in runs.items():
        torch.manual_seed(0)
        model = run.build()
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        x, y = run.data.x_train[:8], run.data.y_train[:8]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(loss), f"{chapter}, {name}: loss {loss.item()}"
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{chapter}, {name}: the step changed nothing"


def test_large_image_chapters_read_cifar10_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVLIB_DATA", raising=False)
    large = chapter_settings("reversible", "large")
    assert large.load_images("cpu").name == "digits", "without a local copy the digits stand in"
    write_cifar10(tmp_path)
    monkeypatch.setenv("REVLIB_DATA", str(tmp_path))
    images = large.load_images("cpu")
    assert images.name == "cifar10" and large.floor(images) == large.accuracy_floor["cifar10"]
    assert chapter_settings("reversible", "small").load_images("cpu").name == "digits", "the small scale never reads CIFAR-10"
    rows = large.sequences(images)
    assert rows.feature_shape == (32, 96) and torch.equal(rows.x_train[0, 5, :32], images.x_train[0, 0, 5])


def test_large_is_larger_than_small() -> None:
    """Every setting that is a size, a depth list or an epoch count grows (or stays) from small to large."""
    for chapter, scales in CHAPTER_SETTINGS.items():
        small, large = scales["small"], scales["large"]
        grown = 0
        for name, value in vars(small).items():
            if isinstance(value, int) and not isinstance(value, bool):
                assert getattr(large, name) >= value, f"{chapter}.{name} shrinks"
                grown += getattr(large, name) > value
            if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
                assert max(getattr(large, name)) >= max(value), f"{chapter}.{name} shrinks"
        assert grown, f"{chapter}: the large scale changes nothing"


def test_scale_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVLIB_SCALE", raising=False)
    assert chapter_settings("odes") is CHAPTER_SETTINGS["odes"]["small"]
    monkeypatch.setenv("REVLIB_SCALE", "large")
    assert chapter_settings("odes") is CHAPTER_SETTINGS["odes"]["large"]
    assert chapter_settings("odes", "small") is CHAPTER_SETTINGS["odes"]["small"]
    monkeypatch.setenv("REVLIB_SCALE", "huge")
    with pytest.raises(ValueError, match="REVLIB_SCALE"):
        chapter_settings("odes")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chapter must be one of"):
        chapter_settings("chapter 3")
    with pytest.raises(ValueError, match="scale must be"):
        chapter_settings("odes", "medium")  # type: ignore[arg-type]


def test_ode_classifier_initialisations() -> None:
    from revlib.adjoint import roughness_in_depth

    settings = chapter_settings("odes", "small")
    data = revlib.load_digits(flat=True)
    smooth = settings.classifier(data, 16, init="smooth")[0]
    independent = settings.classifier(data, 16, init="i.i.d.")[0]
    assert roughness_in_depth(smooth) < 0.3 < 1.0 < roughness_in_depth(independent)
    with pytest.raises(ValueError, match="init must be"):
        settings.classifier(data, 4, init="random")  # type: ignore[arg-type]
