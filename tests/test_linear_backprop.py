"""Tests of revlib.linear_backprop: the identity-backward wrapper, model conversion and the sign STE."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from revlib.backprop import MLP
from revlib.data import DataSplits
from revlib.linear_backprop import (
    FullBatchRun,
    LinearBackprop,
    SignSTE,
    convert_to_linear_backprop,
    linear_backprop_cosines,
    sign_ste,
    train_full_batch,
)
from revlib.verify import cosine_similarity

ACTIVATIONS = [nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.LeakyReLU(0.1), torch.tanh, torch.sigmoid]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: getattr(a, "__name__", type(a).__name__))
def test_forward_is_unchanged_and_backward_is_the_identity(activation, device):
    x = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    wrapped = LinearBackprop(activation)
    y = wrapped(x)
    torch.testing.assert_close(y, activation(x), rtol=0, atol=0)
    upstream = torch.randn_like(y)
    (gradient,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(gradient, upstream, rtol=0, atol=0)


def test_gradcheck_where_the_identity_is_the_true_derivative():
    """gradcheck in float64 with an activation whose Jacobian is the identity: the custom backward is exact."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LinearBackprop(lambda u: u + 0.0), (x,))
    assert torch.autograd.gradgradcheck(LinearBackprop(lambda u: u + 0.0), (x,))


