"""Tests of revlib.settings: every chapter's small and large configuration builds and trains, and settings are data."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revlib
from revlib.adjoint import ode_classifier
from revlib.backprop import MLP
from revlib.blocks import gpt2_chain, mlp, small_cnn, staged_resnet
from revlib.checkpoint import CheckpointedSequence
from revlib.data import DataSplits, image_rows, load_digits
from revlib.frontier import methods
from revlib.linear_backprop import binary_network, convert_to_linear_backprop
from revlib.residual import conv_network, mlp_network
from revlib.reversible import ResNet, ReversibleTransformer, RevNet, reformer_chain
from revlib.settings import CHAPTER_SETTINGS, chapter_settings
from test_data import write_cifar10


def chapter_networks(chapter: str, settings: object) -> dict[str, tuple[Callable[[], nn.Module], DataSplits]]:
    """The networks each chapter trains, built from its settings by the library's builders as the chapter
    builds them, with the data they are trained on."""
    s: Any = settings
    if chapter == "intro":
        images = s.load_images("cpu")
        return {"CNN": (lambda: small_cnn(images.feature_shape, s.channels, images.classes, device="cpu"), images)}
    if chapter == "backprop":
        digits = load_digits(flat=True, device="cpu")
        sizes = [digits.feature_shape[0], *s.hidden, digits.classes]
        return {"MLP": (lambda: MLP(sizes, "relu", weight_decay=s.weight_decay, device="cpu").to_module(), digits)}
    if chapter == "residual":
        vectors, images, spirals = load_digits(flat=True, device="cpu"), load_digits(device="cpu"), s.lesion_data(device="cpu")
        runs = {f"tanh, residual={r}, {d} blocks": (functools.partial(mlp_network, 64, s.width, d, 10, residual=r, activation="tanh", device="cpu"), vectors)
                for r in (False, True) for d in s.depths}
        runs |= {f"conv, residual={r}, {d} blocks": (functools.partial(conv_network, 1, s.batch_norm_channels, d, 10, residual=r, device="cpu"), images)
                 for r in (False, True) for d in s.batch_norm_depths}
        runs |= {f"spirals, residual={r}, {d} blocks": (functools.partial(mlp_network, 2, s.lesion_width, d, spirals.classes, residual=r, device="cpu"), spirals)
                 for r, d in s.lesion_networks()}
        return runs
    if chapter == "reversible":
        images = s.load_images("cpu")
        rows = image_rows(images)
        shape = dict(in_channels=images.feature_shape[0], classes=images.classes, device="cpu")
        return {"RevNet": (lambda: RevNet(s.widths, s.revnet_blocks, **shape), images),
                "ResNet": (lambda: ResNet(s.widths, s.resnet_blocks, **shape), images),
                "reversible Transformer": (lambda: ReversibleTransformer(rows.feature_shape[1], rows.feature_shape[0], features=s.transformer_features,
                                                                         layers=s.transformer_layers, classes=rows.classes, device="cpu"), rows)}
    if chapter == "odes":
        digits = load_digits(flat=True, device="cpu")
        return {f"N={d}, memory_saving={m}": (functools.partial(ode_classifier, 64, 10, d, hidden=s.width, memory_saving=m, device="cpu"), digits)
                for d in s.training_depths for m in (False, True)}
    if chapter == "linear_backprop":
        vectors, images = load_digits(flat=True, device="cpu"), s.load_images("cpu")
        runs = {f"MLP {a}": (functools.partial(mlp, [64, s.mlp_width, s.mlp_width, s.mlp_width, 10], a, device="cpu"), vectors)
                for a in ("relu", "tanh", "sigmoid")}
        runs |= {f"CNN {a}": (functools.partial(conv_network, images.feature_shape[0], s.cnn_channels, s.cnn_blocks, images.classes, residual=True,
                                                activation=a, device="cpu"), images) for a in ("relu", "tanh")}
        runs |= {f"binary, clip {c}": (functools.partial(binary_network, 64, s.binary_width, 10, clip=c, device="cpu"), vectors) for c in (1.0, None)}
        return {name: (lambda build=build: convert_to_linear_backprop(build()), data) for name, (build, data) in runs.items()}
    if chapter == "checkpointing":
        images = s.load_images("cpu")

        def checkpointed() -> nn.Module:
            resnet = conv_network(images.feature_shape[0], s.train_channels, s.train_blocks, images.classes, residual=True, device="cpu")
            return nn.Sequential(resnet.stem, CheckpointedSequence(*resnet.blocks, schedule="revolve", slots=s.train_slots), resnet.head)

        return {"checkpointed ResNet": (checkpointed, images)}
    if chapter == "frontier":
        digits = load_digits(flat=s.train_family == "mlp", device="cpu")
        return {name: (lambda build=build: build().model, digits) for name, build in methods(s.train_family, s.train_depth, s.train_width, "cpu").items()}
    if chapter == "planning":
        images = load_digits(device="cpu")
        rows = image_rows(images)
        return {"staged ResNet": (lambda: staged_resnet(s.plan_widths, s.plan_blocks_per_stage, device="cpu"), images),
                "GPT-2 chain": (lambda: gpt2_chain(s.gpt_width, s.gpt_depth, device="cpu"), rows),
                "Reformer chain": (lambda: reformer_chain(s.gpt_width, s.gpt_depth, device="cpu"), rows)}
    raise AssertionError(f"no networks listed for chapter {chapter!r}")


@pytest.mark.parametrize("chapter", sorted(CHAPTER_SETTINGS))
def test_large_configuration_trains_one_step(chapter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each network the chapter trains at REVLIB_SCALE=large is built from its real data (a miniature CIFAR-10
    where the chapter reads images) and takes one optimiser step that changes it and keeps the loss finite."""
    write_cifar10(tmp_path)
    monkeypatch.setenv("REVLIB_DATA", str(tmp_path))
    monkeypatch.setenv("REVLIB_SCALE", "large")
    settings = revlib.chapter_settings(chapter)
    assert settings is CHAPTER_SETTINGS[chapter]["large"]
    for name, (build, data) in chapter_networks(chapter, settings).items():
        torch.manual_seed(0)
        model = build()
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        x, y = data.x_train[:8], data.y_train[:8]
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
    rows = image_rows(images)
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


