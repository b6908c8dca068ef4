r"""PyTorch's own memory tools as modules over the book's blocks, so that the frontier measures them like
revlib's methods (chapter 07).

For a stack :math:`x_{n+1} = F_n(x_n)`, :math:`n = 0, \dots, N-1`, each wrapper computes the same function
and, except where stated, the same gradient as plain backprop; they differ in what the forward pass keeps
for the backward pass and what that pass recomputes:

* :class:`TorchCheckpointed` — ``torch.utils.checkpoint.checkpoint`` (non-reentrant) around every block: it
  keeps each block's input :math:`x_n` and recomputes :math:`F_n`'s internals in the backward pass, like
  revlib's ``"every"`` schedule; with ``segments`` it is ``checkpoint_sequential``, which keeps the inputs
  of the first ``segments − 1`` segments, recomputes each of them whole, and runs the last segment
  without checkpointing (its internals kept);
* :class:`SelectiveCheckpointed` — selective activation checkpointing
  (``create_selective_checkpoint_contexts``): within each block the outputs of the operations a
  *policy* names are kept and the rest is recomputed;
* :class:`Offloaded` — ``torch.autograd.graph.save_on_cpu``: plain backprop, nothing recomputed, every
  tensor it saves waiting in host memory until the backward pass reads it (device memory freed on a GPU,
  nothing changed on a CPU, where the saved tensors already are);
* :class:`BudgetCompiled` — ``torch.compile`` with the min-cut partitioner's activation memory budget
  :math:`b \in [0, 1]`: the partitioner saves, by its own estimate of the sizes, the fraction :math:`b` of
  the way from the least it can save (the graph's inputs) to what it saves at :math:`b = 1`, and recomputes
  the rest in the backward graph;
* :class:`Autocast` — the forward pass under ``torch.autocast`` (bfloat16): saved tensors and arithmetic
  in half the bits, so the gradient differs from float32's by the rounding of bfloat16;
* micro-batching with gradient accumulation is a training step, not a module:
  :func:`revlib.training.training_step` with ``micro_batches``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, checkpoint_sequential, create_selective_checkpoint_contexts

__all__ = ["POLICIES", "Autocast", "BudgetCompiled", "Offloaded", "SelectiveCheckpointed", "TorchCheckpointed",
           "replayed_gradient_error", "selective_policy"]

POLICIES = ("matmuls", "matmuls and norms")

_aten = torch.ops.aten
# the products, and attention under each of its kernels (the CPU's own, flash, memory-efficient, cuDNN)
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.convolution.default,
            _aten._scaled_dot_product_flash_attention_for_cpu.default, _aten._scaled_dot_product_flash_attention.default,
            _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_cudnn_attention.default}
_NORMS = {_aten.native_batch_norm.default, _aten._native_batch_norm_legit.default,
          _aten._native_batch_norm_legit_no_training.default, _aten.native_layer_norm.default,
          _aten.native_group_norm.default}
_KEPT = {"matmuls": frozenset(_MATMULS), "matmuls and norms": frozenset(_MATMULS | _NORMS)}


def _blocks(blocks: tuple[nn.Module, ...]) -> tuple[nn.Module, ...]:
    if not blocks:
        raise ValueError("at least one block is needed")
    for block in blocks:
        if not isinstance(block, nn.Module):
            raise TypeError(f"every block must be an nn.Module, got {type(block).__name__}")
    return blocks


class TorchCheckpointed(nn.Sequential):
    r"""The blocks under ``torch.utils.checkpoint`` (``use_reentrant=False``).

    ``segments=None``: each block :math:`F_n` is checkpointed on its own — the forward pass keeps
    :math:`x_n`, the backward pass recomputes :math:`F_n(x_n)` with its graph: one extra evaluation per
    block, as revlib's ``"every"`` schedule. ``segments=k``: ``checkpoint_sequential`` over :math:`k`
    segments, the first :math:`k - 1` of :math:`\lfloor N/k \rfloor` blocks each and the last of the
    rest; the first :math:`k - 1` are recomputed whole in the backward pass (their internals all alive at
    once while it reverses them) and the last is run without checkpointing, so its internals are kept:
    :math:`1 - 1/k` extra evaluations per block when the segments are equal (:math:`k = \lceil\sqrt N\,\rceil` is the :math:`\sqrt N` split of Chen et al.
    2016). Random state (dropout) is replayed by PyTorch; BatchNorm's running statistics are updated again
    by the recomputation.

    Raises:
        ValueError: no blocks, or ``segments`` not between 1 and the number of blocks.
        TypeError: a block that is not an ``nn.Module``.
    """

    def __init__(self, *blocks: nn.Module, segments: int | None = None) -> None:
        super().__init__(*_blocks(blocks))
        if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int)
                                     or not 1 <= segments <= len(blocks)):
            raise ValueError(f"segments must be None or an integer from 1 to {len(blocks)}, got {segments!r}")
        self.segments = segments

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # nothing to keep: run plainly
            return super().forward(x)
        if self.segments is not None:
            return checkpoint_sequential(list(self), self.segments, x, use_reentrant=False)  # type: ignore[no-any-return]
        for block in self:
            x = checkpoint(block, x, use_reentrant=False)  # keeps x_n, recomputes F_n in the backward pass
        return x


def selective_policy(policy: str) -> Callable[..., CheckpointPolicy]:
    """The policy function of ``create_selective_checkpoint_contexts`` for a policy name.

    ``"matmuls"`` keeps the outputs of matrix products and convolutions (the expensive operations) and
    recomputes everything else (normalisations, activations, additions); ``"matmuls and norms"`` keeps the
    normalisations' outputs too (BatchNorm, LayerNorm, GroupNorm), recomputing only pointwise operations.

    Raises:
        ValueError: an unknown policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    # a module-level function and a name: picklable, so that a wrapped model can run in another process
    # (revlib.measure.peak_memory on the CPU)
    return functools.partial(_decide, policy)


