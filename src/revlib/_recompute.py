"""Replaying part of a forward pass in the backward pass: the one mechanism every recomputing Function shares.

A backward pass that recomputes (reversible blocks, adjoint steps, checkpointed segments) must run each
piece of the network again *as it ran the first time*: the same dropout masks, the same autocast precisions,
and without updating BatchNorm's running statistics a second time. :class:`ForwardState` records what that
takes while the piece runs forward, and :meth:`ForwardState.replayed` and :meth:`ForwardState.buffers_restored` restore it around
the recomputation, in the manner of ``torch.utils.checkpoint``:

* the CPU random state, and a CUDA device's only if that device's generator had already been initialised,
  restored inside ``torch.random.fork_rng`` so that the caller's random stream is untouched;
* the autocast state of the device type (enabled or not, and the dtype), re-entered;
* the buffers that the piece updated in forward — detected per module by their version counters (BatchNorm
  in training mode counts its batches in place) — copied before the recomputation and put back after it.
  Constant buffers are not copied. A module that overwrote a buffer without bumping its version counter
  would not be detected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class ForwardState:
    """What recomputing one piece of a forward pass must reproduce (a few KiB: no activations)."""

    device: torch.device
    cpu_rng: Tensor | None
    cuda_rng: Tensor | None
    autocast_enabled: bool
    autocast_dtype: torch.dtype
    updated_buffers: list[Tensor] = field(default_factory=list)  # references to the module's own buffers

    @classmethod
    def capture(cls, device: torch.device, preserve_rng: bool, previous: ForwardState | None = None) -> ForwardState:
        """The random and autocast state now, just before the piece runs on ``device``.

        ``previous`` is the state captured before the piece that ran last. Where the random state has not
        moved since (that piece drew no random numbers), the new state shares ``previous``'s tensors instead
        of keeping a copy: a network without dropout keeps one generator state (about 5 KiB on the CPU), not
        one per piece, and its memory stays flat in depth.
        """
        kind = device.type
        cpu_rng = torch.get_rng_state() if preserve_rng else None
        # like torch.utils.checkpoint: only a device whose generator was already used has a state worth keeping
        cuda_rng = torch.cuda.get_rng_state(device) if preserve_rng and kind == "cuda" and torch.cuda.is_initialized() else None
        if previous is not None:
            cpu_rng, cuda_rng = _shared(previous.cpu_rng, cpu_rng), _shared(previous.cuda_rng, cuda_rng)
        return cls(
            device=device,
            cpu_rng=cpu_rng,
            cuda_rng=cuda_rng,
            autocast_enabled=torch.is_autocast_enabled(kind),
            autocast_dtype=torch.get_autocast_dtype(kind),
        )

    @contextmanager
    def recording(self, module: nn.Module) -> Iterator[None]:
        """Run the piece's forward inside this block: notes which of ``module``'s submodules update buffers."""
        versions = [(child, [buffer._version for buffer in child.buffers(recurse=False)]) for child in module.modules()]
        yield
        for child, before in versions:
            if [buffer._version for buffer in child.buffers(recurse=False)] != before:
                self.updated_buffers.extend(child.buffers(recurse=False))

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Recompute the piece inside this block: the random state and autocast state of its first run.

        The grad mode is the caller's to choose (``torch.enable_grad()`` to build the piece's graph).
        """
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, enabled=self.cpu_rng is not None):
            if self.cpu_rng is not None:
                torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_enabled):
                yield

    @contextmanager
    def buffers_restored(self) -> Iterator[None]:
        """Put back, on leaving, the buffers the piece updated in its first run (BatchNorm's statistics).

        Wrap the recomputation *and* the backward pass through it: autograd saves the running statistics
        with BatchNorm's graph, and writing them back before that graph is used would fail its version check.
        """
        saved = [buffer.clone() for buffer in self.updated_buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(self.updated_buffers, saved):
                    buffer.copy_(value)


def _shared(kept: Tensor | None, now: Tensor | None) -> Tensor | None:
    """``kept`` when it equals ``now`` (one tensor for both), else ``now``."""
    return kept if kept is not None and now is not None and torch.equal(kept, now) else now


def distinct_parameters(modules: Sequence[nn.Module]) -> list[Tensor]:
    """The parameters of ``modules`` in the order ``nn.Module.parameters()`` gives them, each once."""
    return list(dict.fromkeys(p for module in modules for p in module.parameters()))


def check_parameters_unchanged(saved: tuple[Tensor, ...], current: list[Tensor], owner: str) -> None:
    """Raise a clear error when the parameters a backward pass finds are not the ones its forward pass used.

    ``saved`` come from ``ctx.saved_tensors`` (so autograd has already refused any that were modified in
    place); ``current`` are the modules' parameters now, in the same order.

    Raises:
        RuntimeError: a parameter was replaced, added or removed between forward and backward.
    """
    if len(saved) != len(current) or any(a is not b for a, b in zip(saved, current)):
        raise RuntimeError(
            f"the parameters of the {owner} changed between its forward and backward pass (a parameter was "
            "replaced, added or removed). The backward pass recomputes the forward one with the modules' "
            "parameters, so they must stay the same objects until backward has run: replace parameters "
            "(load_state_dict(..., assign=True), torch.func.functional_call, re-registering) only after it."
        )


def vector_jacobian_products(output: Tensor, point: Tensor, parameters: list[Tensor], grad_output: Tensor) -> tuple[Tensor, list[tuple[int, Tensor]]]:
    """Vector-Jacobian products of ``output`` with respect to ``point`` and to the parameters that require grad.

    Returns the gradient of ``point`` (zeros when ``output`` does not depend on it) and ``(id, gradient)``
    pairs for the parameters that received one.
    """
    wanted = [p for p in parameters if p.requires_grad]
    if not output.requires_grad:
        return torch.zeros_like(point), []
    found = torch.autograd.grad(output, [point, *wanted], grad_output.to(output.dtype), allow_unused=True)
    point_gradient = torch.zeros_like(point) if found[0] is None else found[0].to(point.dtype)
    return point_gradient, [(id(p), g) for p, g in zip(wanted, found[1:]) if g is not None]