def test_printed_settings_fit_the_page() -> None:
    """A chapter prints its settings: every field as ``repr`` shows it, wrapped into lines of at most 84
    characters (joining the lines gives the ``repr`` back)."""
    for chapter, scales in CHAPTER_SETTINGS.items():
        for scale, settings in scales.items():
            printed = str(settings)
            assert max(len(line) for line in printed.splitlines()) <= 84, f"{chapter} ({scale})"
            assert printed.replace(",\n    ", ", ") == repr(settings), f"{chapter} ({scale})"
            assert printed.count("\n") >= len(repr(settings)) // 84, f"{chapter} ({scale}): not wrapped"


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

    smooth = ode_classifier(64, 10, 16, hidden=8, generator=torch.Generator().manual_seed(0))[0]
    independent = ode_classifier(64, 10, 16, hidden=8, smooth=False)[0]
    assert roughness_in_depth(smooth) < 0.3 < 1.0 < roughness_in_depth(independent)


def test_settings_are_data() -> None:
    """Settings hold numbers and names, not model builders; they import no chapter module."""
    import dataclasses

    for scales in CHAPTER_SETTINGS.values():
        for settings in scales.values():
            assert dataclasses.is_dataclass(settings)
            for field in dataclasses.fields(settings):
                value = getattr(settings, field.name)
                assert isinstance(value, (int, float, str, tuple, dict, type(None))) or hasattr(value, "items"), field.name
