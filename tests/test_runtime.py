import random

import numpy as np
import pytest
import torch

from revlib.runtime import book_scale, book_seed, default_device, resolve_device, seed_everything


def test_default_device_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVLIB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device().type == expected


def test_environment_variable_overrides_default_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVLIB_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_bad_environment_device_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVLIB_DEVICE", "gpu-please")
    with pytest.raises(ValueError, match="REVLIB_DEVICE"):
        default_device()


def test_resolve_device_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("toaster")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_resolve_device_refuses_cuda_without_gpu() -> None:
    with pytest.raises(ValueError, match="asks for CUDA, but PyTorch sees no such device"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="only meaningful without Apple's GPU")
def test_resolve_device_refuses_an_accelerator_that_is_not_there() -> None:
    with pytest.raises(ValueError, match="asks for MPS, but PyTorch sees no such device"):
        resolve_device("mps")


def test_seed_everything_makes_all_generators_repeat() -> None:
    def draw() -> tuple[float, float, list[float]]:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_seed_everything_validates(seed: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="seed"):
        seed_everything(seed)  # type: ignore[arg-type]


def test_book_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVLIB_SCALE", raising=False)
    assert book_scale() == "small"
    monkeypatch.setenv("REVLIB_SCALE", "large")
    assert book_scale() == "large"
    monkeypatch.setenv("REVLIB_SCALE", "huge")
    with pytest.raises(ValueError, match="REVLIB_SCALE"):
        book_scale()


def test_book_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVLIB_SEED", raising=False)
    assert book_seed() == 0
    monkeypatch.setenv("REVLIB_SEED", "7")
    assert book_seed() == 7
    for bad in ("-1", "two", ""):
        monkeypatch.setenv("REVLIB_SEED", bad)
        with pytest.raises(ValueError, match="REVLIB_SEED"):
            book_seed()


def test_one_rule_for_device_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """device=None: what revlib creates goes to default_device() (here REVLIB_DEVICE=meta, so nothing can hide on
    the CPU by accident); what the caller passes in stays where it is."""
    from torch import nn

    import revlib
    from revlib.adjoint import ODEResNet, ode_classifier, tanh_residuals
    from revlib.backprop import MLP
    from revlib.blocks import mlp, small_cnn
    from revlib.linear_backprop import binary_network
    from revlib.residual import conv_network, mlp_network
    from revlib.reversible import ResNet, ReversibleTransformer, RevNet

    digits = revlib.load_digits(flat=True, device="cpu")
    images = revlib.DataSplits("images", torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), 10)
    monkeypatch.setenv("REVLIB_DEVICE", "meta")
    built = {
        "RevNet": RevNet((4, 8), 1),
        "RevNet, plain": RevNet((4, 8), 1, stage=nn.Sequential),
        "ResNet": ResNet((4, 8), 1),
        "ReversibleTransformer": ReversibleTransformer(3, 5, features=8, heads=2),
        "mlp_network": mlp_network(3, 4, 2, 2, residual=True),
        "conv_network": conv_network(1, 4, 2, 2, residual=False),
        "MLP": MLP([3, 4, 2]).to_module(),
        "small_cnn": small_cnn(images.feature_shape, (4, 8), 10),
        "mlp": mlp([3, 4, 2]),
        "binary_network": binary_network(3, 4, 2),
        "ode_classifier": ode_classifier(3, 2, 2, hidden=4),
    }
    for name, module in built.items():
        assert {p.device.type for p in module.parameters()} == {"meta"}, f"{name}: device=None must mean the default device"
    assert revlib.load_digits().x_train.device.type == "meta" and revlib.make_spirals().x_train.device.type == "meta"
    ode = ODEResNet(*tanh_residuals(2, 3))
    assert {p.device.type for p in ode.parameters()} == {"cpu"}, "ODEResNet leaves the residual functions it is given where they are"
    model = nn.Linear(64, 10)
    revlib.fit(model, digits, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, progress=False)
    assert model.weight.device.type == "cpu", "fit trains on the data's device"
    assert revlib.saved_tensor_bytes(model, digits.x_train[:4].clone()) > 0, "measurements run where their inputs are"
