"""Replaying part of a forward pass in the backward pass: the one mechanism every recomputing Function shares.

A backward pass that recomputes (reversible blocks, momentum blocks, adjoint steps, checkpointed segments)
must run each piece of the network again *as it ran the first time*: the same dropout masks, the same
autocast precisions, and without updating BatchNorm's running statistics a second time. :class:`ForwardState`
records what that takes while the piece runs forward, and :meth:`ForwardState.replayed` and
:meth:`ForwardState.buffers_restored` restore it around the recomputation (:meth:`ForwardState.pull_back`
recomputes a piece inside both and back-propagates through it), in the manner of ``torch.utils.checkpoint``:

* the CPU random state, and the accelerator's (CUDA, MPS, XPU, … through ``torch.get_device_module``) only
  if that device's generator had already been initialised, restored inside ``torch.random.fork_rng`` so
  that the caller's random stream is untouched; a piece that drew no random numbers keeps no state and
  replays none;
* the autocast state of the device type (enabled or not, and the dtype), re-entered;
* the buffers that the piece updated in forward — detected per module by their version counters (BatchNorm
  in training mode counts its batches in place) — copied before the recomputation and put back after it.
  Constant buffers are not copied. A module that overwrote a buffer without bumping its version counter
  would not be detected.

The rest is the plumbing the four sequences share: :class:`BlockSequence` (how they hold their blocks),
:func:`needs_graph` (does this call need a backward pass at all?), :func:`run_checked` (a block run with its
shape and in-place checks), :class:`Stash` (block inputs kept for backward that can be released before the
backward pass ends), :class:`ModuleTree` and :func:`check_parameters_unchanged` (is the piece recomputed the
piece that ran?), :func:`vector_jacobian_products` and :func:`accumulate` (parameter gradients summed by
parameter), and :func:`module_parameters` (``parameters()`` at half the cost).

All of it runs once per piece in every pass, so it is written for a small fixed cost: a network of small
blocks spends as long in this bookkeeping as in its arithmetic (``benchmarks/reversible.py`` compares the
reversible sequence with MemCNN and RevTorch on the same blocks).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from torch.autograd.variable import Variable


def _accelerator_module(device: torch.device) -> ModuleType | None:
    """``torch.cuda``, ``torch.mps``, … for an accelerator; ``None`` for the CPU (whose state is always kept)."""
    if device.type in ("cpu", "meta"):
        return None
    return torch.get_device_module(device.type)


def _generator_initialised(module: ModuleType) -> bool:
    """Whether the accelerator's generator has been used (CUDA and XPU say; others are always ready)."""
    is_initialized = getattr(module, "is_initialized", None)
    return True if is_initialized is None else bool(is_initialized())


class ModuleTree:
    """A module's submodules and parameters as one walk found them (``modules()`` and ``parameters()``, each once,
    in ``nn.Module``'s order, at a third of their cost: no generators or name prefixes), and whether a walk now
    would find the same. A recomputing sequence walks every piece in every forward pass, and checks in the
    backward pass that the piece it recomputes is the one that ran; :meth:`unchanged` answers in one look at
    each module's members, without walking again.

    Attributes:
        root: the module walked.
        modules: ``list(root.modules())`` at the time of the walk.
        parameters: ``list(root.parameters())`` at the time of the walk.
    """

    __slots__ = ("root", "modules", "parameters", "_members")

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        found = _walk(root)
        if found is None:  # a class that walks its own way: ask it
            self.modules, self.parameters = list(root.modules()), list(root.parameters())
            self._members: list[Any] | None = None
            return
        self.modules = found
        self._members = _members(found)
        self.parameters = _parameters_of(found)

    def unchanged(self) -> bool:
        """Whether a walk of :attr:`root` now would find the same submodules and parameters: none was replaced,
        added or removed since (a new buffer does not count)."""
        if self._members is None:
            return _same_objects(list(self.root.modules()), self.modules) and _same_objects(list(self.root.parameters()), self.parameters)
        return _same_objects(_members(self.modules), self._members)


_END = object()  # closes one module's submodules, and its parameters, in :func:`_members`


