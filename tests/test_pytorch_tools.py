"""PyTorch's memory tools as revlib modules: same function, the gradient of plain backprop where they should
give it, bounded differences where they should not, and the frontier's rows for them."""

import collections
import math
import pickle

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from allocations import added_peak
from revlib.blocks import ResidualBlock
from revlib.frontier import format_ratios, frontier, methods, residual_function
from revlib.measure import saved_tensor_bytes, step_memory
from revlib.pytorch_tools import (
    POLICIES,
    Autocast,
    BudgetCompiled,
    Offloaded,
    SelectiveCheckpointed,
    TorchCheckpointed,
    replayed_gradient_error,
    selective_policy,
)
from revlib.training import make_optimizer, training_step
from revlib.verify import relative_error


def blocks(family: str, depth: int = 3, width: int = 4) -> list[nn.Module]:
    return [ResidualBlock(residual_function(family, width)).double() for _ in range(depth)]


def gradients(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(inputs).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def inputs_for(family: str, width: int = 4) -> torch.Tensor:
    shape = {"mlp": (6, width), "conv": (6, width, 5, 5), "transformer": (6, 5, width)}[family]
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["mlp", "conv", "transformer"])
@pytest.mark.parametrize("wrap", [
    lambda b: TorchCheckpointed(*b),
    lambda b: TorchCheckpointed(*b, segments=2),
    lambda b: SelectiveCheckpointed(*b, policy="matmuls"),
    lambda b: SelectiveCheckpointed(*b, policy="matmuls and norms"),
    lambda b: Offloaded(*b),
    lambda b: Offloaded(*b, pin_memory=True),
], ids=["every", "sequential", "sac-matmuls", "sac-norms", "offload", "offload-pinned"])
def test_checkpointing_gives_backprops_gradient_in_float64(family: str, wrap) -> None:
    torch.manual_seed(0)
    stack = blocks(family)
    x = inputs_for(family)
    plain = nn.Sequential(*stack)
    expected = gradients(plain, x)
    wrapped = wrap(stack)
    assert torch.equal(wrapped(x), plain(x))
    assert relative_error(gradients(wrapped, x), expected) < 1e-13


