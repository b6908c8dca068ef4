import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revlib.backprop import MLP, loss_and_gradient
from revlib.blocks import ACTIVATIONS
from revlib.linear_backprop import convert_to_linear_backprop
from revlib.verify import finite_difference_gradient, relative_error
from revlib.data import DataSplits, load_digits
from revlib.training import fit


def batch_for(loss: str, sizes: list[int], batch: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], generator=generator, dtype=torch.float64)
    if loss == "cross_entropy":
        return x, torch.randint(0, sizes[-1], (batch,), generator=generator)
    return x, torch.randn(batch, sizes[-1], generator=generator, dtype=torch.float64)


def autograd_objective(module: nn.Sequential, x: torch.Tensor, y: torch.Tensor, loss: str, weight_decay: float) -> torch.Tensor:
    outputs = module(x)
    data_loss = F.cross_entropy(outputs, y) if loss == "cross_entropy" else 0.5 * (outputs - y).pow(2).sum(1).mean()
    decay = 0.5 * weight_decay * sum(layer.weight.pow(2).sum() for layer in module if isinstance(layer, nn.Linear))
    return data_loss + decay


@pytest.mark.parametrize(
    "activation, loss, sizes, weight_decay, linear_backprop",
    list(itertools.product(sorted(ACTIVATIONS), ["cross_entropy", "squared"], [[5, 3], [6, 8, 4], [5, 7, 6, 9, 3]], [0.0, 0.1], [False, True])),
)
def test_hand_written_gradients_equal_autograd(activation: str, loss: str, sizes: list[int], weight_decay: float, linear_backprop: bool) -> None:
    mlp = MLP(sizes, activation, weight_decay=weight_decay, linear_backprop=linear_backprop, seed=1, dtype=torch.float64)
    for bias in mlp.biases:  # non-zero biases, so that their gradients are really exercised
        bias.normal_(generator=torch.Generator().manual_seed(2))
    x, y = batch_for(loss, sizes)
    objective, gradients = mlp.gradients(x, y, loss)
    module = convert_to_linear_backprop(mlp.to_module()) if linear_backprop else mlp.to_module()
    reference = autograd_objective(module, x, y, loss, weight_decay)
    reference.backward()
    assert objective.item() == pytest.approx(reference.item(), rel=1e-12)
    expected = [parameter.grad for parameter in module.parameters()]
    assert relative_error(gradients.tensors(), expected) < 1e-12


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
def test_linear_backprop_drops_the_derivative_and_only_the_derivative(activation: str) -> None:
    sizes = [6, 8, 8, 4]
    x, y = batch_for("cross_entropy", sizes)
    exact = MLP(sizes, activation, seed=3, dtype=torch.float64)
    linear = MLP(sizes, activation, linear_backprop=True, seed=3, dtype=torch.float64)
    assert torch.equal(exact.forward(x)[0], linear.forward(x)[0]), "the forward pass is unchanged"
    _, exact_gradients = exact.gradients(x, y)
    _, linear_gradients = linear.gradients(x, y)
    torch.testing.assert_close(linear_gradients.weights[-1], exact_gradients.weights[-1], rtol=0, atol=0)  # δ_L is the same
    differs = relative_error(linear_gradients.weights[:1], exact_gradients.weights[:1]) > 1e-3
    assert differs == (activation != "identity"), "only a non-linear activation makes the two rules differ"


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_finite_differences_agree_with_hand_written_gradients(activation: str) -> None:
    mlp = MLP([4, 5, 3], activation, weight_decay=0.05, seed=3, dtype=torch.float64)
    x, y = batch_for("cross_entropy", mlp.sizes, batch=6, seed=4)
    _, gradients = mlp.gradients(x, y)

    def objective() -> torch.Tensor:
        data_loss, decay = mlp.objective(x, y)
        return data_loss + decay

    numerical = [finite_difference_gradient(objective, parameter) for parameter in mlp.tensors()]
    assert relative_error(gradients.tensors(), numerical) < 1e-7


def test_finite_difference_restores_the_tensor_and_is_second_order() -> None:
    theta = torch.tensor([0.3, -1.2], dtype=torch.float64)
    gradient = finite_difference_gradient(lambda: (theta**3).sum(), theta, epsilon=1e-3)
    assert torch.equal(theta, torch.tensor([0.3, -1.2], dtype=torch.float64))
    # central difference of t³: 3t² + ε², an O(ε²) error
    assert torch.allclose(gradient, 3 * theta**2 + 1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="epsilon"):
        finite_difference_gradient(lambda: theta.sum(), theta, epsilon=0.0)