def test_gradients_of_a_small_network_by_hand():
    """y = W2 tanh(W1 x + b1) + b2 with linear backprop: δ_hidden = ȳ W2 (no ⊙ tanh'), ∂/∂W1 = δ_hiddenᵀ x,
    ∂/∂W2 = ȳᵀ tanh(W1 x + b1) (the true activations)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True), torch.randn(6, dtype=torch.float64, requires_grad=True)
    w2, b2 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True), torch.randn(2, dtype=torch.float64, requires_grad=True)
    out = LinearBackprop(torch.tanh)(x @ w1.T + b1) @ w2.T + b2
    upstream = torch.randn(4, 2, dtype=torch.float64)
    grad_x, grad_w1, grad_b1, grad_w2 = torch.autograd.grad(out, [x, w1, b1, w2], upstream)
    delta_hidden = upstream @ w2  # (4, 6)
    torch.testing.assert_close(grad_x, delta_hidden @ w1)
    torch.testing.assert_close(grad_w1, delta_hidden.T @ x)
    torch.testing.assert_close(grad_b1, delta_hidden.sum(0))
    torch.testing.assert_close(grad_w2, upstream.T @ torch.tanh(x @ w1.T + b1))


def test_no_grad_and_inputs_without_grad_just_apply_the_activation():
    x = torch.randn(3, 3)
    assert torch.equal(LinearBackprop(nn.ReLU())(x), torch.relu(x))
    with torch.no_grad():
        assert torch.equal(LinearBackprop(nn.ReLU())(x.requires_grad_()), torch.relu(x))


def test_bad_activations_get_clear_errors():
    with pytest.raises(TypeError, match="activation"):
        LinearBackprop(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trainable parameters"):
        LinearBackprop(nn.PReLU())
    with pytest.raises(ValueError, match="elementwise"):
        LinearBackprop(lambda u: u.sum(dim=1))(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(ValueError, match="elementwise"):
        LinearBackprop(lambda u: u.sum(dim=1))(torch.randn(3, 4))


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.gate(self.encoder(x)))


def test_conversion_finds_nested_activations_and_copies_by_default():
    torch.manual_seed(0)
    model = _Nested()
    converted = convert_to_linear_backprop(model)
    assert converted is not model and isinstance(model.encoder[1], nn.Tanh), "the original is untouched"
    assert isinstance(converted.encoder[1], LinearBackprop) and isinstance(converted.encoder[2][1], LinearBackprop)
    assert isinstance(converted.gate, LinearBackprop) and isinstance(converted.head, nn.Linear)
    assert converted.encoder[0].weight is not model.encoder[0].weight, "the copy has its own parameters"
    x = torch.randn(6, 4)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    again = convert_to_linear_backprop(converted, inplace=True)
    assert again is converted and isinstance(again.gate.activation, nn.Sigmoid), "converting twice changes nothing"
    assert isinstance(convert_to_linear_backprop(nn.ReLU()), LinearBackprop)


def test_conversion_only_wraps_the_requested_types_and_back_propagates_linearly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    only_tanh = convert_to_linear_backprop(model, activations=(nn.Tanh,))
    assert isinstance(only_tanh[1], LinearBackprop) and isinstance(only_tanh[3], nn.ReLU)
    converted = convert_to_linear_backprop(model)
    x = torch.randn(8, 3, dtype=torch.float64)
    converted(x).sum().backward()
    # the gradient of the last layer reads the true activations; the error below it travels as if σ = id
    delta = torch.ones(8, 1, dtype=torch.float64) @ model[4].weight @ model[2].weight  # (8, 5)
    torch.testing.assert_close(converted[0].weight.grad, delta.T @ x)
    hidden = torch.relu(model[2](torch.tanh(model[0](x))))
    torch.testing.assert_close(converted[4].weight.grad, torch.ones(8, 1, dtype=torch.float64).T @ hidden)
    with pytest.raises(TypeError, match="model"):
        convert_to_linear_backprop("relu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="activations"):
        convert_to_linear_backprop(model, activations=(torch.relu,))  # type: ignore[arg-type]


def test_sign_ste_forward_and_both_backward_rules():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    (clipped,) = torch.autograd.grad(y, x, torch.full_like(x, 3.0))
    assert clipped.tolist() == [0.0, 3.0, 3.0, 3.0, 0.0]
    (straight,) = torch.autograd.grad(sign_ste(x, clip=None), x, torch.full_like(x, 3.0))
    assert straight.tolist() == [3.0] * 5
    (as_linear_backprop,) = torch.autograd.grad(LinearBackprop(lambda u: torch.where(u >= 0, 1.0, -1.0))(x), x, torch.full_like(x, 3.0))
    assert torch.equal(as_linear_backprop, straight), "the unclipped STE is linear backprop through sign"
    assert SignSTE(clip=0.5)(x).tolist() == y.tolist()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip"):
            sign_ste(x, clip=bad)
        with pytest.raises(ValueError, match="clip"):
            SignSTE(clip=bad)


def test_sign_ste_gradcheck_of_the_surrogate():
    """In float64, the clipped STE's backward is hardtanh's Jacobian: check it against autograd of hardtanh."""
    x = (torch.rand(20, dtype=torch.float64) * 4 - 2).requires_grad_(True)
    upstream = torch.randn(20, dtype=torch.float64)
    (ste,) = torch.autograd.grad(sign_ste(x, clip=1.0), x, upstream)
    (hardtanh,) = torch.autograd.grad(torch.nn.functional.hardtanh(x), x, upstream)
    torch.testing.assert_close(ste, hardtanh, rtol=0, atol=0)


@pytest.mark.parametrize(("activation", "saves_less"), [(nn.ReLU, False), (nn.Tanh, False), (nn.GELU, True), (nn.SiLU, True)])
def test_linear_backprop_saves_less_only_where_the_activation_keeps_its_input(activation: type[nn.Module], saves_less: bool) -> None:
    """ReLU and tanh keep their *output* for backward, which the next linear layer keeps anyway: the saved bytes
    are the same. GELU and SiLU keep their *input*, a tensor of its own: linear backprop, which needs no σ',
    saves one activation per layer less."""
    from revlib.measure import saved_tensor_bytes

    torch.manual_seed(0)
    width, batch, layers = 32, 16, 3
    model = nn.Sequential(*[module for _ in range(layers) for module in (nn.Linear(width, width), activation())], nn.Linear(width, 4))
    x = torch.randn(batch, width)
    plain = saved_tensor_bytes(model, x, exclude=model.parameters())
    converted = convert_to_linear_backprop(model)  # a copy
    linear = saved_tensor_bytes(converted, x, exclude=converted.parameters())
    activation_bytes = batch * width * 4
    if saves_less:
        assert plain - linear == layers * activation_bytes
    else:
        assert plain == linear


def test_an_in_place_activation_is_marked_dirty_and_gives_the_linear_gradient() -> None:
    """nn.ReLU(inplace=True) writes into its input: autograd must be told, or the graph silently reads the
    overwritten values. Linear backprop through Linear → in-place ReLU → Linear equals the same network with
    the out-of-place ReLU."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    results = []
    for inplace in (True, False):
        first.zero_grad(), second.zero_grad()
        hidden = first(x)
        version = hidden._version
        out = second(LinearBackprop(nn.ReLU(inplace=inplace))(hidden))
        assert (hidden._version != version) == inplace
        out.pow(2).sum().backward()
        results.append([out.detach(), first.weight.grad.clone(), second.weight.grad.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_linear_backprop_cosines_per_layer() -> None:
    torch.manual_seed(0)
    network = MLP([6, 16, 16, 3], "sigmoid", linear_backprop=True, seed=0, dtype=torch.float64)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    cosines = linear_backprop_cosines(network, x, y)
    assert len(cosines) == 3 and cosines[-1] == pytest.approx(1.0), "the output layer's gradient is the same"
    assert all(-1 <= c < 0.999 for c in cosines[:-1]), "below the output the factors σ' change the direction"
    assert network.linear_backprop, "the network keeps its rule"
    exact = MLP([6, 16, 16, 3], "sigmoid", seed=0, dtype=torch.float64)
    assert linear_backprop_cosines(exact, x, y) == pytest.approx(cosines), "the same weights give the same cosines"
    for example in range(8):  # Exercise 2: one example, the layer below the output: never negative
        one = MLP([6, 16, 3], "tanh", seed=example, dtype=torch.float64)
        assert linear_backprop_cosines(one, x[example : example + 1], y[example : example + 1])[0] >= 0


def _five_points(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=generator, dtype=dtype), torch.rand(5, 1, generator=generator, dtype=dtype)


@pytest.mark.parametrize("linear", [False, True])
def test_train_full_batch_equals_one_network_at_a_time_with_train_sgd(linear: bool) -> None:
    """K networks trained side by side follow exactly the steps MLP.train_sgd takes for each one alone."""
    x, y = _five_points()
    data = DataSplits("five", x, y, x, y, classes=1)
    together = [MLP([4, 8, 8, 1], "sigmoid", seed=k, dtype=torch.float64) for k in range(3)]
    alone = [MLP([4, 8, 8, 1], "sigmoid", linear_backprop=linear, seed=k, dtype=torch.float64) for k in range(3)]
    run = train_full_batch(together, x, y, 20, update="linear" if linear else "backprop", learning_rate=0.3)
    assert run.loss.shape == (21, 3) and run.descent.shape == (20, 3) and run.scale.shape == (20, 3, 3)
    for network, reference in zip(together, alone):
        history = reference.train_sgd(data, 20, learning_rate=0.3, batch_size=5, loss="squared", progress=False)
        for a, b in zip(network.tensors(), reference.tensors()):
            torch.testing.assert_close(a, b)
        k = together.index(network)
        torch.testing.assert_close(run.loss[:20, k], torch.tensor(history.train_loss, dtype=torch.float64))
    if not linear:
        torch.testing.assert_close(run.descent, torch.ones(20, 3, dtype=torch.float64), msg="the gradient descends")


def test_rescaled_update_is_the_gradient_with_linear_backprops_layer_lengths() -> None:
    x, y = _five_points()
    network = MLP([4, 8, 8, 1], "sigmoid", seed=1, dtype=torch.float64)
    before = [tensor.clone() for tensor in network.tensors()]
    _, exact = copy_with_rule(network, False).gradients(x, y, "squared")
    _, linear = copy_with_rule(network, True).gradients(x, y, "squared")
    run = train_full_batch([network], x, y, 1, update="rescaled", learning_rate=0.1)
    for layer in range(network.depth):
        pair = [exact.weights[layer], exact.biases[layer]]
        length = torch.cat([linear.weights[layer].flatten(), linear.biases[layer]]).norm()
        ratio = length / torch.cat([t.flatten() for t in pair]).norm()
        assert run.scale[0, 0, layer].item() == pytest.approx(ratio.item())
        torch.testing.assert_close(network.weights[layer], before[2 * layer] - 0.1 * ratio * exact.weights[layer])
    assert run.scale[0, 0, -1].item() == pytest.approx(1.0), "the output layer's update is the same under both rules"
    assert all(run.scale[0, 0, layer] > 4 for layer in range(network.depth - 1)), "σ' ≤ 1/4: linear steps are longer"
    assert 0 < run.descent[0, 0].item() < 1, "positive per-layer factors keep a descent direction, turned"


def test_train_full_batch_with_adam_and_the_whole_update_cosine() -> None:
    x, y = _five_points()
    networks = [MLP([4, 8, 8, 1], "sigmoid", seed=k, dtype=torch.float64) for k in range(2)]
    run = train_full_batch(networks, x, y, 300, update="backprop", learning_rate=1e-2, optimizer="adam")
    assert (run.loss[-1] < 0.1 * run.loss[0]).all(), "Adam fits the points"
    linear = [MLP([4, 8, 8, 1], "sigmoid", seed=k, dtype=torch.float64) for k in range(2)]
    first = train_full_batch(linear, x, y, 1, update="linear", learning_rate=0.1)
    fresh = MLP([4, 8, 8, 1], "sigmoid", seed=0, dtype=torch.float64)
    _, exact = copy_with_rule(fresh, False).gradients(x, y, "squared")
    _, approximate = copy_with_rule(fresh, True).gradients(x, y, "squared")
    whole = cosine_similarity(torch.cat([t.flatten() for t in approximate.tensors()]),
                              torch.cat([t.flatten() for t in exact.tensors()]))
    assert first.descent[0, 0].item() == pytest.approx(whole)
    assert first.layer_cosine[0, 0].tolist() == pytest.approx(linear_backprop_cosines(fresh, x, y, "squared"))


def test_train_full_batch_fits_exactly_without_nans_and_restores_threads() -> None:
    x, y = _five_points()
    network = MLP([4, 1], "sigmoid", seed=0, dtype=torch.float64)  # one linear layer: least squares, loss → 0
    threads = torch.get_num_threads()
    run = train_full_batch([network], torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64),
                           3, update="rescaled", learning_rate=0.1)
    assert torch.get_num_threads() == threads
    assert run.loss.max().item() == 0 and run.descent.isnan().all() and (run.scale == 1).all()


def test_train_full_batch_rejects_bad_input() -> None:
    x, y = _five_points()
    network = MLP([4, 8, 1], "sigmoid", dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one"):
        train_full_batch([], x, y, 1, update="linear", learning_rate=0.1)
    with pytest.raises(TypeError, match="MLP"):
        train_full_batch([nn.Linear(4, 1)], x, y, 1, update="linear", learning_rate=0.1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="same sizes"):
        train_full_batch([network, MLP([4, 9, 1], "sigmoid")], x, y, 1, update="linear", learning_rate=0.1)
    with pytest.raises(ValueError, match="weight decay"):
        train_full_batch([MLP([4, 8, 1], weight_decay=0.1)], x, y, 1, update="linear", learning_rate=0.1)
    with pytest.raises(ValueError, match="update"):
        train_full_batch([network], x, y, 1, update="sideways", learning_rate=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer"):
        train_full_batch([network], x, y, 1, update="linear", learning_rate=0.1, optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        train_full_batch([network], x, y, 0, update="linear", learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        train_full_batch([network], x, y, 1, update="linear", learning_rate=0.0)
    with pytest.raises(ValueError, match="targets"):
        train_full_batch([network], x, y[:, 0], 1, update="linear", learning_rate=0.1)
    with pytest.raises(ValueError, match="inputs"):
        train_full_batch([network], x[:, :3], y, 1, update="linear", learning_rate=0.1)


def copy_with_rule(network: MLP, linear: bool) -> MLP:
    view = copy.copy(network)
    view.linear_backprop = linear
    return view


def test_steps_to_fit() -> None:
    loss = torch.tensor([[1.0, 1.0, 0.0], [0.5, 1.0, 0.0], [0.01, 1.0, 0.0]])
    run = FullBatchRun(loss, torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.ones(2, 3, 1))
    assert run.steps_to_fit(0.1).tolist() == [2, float("inf"), 0]
    with pytest.raises(ValueError, match="threshold"):
        run.steps_to_fit(0.0)
