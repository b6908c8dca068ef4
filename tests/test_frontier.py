"""The frontier: one training step under every method, its memory split, time, gradient error and recomputation."""

import pytest
import torch

from revlib import frontier as frontier_module
from revlib.checkpoint import checkpoint_plan
from revlib.frontier import FrontierRow, format_table, frontier, methods, residual_function
from revlib.training import make_optimizer

DEPTH, WIDTH = 4, 8
FLOAT32 = 4


@pytest.fixture(scope="module")
def rows() -> dict[str, FrontierRow]:
    found = frontier("mlp", depth=DEPTH, width=WIDTH, batch=16, optimizer="adam", device="cpu", repeats=1, progress=False)
    return {row.method: row for row in found}


def test_every_method_on_the_cpu_has_a_row(rows: dict[str, FrontierRow]) -> None:
    assert set(rows) == {"backprop", "checkpoint every", "checkpoint sqrt", "revolve-2", "reversible", "momentum", "adjoint euler",
                         "adjoint heun", "reversible heun"}, "offload is measured on CUDA only"


def test_memory_parts_are_counted_exactly(rows: dict[str, FrontierRow]) -> None:
    function = 2 * (WIDTH * WIDTH + WIDTH)  # Linear → tanh → Linear on WIDTH features
    coupling = 2 * (WIDTH // 2 * WIDTH + WIDTH + WIDTH * WIDTH // 2 + WIDTH // 2)  # F and G: WIDTH/2 → WIDTH → WIDTH/2
    stem, head = 64 * WIDTH + WIDTH, WIDTH * 10 + 10
    for name, row in rows.items():
        per_block = coupling if name == "reversible" else function
        memory = row.memory
        assert memory.parameters == FLOAT32 * (stem + DEPTH * per_block + head), name
        assert memory.gradients == memory.parameters, f"{name}: every parameter gets a gradient"
        tensors = 2 * (2 + (4 if name == "reversible" else 2) * DEPTH)  # weights and biases, each with a step counter
        assert memory.optimizer_state == 2 * memory.parameters + FLOAT32 * tensors, f"{name}: Adam's two moments and step counters"
        assert memory.inputs == 16 * 64 * FLOAT32 + 16 * 8, f"{name}: the batch and its int64 targets"
        assert memory.parts == memory.parameters + memory.gradients + memory.optimizer_state + memory.activations + memory.inputs
        assert memory.floor <= memory.peak == sum(memory.at_peak.values()), name
        assert row.seconds > 0


def test_reversible_block_has_the_weights_of_a_residual_function(rows: dict[str, FrontierRow]) -> None:
    """Equal networks: the coupling's F and G widen to the full width inside, so its weights (biases aside)
    equal one residual function's; a half-width coupling would have half of them."""
    plain, reversible = rows["backprop"].memory.parameters, rows["reversible"].memory.parameters
    biases = FLOAT32 * DEPTH * WIDTH  # the coupling's hidden biases: 2 · WIDTH per block against WIDTH
    assert reversible - plain == biases


def test_exact_methods_match_backprop_and_the_adjoint_does_not(rows: dict[str, FrontierRow]) -> None:
    exact = ["backprop", "checkpoint every", "checkpoint sqrt", "revolve-2", "reversible", "momentum"]
    worst = max(rows[name].gradient_error for name in exact)
    assert worst < 1e-5
    assert rows["adjoint euler"].gradient_error > 10 * max(worst, 1e-7), "the adjoint is an approximation"


def test_recomputations_follow_the_schedules(rows: dict[str, FrontierRow]) -> None:
    assert rows["backprop"].recomputations == 0
    assert rows["checkpoint every"].recomputations == 1
    for name, plan in (("checkpoint sqrt", checkpoint_plan(DEPTH, "sqrt")), ("revolve-2", checkpoint_plan(DEPTH, "revolve", 2))):
        assert rows[name].recomputations == pytest.approx(1 + plan.advances / DEPTH), name
    assert rows["reversible"].recomputations == rows["momentum"].recomputations == 1


def test_saved_activations_shrink_from_backprop_to_the_smallest_budget(rows: dict[str, FrontierRow]) -> None:
    activations = {name: row.memory.activations for name, row in rows.items()}
    assert activations["backprop"] > activations["checkpoint every"] > activations["revolve-2"]
    assert activations["momentum"] < activations["checkpoint every"]


def test_format_table_has_a_line_per_method(rows: dict[str, FrontierRow]) -> None:
    table = format_table(list(rows.values())).splitlines()
    assert len(table) == len(rows) + 2 and "MiB" in table[0] and "grad err" in table[1]


def test_transformer_family_trains_gpt2_blocks_on_rows_of_digits() -> None:
    """The GPT-2 family: every method runs on eight row tokens; the exact ones give backprop's gradient (the
    reversible coupling split along the features, the last dimension), the adjoint does not; the reversible
    network's two half-width attentions hold half of one full-width attention's weights, and its feed-forward
    halves widen to five times the width to make up for it: the same weights as GPT-2's, biases and
    LayerNorms aside."""
    depth, width = 2, 8
    rows = {row.method: row for row in frontier("transformer", depth=depth, width=width, batch=8, device="cpu", repeats=1,
                                                progress=False)}
    exact = ["backprop", "checkpoint every", "checkpoint sqrt", "revolve-2", "reversible", "momentum"]
    assert max(rows[name].gradient_error for name in exact) < 1e-5
    assert rows["adjoint euler"].gradient_error > 1e-4
    def attention(d: int) -> int:  # LayerNorm, the query-key-value map and the output map
        return 2 * d + (d * 3 * d + 3 * d) + (d * d + d)
    def feedforward(d: int, hidden: int) -> int:
        return 2 * d + (d * hidden + hidden) + (hidden * d + d)
    plain = attention(width) + feedforward(width, 4 * width)
    coupling = 2 * (attention(width // 2) + feedforward(width // 2, 5 * width))
    assert rows["reversible"].memory.parameters - rows["backprop"].memory.parameters == FLOAT32 * depth * (coupling - plain)
    biases_and_norms = 2 * (2 * (width // 2) + 3 * (width // 2) + (width // 2) + 2 * (width // 2) + 5 * width + width // 2)
    biases_and_norms -= 2 * width + 3 * width + width + 2 * width + 4 * width + width
    assert coupling - plain == biases_and_norms, "equal weights, biases and LayerNorms aside"


def test_only_measures_the_named_methods_in_order_and_combinations_stack_on_revlibs() -> None:
    """bf16 and micro-batching on top of a checkpointed or reversible stack: the stack's recomputation, the
    combination's gradient (micro-batches exact without BatchNorm, bf16 off by its rounding), the stack's
    memory saving on top of the combination's."""
    names = ["checkpoint every + micro-batch 4", "backprop", "checkpoint every + bf16", "bf16 autocast", "micro-batch 4",
             "reversible + micro-batch 4"]
    found = frontier("mlp", depth=DEPTH, width=64, batch=32, device="cpu", repeats=1, progress=False, pytorch=True,
                     combined=True, only=names)
    assert [row.method for row in found] == names
    rows = {row.method: row for row in found}
    assert rows["checkpoint every + micro-batch 4"].recomputations == 1 == rows["checkpoint every + bf16"].recomputations
    assert rows["reversible + micro-batch 4"].recomputations == 1 and rows["micro-batch 4"].recomputations == 0
    assert rows["checkpoint every + micro-batch 4"].gradient_error < 1e-5 and rows["checkpoint every + bf16"].gradient_error > 1e-3
    assert rows["checkpoint every + micro-batch 4"].memory.activations < rows["micro-batch 4"].memory.activations
    assert rows["checkpoint every + bf16"].memory.activations < rows["bf16 autocast"].memory.activations


def test_the_compiled_rows_use_the_backend_asked_for() -> None:
    """``compile_backend`` reaches every compiled row (the benchmark's ``--backend inductor``)."""
    for backend in ("aot_eager_decomp_partition", "aot_eager"):
        built = methods("mlp", 2, 4, "cpu", budgets=(1.0, 0.5), compile_backend=backend)
        compiled = [built[f"compile {b:g}"]().model for b in (1.0, 0.5)]
        assert [model.backend for model in compiled] == [backend, backend]
        assert [model.budget for model in compiled] == [1.0, 0.5]


def test_only_refuses_unknown_names_and_lists_the_known() -> None:
    with pytest.raises(ValueError, match=r"only must name methods among \['backprop', .*'reversible heun'\], got \['SAC matmuls'\]"):
        frontier("mlp", depth=2, width=4, batch=4, only=["SAC matmuls"])  # PyTorch's tools only with pytorch=True
    with pytest.raises(ValueError, match="only must name methods"):
        frontier("mlp", depth=2, width=4, batch=4, only="backprop")


def test_optimizer_state_sizes() -> None:
    weight = torch.zeros(10, requires_grad=True)
    for name, buffers in (("sgd", 0), ("momentum", 1), ("adam", 2)):
        optimizer = make_optimizer(name, [weight])
        weight.grad = torch.ones(10)
        optimizer.step()
        state = [v for entry in optimizer.state.values() for v in entry.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        assert len(state) == buffers, name


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"family": "rnn"}, "family must be one of"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ({"depth": 0}, "depth must be a positive integer"),
    ({"width": 7}, "width must be even"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        frontier(**{"family": "mlp", "depth": 2, "width": 4, "batch": 4, **kwargs})


def test_residual_function_checks_its_arguments() -> None:
    assert residual_function("conv", 4)(torch.randn(2, 4, 8, 8)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        residual_function("mlp", 0)
    assert isinstance(residual_function("conv", 4, norm="group")[0], torch.nn.GroupNorm)
    assert isinstance(residual_function("conv", 4)[0], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="norm must be None, 'batch' or 'group' for the conv family, got 'layer'"):
        residual_function("conv", 4, norm="layer")
    with pytest.raises(ValueError, match="the mlp family's residual functions have none to choose"):
        residual_function("mlp", 4, norm="batch")
    with pytest.raises(ValueError, match="the transformer family's residual functions have none to choose"):
        frontier_module.methods("transformer", 2, 16, "cpu", norm="group")


@pytest.mark.parametrize("first_step", [False, True])
def test_step_memory_equals_the_hand_count(first_step: bool) -> None:
    """Three bias-free linear layers of width 256, Adam, cross-entropy on 256 classes, batch 1024. By hand:
    parameters 3·256² floats, as many gradients, twice as many Adam moments (and three step counters); the
    batch and its targets. The peak lies between the floor and the naive sum plus what the temporaries hold
    at the peak. A steady-state step holds Adam's moments throughout, so its peak is at least the first
    step's."""
    from revlib.measure import step_memory

    width, batch = 256, 1024
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(3)])
    inputs, targets = torch.randn(batch, width), torch.randint(0, width, (batch,))
    memory = step_memory(model, inputs, targets, "adam", first_step=first_step)
    weights = 3 * width * width * FLOAT32
    assert (memory.parameters, memory.gradients) == (weights, weights)
    assert memory.optimizer_state == 2 * weights + 3 * FLOAT32
    assert memory.inputs == batch * width * FLOAT32 + batch * 8
    activation = batch * width * FLOAT32
    # the inputs of the second and third layer, the logits and the log-softmax output, at least
    assert memory.activations >= 4 * activation
    assert memory.floor <= memory.peak <= memory.parts + memory.at_peak["temporaries"]
    if not first_step:
        first = step_memory(model, inputs, targets, "adam", first_step=True)
        assert memory.peak >= first.peak


def test_gradient_errors_are_those_of_the_initial_weights(rows: dict[str, FrontierRow]) -> None:
    """The timed steps train the networks; the errors must not depend on how many of them ran."""
    longer = frontier("mlp", depth=DEPTH, width=WIDTH, batch=16, optimizer="adam", device="cpu", repeats=4, progress=False)
    for row in longer:
        assert row.gradient_error == rows[row.method].gradient_error, row.method


def test_a_method_network_measures_its_error_against_its_exact_twin() -> None:
    torch.manual_seed(0)
    builders = frontier_module.methods("mlp", 3, WIDTH, "cpu")
    inputs, targets = torch.randn(8, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    momentum, adjoint = builders["momentum"](), builders["adjoint euler"]()
    for network in (momentum, adjoint):
        network.model.double()
    assert momentum.gradient_error(inputs, targets) < 1e-12, "an invertible network is exact to float64 rounding"
    assert adjoint.gradient_error(inputs, targets) > 1e-3, "the Euler adjoint is not"


def test_the_frontier_leaves_the_callers_random_stream_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    frontier("mlp", depth=2, width=4, batch=4, optimizer="sgd", device="cpu", repeats=1, progress=False)
    assert torch.equal(torch.rand(3), expected)