def input_and_parameter_gradients(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    inputs = inputs.detach().clone().requires_grad_(True)
    model(inputs).pow(2).sum().backward()
    return [inputs.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("wrap", [
    lambda b: TorchCheckpointed(*b, segments=math.ceil(math.sqrt(len(b)))),
    lambda b: SelectiveCheckpointed(*b, policy="matmuls"),
    lambda b: Offloaded(*b),
], ids=["sqrt-segments", "sac-matmuls", "offload"])
def test_benchmark_wrappers_give_backprops_input_and_parameter_gradients(wrap) -> None:
    """The rows of benchmarks/checkpoint.py (torch-sqrt, torch-sac, offload) on six blocks: the gradient
    with respect to the input too, and the same function with and without gradients."""
    torch.manual_seed(0)
    stack = blocks("conv", depth=6)
    x = inputs_for("conv")
    plain = nn.Sequential(*stack)
    wrapped = wrap(stack)
    assert relative_error(input_and_parameter_gradients(wrapped, x), input_and_parameter_gradients(plain, x)) < 1e-13
    with torch.no_grad():
        assert torch.equal(wrapped(x), plain(x))


def test_wrappers_survive_pickling() -> None:
    """revlib.measure.peak_memory runs a model in a fresh process on the CPU (the checkpointing benchmark's
    peak column): the wrapped model must pickle, policy included, and compute the same after."""
    torch.manual_seed(0)
    stack = blocks("mlp")
    x = inputs_for("mlp")
    for model in (TorchCheckpointed(*stack, segments=2), SelectiveCheckpointed(*stack, policy="matmuls and norms"),
                  Offloaded(*stack, pin_memory=False)):
        copy = pickle.loads(pickle.dumps(model))
        assert torch.equal(copy(x), model(x)), type(model).__name__
        assert relative_error(gradients(copy, x), gradients(model, x)) == 0, type(model).__name__


def test_sqrt_segments_save_less_than_plain_backprop() -> None:
    """Three segments of two blocks (⌈√6⌉): the first two keep only their inputs, the last its blocks'
    internals, as plain backprop keeps them; every-block checkpointing keeps the six inputs."""
    torch.manual_seed(0)
    stack = blocks("mlp", depth=6, width=8)
    x = inputs_for("mlp", 8)
    plain, segmented, every = (nn.Sequential(*stack), TorchCheckpointed(*stack, segments=3),
                               TorchCheckpointed(*stack))
    saved = {name: saved_tensor_bytes(model, x, exclude=model.parameters())
             for name, model in (("plain", plain), ("sqrt", segmented), ("every", every))}
    block_input = x.numel() * x.element_size()
    assert saved["every"] == 6 * block_input, saved
    assert saved["sqrt"] == 2 * block_input + saved["plain"] * 2 // 6 < saved["plain"], saved


def test_offloading_on_the_cpu_keeps_the_tensors_autograd_would_keep() -> None:
    """On a CPU save_on_cpu hands back the saved tensors themselves: a step holds exactly what plain
    backprop's does. Negative control: with ``pin_memory=True`` it copies each saved tensor, which the
    measurement sees."""
    torch.manual_seed(0)
    stack = [nn.Sequential(nn.Linear(64, 64), nn.Tanh()).requires_grad_(False) for _ in range(4)]
    x = torch.randn(32, 64, requires_grad=True)
    peaks = {name: added_peak(lambda model=model: model(x).sum().backward())
             for name, model in (("plain", nn.Sequential(*stack)), ("offload", Offloaded(*stack)),
                                 ("copies", Offloaded(*stack, pin_memory=True)))}
    assert peaks["offload"] == peaks["plain"] < peaks["copies"], peaks


@pytest.mark.cuda
def test_offloading_on_cuda_holds_no_saved_activations_on_the_device() -> None:
    """Between the forward and backward passes the device holds the output, not the saved activations;
    the gradients are backprop's."""
    torch.manual_seed(0)
    stack = [nn.Sequential(nn.Linear(256, 256), nn.Tanh()).cuda() for _ in range(4)]
    x = torch.randn(512, 256, device="cuda")
    held, grads = {}, {}
    for name, model in (("plain", nn.Sequential(*stack)), ("offload", Offloaded(*stack))):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        output = model(x)
        held[name] = torch.cuda.memory_allocated() - before
        grads[name] = input_and_parameter_gradients(model, x)
        del output
    output_bytes = x.numel() * x.element_size()
    assert held["plain"] >= 4 * output_bytes and held["offload"] <= output_bytes, held
    assert relative_error(grads["offload"], grads["plain"]) < 1e-6


def test_selective_checkpointing_on_a_transformer_block() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    expected = gradients(nn.Sequential(layer), x)
    for policy in POLICIES:
        assert relative_error(gradients(SelectiveCheckpointed(layer, policy=policy), x), expected) < 1e-13, policy


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators that run while it is active (the backward pass's included)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_attention_on_the_cpu() -> None:
    """On the CPU attention is one operator of its own; "matmuls" keeps its output, so a step runs it once per
    block, where per-block checkpointing runs it again in the backward pass (the control: twice)."""
    torch.manual_seed(0)
    stack = [ResidualBlock(residual_function("transformer", 16)) for _ in range(2)]
    x = torch.randn(4, 6, 16)
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    for model, calls in ((SelectiveCheckpointed(*stack, policy="matmuls"), 2), (TorchCheckpointed(*stack), 4)):
        with OperatorCounter() as counter:
            model(x).sum().backward()
        assert counter.counts[attention] == calls, (type(model).__name__, counter.counts[attention])


def test_checkpointing_keeps_less_and_selective_keeps_the_products() -> None:
    """Activations of a training step (memory profiler): per-block checkpointing keeps the block inputs;
    SAC keeps the convolutions' outputs too, so it lies between it and plain backprop; a wrapper that kept
    everything (or nothing extra) would fail one side."""
    torch.manual_seed(0)
    stack = [ResidualBlock(residual_function("conv", 8)) for _ in range(4)]
    x, targets = torch.randn(16, 8, 8, 8), torch.randint(0, 8, (16, 8, 8))
    kept = {name: step_memory(model, x, targets, "sgd").activations
            for name, model in (("plain", nn.Sequential(*stack)), ("every", TorchCheckpointed(*stack)),
                                ("sac", SelectiveCheckpointed(*stack, policy="matmuls")))}
    assert kept["every"] < kept["sac"] < kept["plain"], kept


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_the_norms_policy_keeps_either_normalisations_outputs(norm: str) -> None:
    """Activations of a training step over four conv blocks (memory profiler): keeping the normalisations'
    outputs as well keeps two more block-sized tensors per block (the two norms' outputs, and their
    statistics, a few hundred bytes), with BatchNorm and with GroupNorm alike; a policy that did not
    recognise GroupNorm would keep none."""
    torch.manual_seed(0)
    stack = [ResidualBlock(residual_function("conv", 8, norm=norm)) for _ in range(4)]
    x, targets = torch.randn(16, 8, 8, 8), torch.randint(0, 8, (16, 8, 8))
    kept = {policy: step_memory(SelectiveCheckpointed(*stack, policy=policy), x, targets, "sgd").activations
            for policy in POLICIES}
    more = (kept["matmuls and norms"] - kept["matmuls"]) / (x.numel() * x.element_size())
    assert 8 <= more < 8.5, f"{more:.2f} block-sized tensors more"


def test_torch_checkpoint_updates_batchnorm_statistics_twice() -> None:
    """The recomputation runs BatchNorm in training mode again (revlib's sequences restore it)."""
    norm = nn.BatchNorm1d(4)
    TorchCheckpointed(nn.Sequential(norm, nn.Linear(4, 4)))(torch.randn(8, 4)).sum().backward()
    assert int(norm.num_batches_tracked) == 2


def test_selective_policy_names() -> None:
    assert selective_policy("matmuls")(None, torch.ops.aten.mm.default).name == "MUST_SAVE"
    assert selective_policy("matmuls")(None, torch.ops.aten.native_batch_norm.default).name == "PREFER_RECOMPUTE"
    assert selective_policy("matmuls and norms")(None, torch.ops.aten.native_batch_norm.default).name == "MUST_SAVE"
    assert selective_policy("matmuls")(None, torch.ops.aten.relu.default).name == "PREFER_RECOMPUTE"
    aten = torch.ops.aten
    for product in (aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
        assert selective_policy("matmuls")(None, product).name == "MUST_SAVE", product


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.0])
def test_compiled_conv_blocks_give_backprops_gradient_in_float64(budget: float) -> None:
    """BatchNorm and convolutions as the frontier's conv family has them: the partitioned graphs compute
    plain backprop's gradient, so a float32 difference is rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(*blocks("conv", depth=3, width=4))
    x = inputs_for("conv")
    assert relative_error(gradients(BudgetCompiled(model, budget), x), gradients(model, x)) < 1e-12


@pytest.mark.parametrize("budget", [1.0, 0.0])
def test_compiled_model_gives_backprops_gradient_and_saves_less_under_a_small_budget(budget: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*blocks("mlp", depth=3, width=8))
    x = inputs_for("mlp", 8)
    compiled = BudgetCompiled(model, budget)
    assert relative_error(gradients(compiled, x), gradients(model, x)) < 1e-12
    saved = saved_tensor_bytes(lambda: compiled(x).sum(), exclude=model.parameters())
    plain = saved_tensor_bytes(lambda: model(x).sum(), exclude=model.parameters())
    if budget == 0:
        assert saved <= x.numel() * 8, "budget 0 keeps only the input"
    else:
        assert saved > 4 * x.numel() * 8 and plain > 4 * x.numel() * 8


def dropout_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 32), nn.Tanh(), nn.Dropout(0.5),
                         nn.Linear(32, 4)).double()


def test_replayed_gradient_error_separates_replayed_from_redrawn_masks() -> None:
    model = dropout_network()
    x = torch.randn(16, 8, dtype=torch.float64)
    assert replayed_gradient_error(model, x) < 1e-7, "eager dropout keeps its mask"
    assert replayed_gradient_error(TorchCheckpointed(*model), x) < 1e-7, "checkpoint replays the random state"

    class Redraw(nn.Module):  # negative control: a recomputation that does not replay the random state
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(self.inner, inputs, use_reentrant=False, preserve_rng_state=False)

    assert replayed_gradient_error(Redraw(), x) > 0.1, "a fresh mask in the backward pass"
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    replayed_gradient_error(model, x)
    assert torch.equal(torch.rand(2), expected), "the caller's random stream is left alone"


def test_dropout_survives_budget_one_but_not_budget_zero() -> None:
    """At budget 0 the partitioner recomputes the dropout in the backward graph from a fresh draw (no RNG
    replay on the CPU): its gradient is not the derivative of the function the forward pass computed. (At
    intermediate budgets it depends on the graph: chapter 07's network redraws at 0.5 too.)"""
    model = dropout_network()
    x = torch.randn(16, 8, dtype=torch.float64)
    assert replayed_gradient_error(BudgetCompiled(model, 1.0), x) < 1e-7
    assert replayed_gradient_error(BudgetCompiled(model, 0.0), x) > 0.1


def test_autocast_gradient_differs_by_bfloat16_rounding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(32, 64)
    reference = gradients(model, x)
    mixed = gradients(Autocast(model), x)
    assert all(g.dtype == torch.float32 for g in mixed)
    error = relative_error(mixed, reference)
    assert 1e-4 < error < 5e-2, f"bfloat16's unit roundoff is 4e-3; float32 would give 1e-7 (got {error:.1e})"


def test_micro_batches_accumulate_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 3, (10,))
    grads = {}
    for parts in (1, 3):
        optimizer = make_optimizer("sgd", model.parameters(), learning_rate=0.0)
        training_step(model, x, y, optimizer, micro_batches=parts)
        grads[parts] = [p.grad.clone() for p in model.parameters()]
    assert relative_error(grads[3], grads[1]) < 1e-14, "unequal parts weighted by their sizes"
    with pytest.raises(ValueError, match="micro_batches must be an integer from 1 to the batch size 10"):
        training_step(model, x, y, make_optimizer("sgd", model.parameters()), micro_batches=11)


def test_micro_batches_change_a_batchnorm_networks_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    grads = {}
    for parts in (1, 4):
        training_step(model, x, y, make_optimizer("sgd", model.parameters(), learning_rate=0.0), micro_batches=parts)
        grads[parts] = [p.grad.clone() for p in model.parameters()]
    assert relative_error(grads[4], grads[1]) > 1e-2, "each part is normalised by its own statistics"


@pytest.mark.parametrize(("norm", "exact"), [("group", True), ("batch", False)])
def test_micro_batching_the_conv_network_is_exact_only_with_group_norm(norm: str, exact: bool) -> None:
    """The frontier's conv network with either normalisation, in float64: GroupNorm normalises each example
    on its own, so four parts give the whole batch's gradient to rounding; BatchNorm normalises each part
    by its own statistics, so they do not."""
    torch.manual_seed(0)
    network = methods("conv", 3, 8, "cpu", pytorch=True, norm=norm)["micro-batch 4"]()
    network.model.double()
    images, labels = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    error = network.gradient_error(images, labels)
    assert (error < 1e-12) if exact else (error > 1e-2), f"{norm}: {error:.1e}"


@pytest.mark.parametrize(("build", "error", "match"), [
    (lambda: TorchCheckpointed(), ValueError, "at least one block"),
    (lambda: TorchCheckpointed(nn.Linear(2, 2), segments=3), ValueError, "segments must be None or an integer from 1 to 1"),
    (lambda: TorchCheckpointed("block"), TypeError, "every block must be an nn.Module"),
    (lambda: SelectiveCheckpointed(nn.Linear(2, 2), policy="all"), ValueError, "policy must be one of"),
    (lambda: Offloaded(), ValueError, "at least one block"),
    (lambda: Offloaded(nn.Linear(2, 2), torch.tanh), TypeError, "every block must be an nn.Module, got builtin"),
    (lambda: Offloaded(nn.Linear(2, 2), pin_memory="yes"), TypeError, "pin_memory must be None, True or False, got 'yes'"),
    (lambda: BudgetCompiled(nn.Linear(2, 2), 1.5), ValueError, r"budget must be a number in \[0, 1\]"),
    (lambda: BudgetCompiled(lambda x: x, 0.5), TypeError, "module must be an nn.Module"),
    (lambda: Autocast(nn.Linear(2, 2), torch.float64), ValueError, "dtype must be"),
    (lambda: replayed_gradient_error(nn.ReLU(), torch.zeros(2)), ValueError, "no parameters"),
])
def test_bad_arguments_are_refused(build, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


@pytest.fixture(scope="module")
def rows() -> dict:
    found = frontier("mlp", depth=4, width=8, batch=16, device="cpu", repeats=1, progress=False, pytorch=True, budgets=(1.0, 0.0))
    return {row.method: row for row in found}


def test_the_frontier_has_pytorchs_rows_on_equal_networks(rows: dict) -> None:
    assert {"torch every", "torch sequential", "SAC matmuls", "SAC matmul+norm", "bf16 autocast", "micro-batch 4",
            "compile 1", "compile 0"} <= set(rows)
    assert len({row.memory.parameters for name, row in rows.items() if name != "reversible"}) == 1
    for name in ("torch every", "torch sequential", "SAC matmuls", "SAC matmul+norm", "compile 1", "compile 0", "micro-batch 4"):
        assert rows[name].gradient_error < 1e-5, name
    assert 1e-4 < rows["bf16 autocast"].gradient_error < 0.1


def test_the_frontier_counts_pytorchs_recomputations(rows: dict) -> None:
    assert rows["torch every"].recomputations == 1
    assert rows["torch sequential"].recomputations == 0.5, "two segments of two blocks: the first recomputed"
    assert rows["SAC matmuls"].recomputations == 1, "every block's forward begins again (its products replayed)"
    assert rows["micro-batch 4"].recomputations == 0
    assert math.isnan(rows["compile 0"].recomputations)


def test_format_ratios(rows: dict) -> None:
    table = format_ratios(list(rows.values())).splitlines()
    assert len(table) == len(rows) + 1 and table[1].split()[-4] == "1.00"
    with pytest.raises(ValueError, match="reference must name one of the rows"):
        format_ratios(list(rows.values()), reference="none")


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match=r"every budget must be a number in \[0, 1\]"):
        frontier("mlp", depth=2, width=4, batch=4, budgets=(2.0,))
