"""torch.compile: models built from revlib's memory-saving sequences compile and give eager gradients.

The test uses the ``aot_eager`` backend (TorchDynamo's tracing and AOTAutograd, without generating kernels),
which keeps it to seconds on a CPU; the default ``inductor`` backend was checked the same way by hand
(``benchmarks/README.md``). Where TorchDynamo breaks the graph is asserted too, so that a change is noticed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from revlib.adjoint import ODEResNet, tanh_residuals
from revlib.checkpoint import CheckpointedSequence
from revlib.reversible import RevNet
from revlib.verify import relative_error

every_block = functools.partial(CheckpointedSequence, schedule="every")

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "RevNet, reversible": (lambda: RevNet((8, 16), 2, device="cpu", dtype=torch.float64), (4, 1, 8, 8)),
    "RevNet, checkpointed": (lambda: RevNet((8, 16), 2, stage=every_block, device="cpu", dtype=torch.float64), (4, 1, 8, 8)),
    "ODEResNet, Euler adjoint": (lambda: ODEResNet(*tanh_residuals(4, 6), dtype=torch.float64), (4, 6)),
    "ODEResNet, Heun adjoint": (lambda: ODEResNet(*tanh_residuals(4, 6), scheme="heun", dtype=torch.float64), (4, 6)),
}


def parameter_gradients(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    run(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_gives_the_eager_gradients(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape, dtype=torch.float64)
    eager = parameter_gradients(model, model, x)
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    assert relative_error(parameter_gradients(model, compiled, x), eager) < 1e-12
    assert relative_error(parameter_gradients(model, compiled, x), eager) < 1e-12, "a second step reuses the compiled graphs"


def test_where_the_graph_breaks() -> None:
    """The adjoint's autograd.Function is traced whole; the reversible sequence's runs eagerly between graphs
    (one break before and one after each reversible stage), its f and g compiled inside it."""
    torch.manual_seed(0)
    dynamo.reset()
    adjoint = dynamo.explain(ODEResNet(*tanh_residuals(4, 6)))(torch.randn(4, 6))
    assert adjoint.graph_break_count == 0
    dynamo.reset()
    revnet = dynamo.explain(RevNet((8, 16), 2, device="cpu"))(torch.randn(4, 1, 8, 8))
    assert revnet.graph_break_count > 0, "the reversible sequence is not traced into one graph"