def _members(modules: list[nn.Module]) -> list[Any]:
    """Each module's submodules, then its parameters (``_modules``' and ``_parameters``' values, ``None`` included),
    in one list: the walk from the first module reaches the same modules and parameters exactly when this list
    holds the same objects."""
    members: list[Any] = []
    for module in modules:
        members += module._modules.values()
        members.append(_END)
        members += module._parameters.values()
        members.append(_END)
    return members


def _same_objects(a: Collection[Any], b: Collection[Any]) -> bool:
    """Whether ``a`` and ``b`` hold the same objects in the same order (identity, never ``==``: tensors)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


class ForwardState:
    """What recomputing one piece of a forward pass must reproduce (a few KiB: no activations).

    Attributes:
        device: where the piece ran.
        cpu_rng: the CPU generator's state before it ran (``None``: nothing to replay, because the piece drew no
            random numbers or ``preserve_rng`` was off).
        device_rng: the accelerator's generator state, when there is an accelerator whose generator was used.
        autocast_enabled: whether autocast was on for the device type.
        autocast_dtype: autocast's dtype for the device type.
        updated_buffers: the buffers the piece updated (references to the modules' own), set by :meth:`recording`.
        parameters: the piece's parameters when it ran (references, set by :meth:`recording`): its
            recomputation must use the same.
        tree: the piece's module as :meth:`recording` walked it (``None`` before).
    """

    # a plain class with slots: one is made per piece in every forward pass
    __slots__ = ("device", "cpu_rng", "device_rng", "autocast_enabled", "autocast_dtype", "updated_buffers", "parameters", "tree")

    def __init__(self, device: torch.device, cpu_rng: Tensor | None, device_rng: Tensor | None, autocast_enabled: bool, autocast_dtype: torch.dtype) -> None:
        self.device, self.cpu_rng, self.device_rng = device, cpu_rng, device_rng
        self.autocast_enabled, self.autocast_dtype = autocast_enabled, autocast_dtype
        self.updated_buffers: list[Tensor] = []
        self.parameters: list[Tensor] = []
        self.tree: ModuleTree | None = None

    @classmethod
    def capture(cls, device: torch.device, preserve_rng: bool, previous: ForwardState | None = None) -> ForwardState:
        """The random and autocast state now, just before the piece runs on ``device``.

        ``previous`` is the state captured before the piece that ran last, in the same forward pass. Where the
        random state has not moved since, that piece drew no random numbers: ``previous`` forgets its random
        state, and the piece's recomputation replays none. So a network without dropout keeps no generator
        state (about 5 KiB each on the CPU) and sets none in its backward pass, and its memory stays flat in
        depth. Call :meth:`finish` on the state of the pass's last piece, which no capture follows. The
        autocast state is ``previous``'s: nothing between two pieces of one forward pass changes it.
        """
        cpu_rng, device_rng = _random_state(device) if preserve_rng else (None, None)
        if previous is None:
            kind = device.type
            return cls(device, cpu_rng, device_rng, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        if preserve_rng:
            previous._forget_if_unmoved(cpu_rng, device_rng)
        return cls(device, cpu_rng, device_rng, previous.autocast_enabled, previous.autocast_dtype)

    def finish(self) -> None:
        """The piece has run, and no other piece follows in this forward pass: forget the random state if it drew
        no random numbers (what the next :meth:`capture` would tell)."""
        if self.cpu_rng is not None:
            self._forget_if_unmoved(*_random_state(self.device))

    def _forget_if_unmoved(self, cpu_rng: Tensor | None, device_rng: Tensor | None) -> None:
        """Forget the random state if it still is ``(cpu_rng, device_rng)``: the piece drew no random numbers."""
        if self.cpu_rng is not None and _equal(self.cpu_rng, cpu_rng) and _equal(self.device_rng, device_rng):
            self.cpu_rng = self.device_rng = None

    def recording(self, module: nn.Module, tree: ModuleTree | None = None) -> AbstractContextManager[None]:
        """Run the piece's forward inside this block: notes which of ``module``'s submodules update buffers,
        and ``module``'s parameters (:attr:`parameters`, :attr:`tree`). ``tree`` is ``ModuleTree(module)`` where the
        caller has walked it already (each walk costs a few microseconds, and every pass walks every piece)."""
        self.tree = tree = ModuleTree(module) if tree is None else tree
        self.parameters = tree.parameters
        # only a submodule that holds buffers can update one, and most (linear layers, activations) hold none
        holders = [child for child in tree.modules if child._buffers]
        return _Recording(self, holders) if holders else _NOTHING_TO_DO

    def replayed(self) -> AbstractContextManager[None]:
        """Recompute the piece inside this block: the random state and autocast state of its first run.

        The caller's random stream is left as it was; autocast is re-entered only where its state now differs
        from the first run's (a backward pass usually runs outside autocast, and so did a forward pass without
        it). The grad mode is the caller's to choose (``torch.enable_grad()`` to build the piece's graph).
        """
        if self.device_rng is None and self._autocast_as_now():
            # the common case, entered for every piece: a plain class, or none at all
            return _NOTHING_TO_DO if self.cpu_rng is None else _CPUStateReplayed(self.cpu_rng)
        return self._replayed_in_full()

    def _autocast_as_now(self) -> bool:
        """Whether autocast is now as it was in the piece's first run."""
        kind = self.device.type
        enabled = torch.is_autocast_enabled(kind)
        return enabled == self.autocast_enabled and (not enabled or torch.get_autocast_dtype(kind) == self.autocast_dtype)

    def pull_back(self, piece: Callable[[Tensor], Tensor], point: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        """Recompute the piece at ``point`` as it first ran, and back-propagate ``grad_output`` through it.

        ``piece(point)`` runs with its graph, inside :meth:`buffers_restored` and :meth:`replayed`. Returns its
        output (whose graph the back-propagation frees) and :func:`vector_jacobian_products` of it with respect
        to ``point`` and :attr:`parameters`.
        """
        if self.cpu_rng is None and self.device_rng is None and not self.updated_buffers and self._autocast_as_now():
            # the common case, once per piece in every backward pass: nothing to replay or put back
            with torch.enable_grad():
                output = piece(point)
            return (output, *vector_jacobian_products(output, point, self.parameters, grad_output))
        with self.buffers_restored():
            with self.replayed(), torch.enable_grad():
                output = piece(point)
            return (output, *vector_jacobian_products(output, point, self.parameters, grad_output))

    @contextmanager
    def _replayed_in_full(self) -> Iterator[None]:
        """:meth:`replayed` with an accelerator's random state (forked by ``torch.random.fork_rng``) or autocast to re-enter."""
        devices = [self.device] if self.device_rng is not None else []
        with torch.random.fork_rng(devices=devices, enabled=self.cpu_rng is not None, device_type=self.device.type if devices else None):
            if self.cpu_rng is not None:
                torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                _accelerator_module(self.device).set_rng_state(self.device_rng, self.device)  # type: ignore[union-attr]
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_enabled):
                yield

    def snapshot_buffers(self) -> list[Tensor]:
        """Copies of the buffers the piece updated in its first run, for :meth:`restore_buffers`."""
        return [buffer.clone() for buffer in self.updated_buffers]

    def restore_buffers(self, snapshot: list[Tensor]) -> None:
        """Write a :meth:`snapshot_buffers` back into the module's buffers."""
        with torch.no_grad():
            for buffer, value in zip(self.updated_buffers, snapshot):
                buffer.copy_(value)

    def buffers_restored(self) -> AbstractContextManager[None]:
        """Put back, on leaving, the buffers the piece updated in its first run (BatchNorm's statistics).

        Wrap the recomputation *and* the backward pass through it: autograd saves the running statistics
        with BatchNorm's graph, and writing them back before that graph is used would fail its version check.
        """
        return _BuffersRestored(self) if self.updated_buffers else _NOTHING_TO_DO