def test_forward_matches_the_module_and_caches_each_layer_input() -> None:
    mlp = MLP([64, 32, 16, 10], "tanh", seed=0)
    x = load_digits(flat=True).x_test[:9]
    outputs, cache = mlp.forward(x)
    assert torch.allclose(outputs, mlp.to_module()(x), atol=1e-6)
    assert len(cache) == mlp.depth == 3
    assert cache[0] is x and [tuple(h.shape) for h in cache] == [(9, 64), (9, 32), (9, 16)]


def test_hand_written_training_follows_autograd_training() -> None:
    data = load_digits(flat=True, dtype=torch.float64)
    small = DataSplits("digits", data.x_train[:300], data.y_train[:300], data.x_test[:100], data.y_test[:100], 10)
    mlp = MLP([64, 32, 10], "relu", weight_decay=1e-3, seed=0, dtype=torch.float64)
    module = mlp.to_module()
    weights = [m.weight for m in module if isinstance(m, nn.Linear)]
    biases = [m.bias for m in module if isinstance(m, nn.Linear)]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": 1e-3}, {"params": biases, "weight_decay": 0.0}], lr=0.1)
    by_hand = mlp.train_sgd(small, epochs=3, learning_rate=0.1, progress=False)
    by_autograd = fit(module, small, optimizer, epochs=3, progress=False)
    assert by_hand.train_loss == pytest.approx(by_autograd.train_loss, rel=1e-10)
    assert by_hand.test_accuracy == by_autograd.test_accuracy
    assert by_hand.train_loss[-1] < by_hand.train_loss[0]


def test_loss_gradients_match_autograd() -> None:
    outputs = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, 2])
    value, gradient = loss_and_gradient(outputs.detach(), labels, "cross_entropy")
    F.cross_entropy(outputs, labels).backward()
    assert value.item() == pytest.approx(F.cross_entropy(outputs, labels).item())
    assert torch.allclose(gradient, outputs.grad)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MLP([5]), ValueError, "sizes"),
        (lambda: MLP([5, 0, 3]), ValueError, "sizes"),
        (lambda: MLP([5, 3], "swish"), ValueError, "activation must be one of"),
        (lambda: MLP([5, 3], weight_decay=-1), ValueError, "weight_decay"),
        (lambda: MLP([5, 3]).forward(torch.zeros(2, 4)), ValueError, r"shape \(B, 5\)"),
        (lambda: MLP([5, 3]).forward(torch.zeros(5)), ValueError, r"shape \(B, 5\)"),
        (lambda: MLP([5, 3]).forward([[0.0] * 5]), TypeError, "tensor"),
        (lambda: MLP([5, 3]).gradients(torch.zeros(2, 5), torch.tensor([0, 3])), ValueError, r"\[0, 2\]"),
        (lambda: MLP([5, 3]).gradients(torch.zeros(2, 5), torch.zeros(2)), ValueError, "class indices"),
        (lambda: MLP([5, 3]).gradients(torch.zeros(2, 5), torch.zeros(2, 2), "squared"), ValueError, "outputs' shape"),
        (lambda: MLP([5, 3]).gradients(torch.zeros(2, 5), torch.zeros(2, 3), "hinge"), ValueError, "loss must be"),
        (lambda: MLP([5, 3]).backward([torch.zeros(2, 5)], torch.zeros(2, 4)), ValueError, "output_gradient"),
        (lambda: MLP([5, 4, 3]).backward([torch.zeros(2, 5)], torch.zeros(2, 3)), ValueError, "cache"),
        (lambda: relative_error([torch.zeros(2)], [torch.zeros(3)]), ValueError, "shapes differ"),
        (lambda: relative_error([torch.zeros(2)], []), ValueError, "tensors"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_mlp_runs_on_the_requested_device(device: torch.device) -> None:
    mlp = MLP([6, 4, 2], device=device)
    x = torch.randn(3, 6, device=device)
    _, gradients = mlp.gradients(x, torch.tensor([0, 1, 1], device=device))
    assert all(g.device.type == device.type for g in gradients.tensors())