def _decide(policy: str, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT[policy] else CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpointed(nn.Sequential):
    r"""Each block under selective activation checkpointing: ``checkpoint(block, x, use_reentrant=False,
    context_fn=...)`` with :func:`selective_policy`'s policy. The forward pass keeps :math:`x_n` and the
    outputs of the operations the policy names; the backward pass recomputes the others (for ``"matmuls"``
    on a pre-activation residual function: its BatchNorms, ReLUs and the addition; the convolutions are
    not re-run). Gradients are plain backprop's.

    Raises:
        ValueError: no blocks or an unknown policy.
        TypeError: a block that is not an ``nn.Module``.
    """

    def __init__(self, *blocks: nn.Module, policy: str = "matmuls") -> None:
        super().__init__(*_blocks(blocks))
        self.policy = policy
        self._context = functools.partial(create_selective_checkpoint_contexts, selective_policy(policy))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        for block in self:
            x = checkpoint(block, x, use_reentrant=False, context_fn=self._context)
        return x



class Offloaded(nn.Sequential):
    r"""The blocks run in order with ordinary autograd, every tensor autograd saves for the backward pass
    handed to ``torch.autograd.graph.save_on_cpu``, which keeps it in host memory until that pass reads it.
    Nothing is recomputed: the function and the gradients are plain backprop's.

    On a GPU each saved tensor is copied to host memory during the forward pass and back to its device when
    the backward pass needs it: the device holds no saved activations between the two passes, at the cost of
    two copies over the host link (overlapped with computation when the host memory is pinned). On a CPU the
    saved tensors already live in host memory: ``save_on_cpu`` hands back the very tensors autograd would
    keep, so it saves nothing and adds only its hooks' calls (with ``pin_memory=True`` it adds a copy of
    each).

    Args:
        *blocks: the blocks, ``nn.Module`` objects.
        pin_memory: copy into pinned (page-locked) host memory, which lets the copies run asynchronously;
            ``None`` (the default) pins when the input is on a CUDA device.

    Raises:
        ValueError: no blocks.
        TypeError: a block that is not an ``nn.Module``, or ``pin_memory`` not ``None``, ``True`` or ``False``.
    """

    def __init__(self, *blocks: nn.Module, pin_memory: bool | None = None) -> None:
        super().__init__(*_blocks(blocks))
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be None, True or False, got {pin_memory!r}")
        self.pin_memory = pin_memory

    def forward(self, x: Tensor) -> Tensor:
        pin = x.is_cuda if self.pin_memory is None else self.pin_memory
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return super().forward(x)

@functools.cache
def _budget_backend(backend: str, budget: float) -> Callable[..., Any]:
    """One backend object per (backend, budget): Dynamo caches a compiled frame per backend object, so two
    modules with the same budget share it and two budgets never do."""
    from torch._dynamo.backends.registry import lookup_backend

    compile_graph = lookup_backend(backend)

    def compile_with_budget(graph: Any, example_inputs: Any) -> Any:
        # the partitioner reads the budget when it splits the joint graph, inside this call
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_graph(graph, example_inputs)

    return compile_with_budget


class BudgetCompiled(nn.Module):
    r"""``module`` compiled by ``torch.compile`` with the min-cut partitioner's activation memory budget.

    AOTAutograd traces forward and backward into one joint graph and partitions it: the forward graph
    saves some intermediate values, the backward graph recomputes the others from them. With budget
    :math:`b = 1` it saves what minimises recomputation; with :math:`b < 1` it chooses, among the
    recomputable values, a set to save (at the least estimated recomputation, a knapsack) whose estimated
    bytes lie the fraction :math:`b` of the way from the least it can save, the graph's inputs, to the
    :math:`b = 1` plan's; :math:`b = 0` recomputes all it may. Below
    :math:`b = 1` it may recompute random operations, and on the CPU the recomputation draws new random
    numbers: dropout then gets new masks in the backward graph (:func:`replayed_gradient_error` detects it;
    chapter 07 measures it). The budget governs what is *saved*; the peak also depends on when the
    backward graph recomputes, which it does in one graph rather than block by block.

    ``backend`` is a registered ``torch.compile`` backend that uses AOTAutograd's partitioner:
    ``"aot_eager_decomp_partition"`` (the default) runs the partitioned graphs with eager kernels and needs
    no C++ compiler; ``"inductor"`` generates code (and needs one on the CPU). The module keeps its own
    parameters (``self.module``), so an uncompiled twin can share them.

    Raises:
        ValueError: a budget outside [0, 1].
        TypeError: ``module`` is not an ``nn.Module``.
    """

    def __init__(self, module: nn.Module, budget: float, backend: str = "aot_eager_decomp_partition") -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1 or math.isnan(budget):
            raise ValueError(f"budget must be a number in [0, 1], got {budget!r}")
        self.module = module
        self.budget = float(budget)
        self.backend = backend
        self._compiled = torch.compile(module, backend=_budget_backend(backend, self.budget))

    def forward(self, x: Tensor) -> Tensor:
        with warnings.catch_warnings():
            # a memory profiler's global module hooks fire once more for the compiled wrapper: harmless here
            warnings.filterwarnings("ignore", message="Using `torch.compile\\(module\\)` when there are global hooks")
            with torch._dynamo.config.patch(recompile_limit=64):  # one compiled frame per budget
                return self._compiled(x)  # type: ignore[no-any-return]


class Autocast(nn.Module):
    r"""``module`` under ``torch.autocast`` in ``dtype`` (bfloat16 by default), its output cast back to
    float32: matrix products and convolutions run on bfloat16 copies of their inputs and weights and keep
    those copies for the backward pass. bfloat16 has an 8-bit significand, a unit roundoff of
    :math:`2^{-8} \approx 4\cdot10^{-3}`, so the gradient differs from float32's by about that relative
    amount, not by float32's :math:`6\cdot10^{-8}`. The parameters and their gradients stay float32.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``dtype`` is not bfloat16 or float16.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        self.module = module
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.module(x).float()  # type: ignore[no-any-return]


def replayed_gradient_error(model: nn.Module, inputs: Tensor, *, seed: int = 0, step: float = 1e-6) -> float:
    r"""How far ``model``'s gradient is from the derivative of the function its forward pass computed, when
    that function is random (dropout): :math:`|g \cdot v - D_v| / |D_v|`, with :math:`g` the parameter gradient
    of :math:`L = \sum_i y_i^2` from one forward and backward pass, :math:`v` a random direction, and the
    central difference :math:`D_v = (L(\theta + \epsilon v) - L(\theta - \epsilon v)) / 2\epsilon`, each pass
    started from ``torch.manual_seed(seed)`` so that every forward pass draws the same random numbers (the
    same dropout masks). A backward pass that redraws them (a recomputation that does not replay the random
    state) gives an error of order one; one that replays them gives the difference's truncation and
    rounding (about :math:`10^{-9}` in float64 with the default ``step``). Meant for float64 models; the
    caller's random stream is left alone.

    Raises:
        ValueError: ``step`` not positive, or a model without parameters.
    """
    if not step > 0:
        raise ValueError(f"step must be positive, got {step!r}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no parameters to differentiate")
    with torch.random.fork_rng(devices=[]):
        generator = torch.Generator().manual_seed(seed + 1)
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in parameters]

        def loss() -> Tensor:
            torch.manual_seed(seed)  # the same random numbers in every forward pass
            return model(inputs).pow(2).sum()

        gradients = torch.autograd.grad(loss(), parameters)
        along = float(sum((g * v).sum() for g, v in zip(gradients, direction)))
        values = []
        original = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            for sign in (1.0, -1.0):  # L(θ + εv), L(θ − εv)
                for p, v in zip(parameters, direction):
                    p.add_(v, alpha=sign * step)
                values.append(float(loss()))
                for p, kept in zip(parameters, original):
                    p.copy_(kept)  # back to θ, bit for bit
    difference = (values[0] - values[1]) / (2 * step)
    return abs(along - difference) / max(abs(difference), torch.finfo(torch.float64).tiny)