# The contexts below are entered once per piece in every forward or backward pass, so they are small classes
# rather than @contextmanager generators (which cost several times more to enter and leave), and one that has
# nothing to do is a shared instance of a class that does nothing.


class _NothingToDo:
    __slots__ = ()

    def __enter__(self) -> None:
        pass

    def __exit__(self, *_: Any) -> None:
        pass


_NOTHING_TO_DO = _NothingToDo()


class _Recording:
    """The context of :meth:`ForwardState.recording` for a piece that holds buffers: their versions before and
    after its forward pass."""

    __slots__ = ("state", "holders", "versions")

    def __init__(self, state: ForwardState, holders: list[nn.Module]) -> None:
        self.state, self.holders = state, holders
        self.versions: list[list[int]] = []

    # the holders' own buffers are read from ``_buffers`` directly: ``buffers(recurse=False)`` goes through
    # ``named_buffers``' generators, and ran twice per holder for every block of every forward pass (some
    # 40 µs of a checkpointed block's fixed cost on a CPU)

    def __enter__(self) -> None:
        self.versions = [[buffer._version for buffer in child._buffers.values() if buffer is not None] for child in self.holders]

    def __exit__(self, error_type: type[BaseException] | None, *_: Any) -> None:
        if error_type is not None:
            return
        for child, before in zip(self.holders, self.versions):
            now = [buffer for buffer in child._buffers.values() if buffer is not None]
            if [buffer._version for buffer in now] != before:
                self.state.updated_buffers.extend(dict.fromkeys(now))  # each once, as buffers() gives them


