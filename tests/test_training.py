import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revlib.data import DataSplits, load_digits
import revlib
from revlib.training import History, evaluate, fit


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_fit_learns_digits_and_records_every_epoch(device: torch.device) -> None:
    data = load_digits(flat=True, device=device)
    model = small_mlp()
    history = fit(model, data, torch.optim.Adam(model.parameters(), lr=3e-3), epochs=4, progress=False)
    assert history.epochs == 4
    assert all(len(series) == 4 for series in (history.train_accuracy, history.test_loss, history.test_accuracy))
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.test_accuracy[-1] > 0.85
    assert next(model.parameters()).device.type == device.type


def test_fit_is_repeatable_and_seed_changes_the_order() -> None:
    data = load_digits(flat=True)

    def run(seed: int) -> History:
        model = small_mlp()
        return fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), epochs=2, seed=seed, progress=False)

    assert run(0).train_loss == run(0).train_loss
    assert run(0).train_loss != run(1).train_loss


def test_progress_bar_can_be_silenced(capfd: pytest.CaptureFixture[str]) -> None:
    data = load_digits(flat=True)
    model = small_mlp()
    fit(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, progress=False)
    silent = capfd.readouterr()
    assert silent.out == "" and silent.err == ""
    fit(model, data, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, progress=True)
    assert "step" in capfd.readouterr().err


def test_fit_with_regression_targets_reports_nan_accuracy() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    data = DataSplits("linear", x[:30], y[:30], x[30:], y[30:], classes=0)
    model = nn.Linear(3, 1)
    history = fit(model, data, torch.optim.SGD(model.parameters(), lr=0.1), epochs=100, loss_fn=F.mse_loss, progress=False)
    assert math.isnan(history.test_accuracy[-1])
    assert history.test_loss[-1] < 1e-2


def test_evaluate_restores_training_mode() -> None:
    data = load_digits(flat=True)
    model = nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.5))
    model.train()
    loss, accuracy = evaluate(model, data.x_test, data.y_test)
    assert model.training and loss > 0 and 0 <= accuracy <= 1
    assert evaluate(model, data.x_test, data.y_test) == (loss, accuracy)  # eval mode: dropout off


@pytest.mark.parametrize("kwargs, match", [({"epochs": 0}, "epochs"), ({"epochs": 1, "batch_size": 0}, "batch_size")])
def test_fit_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    model = small_mlp()
    with pytest.raises(ValueError, match=match):
        fit(model, load_digits(flat=True), torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_fit_steps_the_scheduler_after_every_optimiser_step() -> None:
    data = revlib.make_spirals(96, device="cpu")
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    revlib.fit(model, data, optimizer, epochs=2, batch_size=32, progress=False, scheduler=scheduler)
    steps = 2 * math.ceil(len(data.x_train) / 32)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**steps)
    with pytest.raises(TypeError, match="scheduler must be"):
        other = torch.optim.SGD(model.parameters(), lr=0.1)
        revlib.fit(model, data, optimizer, epochs=1, progress=False, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def test_evaluate_restores_the_training_mode_when_the_model_raises() -> None:
    import pytest

    class Failing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("a model that fails")

    model = Failing().train()
    with pytest.raises(RuntimeError, match="fails"):
        evaluate(model, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert model.training
