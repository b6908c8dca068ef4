"""The recompute mechanism shared by the reversible, adjoint and checkpointed sequences (revlib._recompute):
random state, autocast and BatchNorm statistics replayed alike, parameters checked between forward and backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from revlib.adjoint import ODEResNet, tanh_residuals
from revlib.checkpoint import CheckpointedSequence
from revlib.momentum import MomentumSequence
from revlib.verify import relative_error
from revlib.reversible import ReversibleBlock, ReversibleSequence


class AutocastRecorder(nn.Module):
    """A residual function that notes, at every call, whether autocast was on."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.autocast_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return torch.tanh(self.linear(x))


def reversible(make: Callable[[], nn.Module], blocks: int = 3) -> ReversibleSequence:
    return ReversibleSequence(*[ReversibleBlock(make(), make()) for _ in range(blocks)])


def adjoint(make: Callable[[], nn.Module], steps: int = 3, scheme: str = "euler") -> ODEResNet:
    return ODEResNet(*[make() for _ in range(steps)], scheme=scheme)  # type: ignore[arg-type]


BUILDERS = {
    "reversible": (lambda make: reversible(make), 8),  # (builder, input features: the halves have 4)
    "adjoint-euler": (lambda make: adjoint(make), 4),
    "adjoint-heun": (lambda make: adjoint(make, scheme="heun"), 4),
    "adjoint-heunnet": (lambda make: adjoint(make, scheme="heunnet"), 4),
    "checkpointed-revolve": (lambda make: CheckpointedSequence(*[make() for _ in range(3)], schedule="revolve", slots=2), 4),
    "momentum": (lambda make: MomentumSequence(*[make() for _ in range(3)]), 4),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_autocast_is_re_entered_in_every_recomputation(name: str) -> None:
    build, features = BUILDERS[name]
    torch.manual_seed(0)
    model = build(lambda: AutocastRecorder(4))
    x = torch.randn(5, features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    calls_in_forward = {id(m): len(m.autocast_seen) for m in model.modules() if isinstance(m, AutocastRecorder)}
    out.float().sum().backward()  # outside autocast, as recommended: the recomputation must re-enter it
    recorders = [m for m in model.modules() if isinstance(m, AutocastRecorder)]
    assert all(len(m.autocast_seen) > calls_in_forward[id(m)] for m in recorders), "every function is recomputed"
    assert all(all(m.autocast_seen) for m in recorders), "autocast must be on in the recomputation as it was in forward"


def captured_states(output: torch.Tensor) -> list:
    """The ForwardStates the custom Function behind ``output`` kept for its backward pass, in order."""
    states = output.grad_fn.states  # type: ignore[union-attr]
    return [state for entry in states for state in (entry if isinstance(entry, tuple) else (entry,))]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_no_random_state_is_kept_for_a_piece_that_draws_no_random_numbers(name: str) -> None:
    """Without dropout no piece keeps a generator state (the memory kept for the replay is none, at any depth,
    and the backward pass sets none); with dropout each piece keeps its own, and replays it."""
    build, features = BUILDERS[name]
    torch.manual_seed(0)
    x = torch.randn(5, features, requires_grad=True)
    plain = captured_states(build(lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh()))(x))
    assert len(plain) >= 2 and all(state.cpu_rng is None for state in plain), "the last piece's state too"
    random = captured_states(build(lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))(x))
    kept = {id(state.cpu_rng) for state in random if state.cpu_rng is not None}
    assert len(kept) == len(random), "every piece drew random numbers, and keeps its own state"


@pytest.mark.parametrize("scheme, calls", [("euler", 1), ("heun", 2)])
def test_adjoint_updates_batchnorm_statistics_once_per_forward(scheme: str, calls: int) -> None:
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Tanh())  # noqa: E731
    model = adjoint(make, steps=4, scheme=scheme).double()
    twin = ODEResNet(*[make() for _ in range(4)], scheme=scheme, memory_saving=False).double()  # backprop: runs each step once
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    model(x).pow(2).sum().backward()
    twin(x).pow(2).sum().backward()
    for key, value in model.state_dict().items():
        assert torch.allclose(value, twin.state_dict()[key]), f"{key} differs from one forward pass's update"
    assert all(int(m.num_batches_tracked) == calls for m in model.modules() if isinstance(m, nn.BatchNorm1d))


def test_adjoint_replays_dropout_masks() -> None:
    """With dropout, the adjoint's gradient approximates backprop's through the same masks; without the replay
    it back-propagates through other masks and is far off."""

    def error(preserve_rng_state: bool) -> float:
        torch.manual_seed(0)
        residuals = [nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Dropout(0.3)) for _ in range(32)]
        model = ODEResNet(*residuals, preserve_rng_state=preserve_rng_state).double()
        x = torch.randn(8, 6, dtype=torch.float64)
        gradients = []
        for memory_saving in (False, True):
            model.memory_saving = memory_saving
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same masks in both forward passes
            model(x).pow(2).sum().backward()
            gradients.append([p.grad.clone() for p in model.parameters()])
        return relative_error(gradients[1], gradients[0])

    replayed, not_replayed = error(True), error(False)
    assert replayed < 0.05, f"replayed masks: gradient error {replayed:.3g}"
    assert not_replayed > 5 * replayed, f"without the replay the error should be much larger: {not_replayed:.3g} vs {replayed:.3g}"


def test_adjoint_with_dropout_leaves_the_callers_random_stream_alone() -> None:
    torch.manual_seed(0)
    model = ODEResNet(*[nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)) for _ in range(4)])
    torch.manual_seed(5)
    model(torch.randn(2, 3)).sum().backward()
    after_backward = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        model(torch.randn(2, 3))
    assert torch.equal(torch.rand(3), after_backward), "backward must not advance the global generator"