class _CPUStateReplayed:
    """The context of :meth:`ForwardState.replayed` when only the CPU random state is to be replayed: set on
    entering, the caller's put back on leaving (what ``torch.random.fork_rng`` does for the CPU)."""

    __slots__ = ("state", "caller")

    def __init__(self, state: Tensor) -> None:
        self.state = self.caller = state  # the caller's state is read on entering

    def __enter__(self) -> None:
        self.caller = torch.get_rng_state()
        torch.set_rng_state(self.state)

    def __exit__(self, *_: Any) -> None:
        torch.set_rng_state(self.caller)


class _BuffersRestored:
    """The context of :meth:`ForwardState.buffers_restored` when the piece updated buffers."""

    __slots__ = ("state", "snapshot")

    def __init__(self, state: ForwardState) -> None:
        self.state, self.snapshot = state, None

    def __enter__(self) -> None:
        self.snapshot = self.state.snapshot_buffers()

    def __exit__(self, *_: Any) -> None:
        if self.snapshot is not None:
            self.state.restore_buffers(self.snapshot)
            self.snapshot = None


# nn.Module methods through which modules() and parameters() walk a module tree: a class that overrides one
# walks its own way, and is asked directly
_TRAVERSAL = ("modules", "named_modules", "children", "named_children", "parameters", "named_parameters", "_named_members")
_walks_like_module: dict[type, bool] = {}


def module_parameters(module: nn.Module) -> list[Tensor]:
    """``list(module.parameters())`` at half the cost (see :class:`ModuleTree`)."""
    found = _walk(module)
    return list(module.parameters()) if found is None else _parameters_of(found)


def _walk(module: nn.Module) -> list[nn.Module] | None:
    """``list(module.modules())``, or ``None`` where a module's class changes how ``nn.Module`` walks (ask it then)."""
    found: dict[int, nn.Module] = {}
    stack = [module]
    while stack:
        current = stack.pop()
        if current is None or id(current) in found:
            continue
        kind = type(current)
        plain = _walks_like_module.get(kind)
        if plain is None:
            plain = _walks_like_module[kind] = all(getattr(kind, name, None) is getattr(nn.Module, name) for name in _TRAVERSAL)
        if not plain:
            return None
        found[id(current)] = current
        if current._modules:
            stack.extend(reversed(current._modules.values()))
    return list(found.values())


def _parameters_of(modules: list[nn.Module]) -> list[Tensor]:
    """The parameters the ``modules`` hold themselves, each once, in order."""
    found: dict[int, Tensor] = {}
    for current in modules:
        for parameter in current._parameters.values():
            if parameter is not None:
                found.setdefault(id(parameter), parameter)
    return list(found.values())


def _random_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator's state, and the accelerator's for a ``device`` whose generator was already used (like
    ``torch.utils.checkpoint``: only then does it hold a state worth keeping)."""
    module = _accelerator_module(device)
    device_rng = module.get_rng_state(device) if module is not None and _generator_initialised(module) else None
    return torch.get_rng_state(), device_rng


def _equal(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two generator states (or their absence) are equal."""
    return a is b or (a is not None and b is not None and torch.equal(a, b))