@pytest.mark.parametrize("what", ["parameter", "submodule"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_parameters_replaced_between_forward_and_backward_are_refused(name: str, what: str) -> None:
    build, features = BUILDERS[name]
    torch.manual_seed(0)
    model = build(lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    out = model(torch.randn(3, features, requires_grad=True))
    holder = next(m for m in model.modules() if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Linear))
    if what == "parameter":
        holder[0].weight = nn.Parameter(holder[0].weight.detach().clone())
    else:
        holder[0] = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="changed between its forward and backward"):
        out.sum().backward()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_parameters_changed_in_place_between_forward_and_backward_are_refused(name: str) -> None:
    build, features = BUILDERS[name]
    torch.manual_seed(0)
    model = build(lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    out = model(torch.randn(3, features, requires_grad=True))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # e.g. an optimiser step before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_only_buffers_updated_in_forward_are_kept_for_restoring() -> None:
    from revlib._recompute import ForwardState

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
    model.register_buffer("constant", torch.ones(1000))  # never written: must not be copied at every backward
    for training, expected in ((True, 3), (False, 0)):
        model.train(training)
        state = ForwardState.capture(torch.device("cpu"), preserve_rng=False)
        with state.recording(model):
            model(torch.randn(5, 4))
        assert len(state.updated_buffers) == expected, f"training={training}: {len(state.updated_buffers)} buffers kept"
        assert all(buffer is not model.constant for buffer in state.updated_buffers)


PLAIN_TWINS = {  # each builder's blocks run with ordinary autograd
    "reversible": lambda model: nn.Sequential(*model.blocks),
    "adjoint-euler": lambda model: ODEResNet(*model.residuals, memory_saving=False),
    "adjoint-heun": lambda model: ODEResNet(*model.residuals, scheme="heun", memory_saving=False),
    "adjoint-heunnet": lambda model: ODEResNet(*model.residuals, scheme="heunnet", memory_saving=False),
    "checkpointed-revolve": lambda model: nn.Sequential(*model),
    "momentum": lambda model: MomentumSequence(*model.functions, memory_saving=False),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_dropout_masks_are_replayed_on_every_device(name: str, device: torch.device) -> None:
    """On the CPU and on any accelerator present, the recomputation draws the forward pass's dropout masks:
    exact sequences give autograd's gradients through the same masks, to float64 rounding (the adjoints'
    own error aside: they are compared with a looser bound, and without replay they are far off)."""
    build, features = BUILDERS[name]
    if name.startswith("adjoint"):  # deep enough for the adjoint's own error to be small
        build = lambda make: adjoint(make, steps=32, scheme=name.split("-")[1])  # noqa: E731
    torch.manual_seed(0)
    model = build(lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Dropout(0.3))).to(device, torch.float64)
    twin = PLAIN_TWINS[name](model)
    x = torch.randn(6, features, dtype=torch.float64, device=device)

    def gradients(network: nn.Module) -> list[torch.Tensor]:
        network.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks in both forward passes
        network(x).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    bound = 1e-2 if name.startswith("adjoint") else 1e-12
    assert relative_error(gradients(model), gradients(twin)) < bound


def test_module_walks_match_nn_module() -> None:
    """revlib's cheaper walks give what nn.Module's modules() and parameters() give: shared submodules and
    parameters once, depth first, parametrized weights through their originals, and a class that walks its
    own way asked directly."""
    from torch.nn.utils import parametrize

    from revlib._recompute import ModuleTree, module_parameters

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    class OwnWalk(nn.Sequential):
        def parameters(self, recurse: bool = True):  # type: ignore[override]
            return iter(list(super().parameters(recurse))[::-1])

    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    tied = nn.Linear(3, 3)
    tied.bias = shared.bias
    model = nn.Sequential(shared, nn.Sequential(nn.Tanh(), shared, tied), nn.BatchNorm1d(3), nn.Linear(3, 3))
    parametrize.register_parametrization(model[3], "weight", Scale())
    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))

    assert same(module_parameters(model), list(model.parameters()))
    tree = ModuleTree(model)
    assert same(tree.modules, list(model.modules())) and same(tree.parameters, list(model.parameters()))
    own = OwnWalk(nn.Linear(2, 2), nn.Linear(2, 2))
    assert same(module_parameters(own), list(own.parameters()))
    assert same(ModuleTree(own).parameters, list(own.parameters()))


CHANGES: dict[str, Callable[[nn.Sequential], None]] = {
    "a parameter replaced": lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())),
    "a parameter swapped in the dict": lambda m: m[2]._parameters.__setitem__("bias", m[2].bias.detach().clone()),
    "a parameter added": lambda m: m[1].register_parameter("scale", nn.Parameter(torch.ones(1))),
    "a submodule replaced": lambda m: m.__setitem__(0, nn.Linear(3, 3)),
    "a submodule added to a leaf": lambda m: m[1].add_module("extra", nn.Linear(3, 3)),
    "a nested submodule replaced": lambda m: m[3].__setitem__(0, nn.Linear(3, 3)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_module_tree_notices_what_a_new_walk_would_find_different(change: str) -> None:
    """ModuleTree.unchanged(), the backward pass's check that it recomputes the piece that ran, answers as
    comparing a new walk's parameters would: False after any change that gives the module other parameters."""
    from revlib._recompute import ModuleTree, module_parameters

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))
    tree = ModuleTree(model)
    model[1].register_buffer("unrelated", torch.zeros(1))  # a buffer changes no parameter
    assert tree.unchanged()
    CHANGES[change](model)
    now = module_parameters(model)
    assert not (len(now) == len(tree.parameters) and all(a is b for a, b in zip(now, tree.parameters))), "the change is one"
    assert not tree.unchanged()