def needs_graph(inputs: Iterable[Tensor], parameters: Iterable[Tensor]) -> bool:
    """Whether a call must prepare a backward pass: grad mode is on and an input or a parameter requires grad."""
    return torch.is_grad_enabled() and (any(t.requires_grad for t in inputs) or any(p.requires_grad for p in parameters))


def run_checked(module: nn.Module, x: Tensor, name: str, *, same_shape: bool = True) -> Tensor:
    """``module(x)``, refusing what a recomputing sequence cannot work with, with an error that names ``name``.

    A recomputing sequence runs its blocks again from inputs it kept or rebuilt, so a block must not write
    into its input (an in-place first operation such as ``nn.ReLU(inplace=True)`` would overwrite a kept
    input, and autograd refuses it on the input of a recomputation); and a residual function or coupling
    half must return a tensor of its input's shape.

    Raises:
        ValueError: the module changed its input in place, or (``same_shape``) returned another shape.
    """
    version = x._version
    try:
        out = module(x)
    except RuntimeError as error:
        if "in-place operation" in str(error) or "inplace operation" in str(error):
            raise ValueError(_in_place_message(name)) from error
        raise
    if x._version != version:
        raise ValueError(_in_place_message(name))
    if same_shape and (not isinstance(out, Tensor) or out.shape != x.shape):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} must preserve the shape of its input: it mapped {tuple(x.shape)} to {shape}")
    return out


def _in_place_message(name: str) -> str:
    return (
        f"{name} changed its input in place (its first operation is in-place, e.g. nn.ReLU(inplace=True)). "
        "A recomputing sequence keeps block inputs and runs the blocks on them again, so a block must leave "
        "its input unchanged: make that operation out of place (inplace=False), or put it after a layer "
        "that creates a new tensor."
    )


class Stash:
    """Block inputs a recomputing Function keeps for its backward pass, each releasable before the pass ends.

    ``ctx.save_for_backward`` holds its tensors until the backward pass returns, but a checkpointing schedule
    must let a kept input go as soon as its plan drops it, or it holds more than its budget. A stash keeps
    what the forward pass hands it as autograd keeps saved tensors — through the saved-tensor hooks active at
    that moment, so that :func:`revlib.measure.saved_tensor_bytes` counts it and
    ``torch.autograd.graph.save_on_cpu`` moves it, and with autograd's check that it was not changed in place
    before it is used — and lets each go on :meth:`release`. What the backward pass stores is kept as it is.
    """

    def __init__(self) -> None:
        # the innermost (pack, unpack) saved-tensor hooks now, or None; PyTorch reads them the same way
        # (torch._functorch), there is no public accessor
        top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self._hooks: tuple[Any, Any] | None = top_hooks(True) if top_hooks is not None else None
        self._kept: dict[Hashable, tuple[Any, bool, weakref.ref[Tensor], int]] = {}  # key: (packed, hooked, tensor, version)

    def keep(self, key: Hashable, tensor: Tensor, *, from_forward: bool = True) -> None:
        """Keep ``tensor`` under ``key`` (packed by the forward pass's hooks when ``from_forward``)."""
        hooked = from_forward and self._hooks is not None
        packed = self._hooks[0](tensor) if hooked else tensor  # type: ignore[index]
        self._kept[key] = (packed, hooked, weakref.ref(tensor), tensor._version)

    def get(self, key: Hashable, name: str) -> Tensor:
        """The tensor kept under ``key``.

        Raises:
            RuntimeError: it was changed in place since it was kept (``name`` says whose input it is).
        """
        packed, hooked, original, version = self._kept[key]
        tensor = original()
        if tensor is not None and tensor._version != version:
            raise RuntimeError(
                f"the kept input of {name} was modified by an inplace operation between the forward pass and its "
                "recomputation; leave the network's intermediate tensors unchanged until backward has run"
            )
        return self._hooks[1](packed) if hooked else packed  # type: ignore[index]

    def release(self, key: Hashable) -> None:
        """Let the tensor kept under ``key`` go."""
        del self._kept[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._kept

    def __len__(self) -> int:
        return len(self._kept)


def distinct_parameters(modules: Sequence[nn.Module]) -> list[Tensor]:
    """The parameters of ``modules`` in the order ``nn.Module.parameters()`` gives them, each once."""
    return list(dict.fromkeys(p for module in modules for p in module_parameters(module)))


def check_parameters_unchanged(saved: Sequence[Tensor], current: Sequence[Tensor], owner: str) -> None:
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


# autograd's engine, entered by vector_jacobian_products as torch.autograd.grad enters it but without grad's
# argument checks and its hooks for debug logging and compiled autograd: some 45 µs a call on a CPU (the VJP of a
# three-layer piece of width 1 took 155 µs through grad, 111 µs here), and the recomputing Functions make a call
# per piece, with outputs and gradients they made themselves, of one shape and dtype, inside a backward pass that
# autograd's engine is running already
_ENGINE = getattr(Variable, "_execution_engine", None)


def vector_jacobian_products(output: Tensor, point: Tensor | None, parameters: Sequence[Tensor], grad_output: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
    """Vector-Jacobian products of ``output`` with respect to ``point`` and to ``parameters``.

    Returns the gradient of ``point`` (zeros when ``output`` does not depend on it; ``None`` when ``point``
    is ``None``, i.e. not wanted) and one gradient per parameter, in order: ``None`` for a parameter that
    requires no grad or that ``output`` does not depend on.
    """
    wanted = [p for p in parameters if p.requires_grad]
    inputs = (*wanted,) if point is None else (point, *wanted)
    if not output.requires_grad or not inputs:
        return (None if point is None else torch.zeros_like(point)), [None] * len(parameters)
    if grad_output.dtype != output.dtype:  # autocast: the piece computed in lower precision
        grad_output = grad_output.to(output.dtype)
    if _ENGINE is not None and output.shape == grad_output.shape:
        found = _ENGINE.run_backward((output,), (grad_output,), False, False, inputs, True, accumulate_grad=False)
    else:
        found = torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
    point_gradient = None
    if point is not None:
        point_gradient, found = found[0], found[1:]
        if point_gradient is None:  # the output does not depend on the point
            point_gradient = torch.zeros_like(point)
        elif point_gradient.dtype != point.dtype:
            point_gradient = point_gradient.to(point.dtype)
    if len(wanted) == len(parameters):
        return point_gradient, list(found)
    of_wanted = iter(found)
    return point_gradient, [next(of_wanted) if p.requires_grad else None for p in parameters]


def accumulate(gradients: dict[int, Tensor], parameters: Sequence[Tensor], found: Sequence[Tensor | None]) -> None:
    """Add each parameter's gradient in ``found`` (``None``: none) into ``gradients``, keyed by parameter id: a
    module that appears twice in a sequence (tied weights) receives the sum of its uses' gradients, as
    autograd would give it."""
    for parameter, gradient in zip(parameters, found):
        if gradient is not None:
            key = id(parameter)
            gradients[key] = gradients[key] + gradient if key in gradients else gradient


class BlockSequence(nn.Module):
    """Blocks held as ``nn.Sequential`` holds them (numbered children, so the two share ``state_dict`` keys),
    read by the memory-saving sequences at every call.

    ``len`` and iteration go over the blocks in order, a block that appears twice (tied weights) once per
    use; indexing gives a block and slicing a sequence of the same kind with the same options
    (:meth:`_like`). The sequence cannot be changed in place: that raises a ``TypeError`` saying to build a
    new one.
    """

    def __init__(self, blocks: Sequence[nn.Module], kind: str = "block") -> None:
        super().__init__()
        for index, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"{kind} {index} must be an nn.Module, got {type(block).__name__}")
            self.add_module(str(index), block)

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks in order, a repeated block once per use."""
        return list(self._modules.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.blocks)

    def __getitem__(self, index: int | slice) -> nn.Module:
        if isinstance(index, slice):
            return self._like(self.blocks[index])
        return self.blocks[index]

    def _like(self, blocks: list[nn.Module]) -> BlockSequence:
        """A sequence of the same kind and options over ``blocks``."""
        raise NotImplementedError

    def _immutable(self, *_: Any) -> NoReturn:
        name = type(self).__name__
        raise TypeError(f"a {name} cannot be changed in place: build a new one, e.g. {name}(*sequence, block, ...)")

    append = insert = extend = __setitem__ = __delitem__ = _immutable
