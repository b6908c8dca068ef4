"""What each tensor of a profiled call is, inferred from its data flow as PyTorch's memory profiler infers it.

PyTorch's analysis (``torch.profiler._memory_profiler.MemoryProfile``) turns a profile into a data-flow graph
of top-level operators and sets a category on each version of each tensor, step by step: gradients (what
``AccumulateGrad`` stores) and temporaries (allocated and freed inside one operator); inputs (what feeds the
computation of a gradient without depending on one); parameters (read by the forward pass, used for a
gradient, updated with one); activations (flooded forward from the inputs); autograd's own outputs. It is
exact and general, but it walks the event tree a dozen times, matches every operator call against the
operator's schemas anew and hashes dataclass keys: on a training step of a 16-block convolutional network
it took about 4 s where the step takes 0.17 s.

:func:`analyse` follows the same rules in the same order, on the same graph, with each operator's schemas
matched once per kind of call and plain tuples for keys, and so returns the same categories and the same
timeline at a fraction of the cost. It also imposes the categories revlib knows by identity (the marks of
:mod:`revlib.timeline`: parameters, gradients, optimiser state, inputs) before the inference and again after
the deduction of parameters, as the marks would be imposed on PyTorch's own analysis. The test suite checks
the agreement, version by version, against ``MemoryProfile`` on the book's training steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._C._profiler import RecordScope, _EventType, _ProfilerEvent, _TensorMetadata
from torch._utils import _element_size
from torch.profiler._memory_profiler import Action, Category, SchemaMatcher

__all__ = ["Flow", "analyse"]

Key = tuple[int, int, torch.device]
"""A storage as PyTorch's ``TensorKey`` names it: the tensor's id, the allocation's id, the device."""

_ACCUMULATE = "torch::autograd::AccumulateGrad"
# Which mark wins when one storage is marked twice: what it is over how it is used (a parameter that is also
# an argument of the call, or a gradient a module holds that an optimiser holds too, keeps the first).
_PRECEDENCE = (Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE, Category.INPUT)
_WEIGHTS = (Category.GRADIENT, Category.PARAMETER)
_ALLOWED_BESIDE_INPUTS = {Category.PARAMETER, Category.TEMPORARY}
_FLOODED = {Category.INPUT, Category.ACTIVATION}


@dataclass
class _Node:
    """A top-level operator (or an allocation outside any), with its edges in the data-flow graph."""

    start: int
    backward: bool
    reads: dict[Key, bool] = field(default_factory=dict)  # key → whether the operator may mutate it
    allocated: list[Key] = field(default_factory=list)
    freed: list[Key] = field(default_factory=list)
    inputs: list[tuple[Key, int]] = field(default_factory=list)  # (key, version read)
    outputs: list[tuple[Key, int]] = field(default_factory=list)  # (key, version written)
    intermediates: list[Key] = field(default_factory=list)
    created: list[Key] = field(default_factory=list)
    bumped: list[tuple[Key, int]] = field(default_factory=list)  # mutated in place: (key, version before)
    destroyed: list[Key] = field(default_factory=list)


class _Categories:
    """PyTorch's ``CategoryDict``: a category by tensor id, else by storage, else by storage and version."""

    def __init__(self) -> None:
        self.by_id: dict[int, Category] = {}
        self.ids: dict[int, set[Key]] = {}
        self.by_key: dict[Key, Category] = {}
        self.by_version: dict[tuple[Key, int], Category] = {}

    def set_by_id(self, key: Key, category: Category) -> None:
        self.by_id[key[0]] = category
        self.ids.setdefault(key[0], set()).add(key)

    def setdefault_by_version(self, key: Key, version: int, category: Category) -> None:
        self.by_version.setdefault((key, version), category)

    def get(self, key: Key, version: int) -> Category | None:
        return self.by_id.get(key[0]) or self.by_key.get(key) or self.by_version.get((key, version))


@dataclass
class Flow:
    """The analysis of one profile.

    Attributes:
        roots: the profile's event tree.
        timeline: ``(time, action, key, version, bytes)`` for every storage the graph knows, as
            ``MemoryProfile.timeline`` lists them (time -1: live before the profile), sorted by time and action.
        untyped: ``(time, pointer, bytes, device)`` of every allocation (bytes > 0) and free (bytes < 0) that
            the profiler could not tie to a tensor, in tree order.
        categories: what :meth:`category` reads.
    """

    roots: list[_ProfilerEvent]
    timeline: list[tuple[int, Action, Key, int, int]]
    untyped: list[tuple[int, int, int, torch.device]]
    categories: _Categories

    def category(self, key: Key, version: int) -> Category | None:
        """The category of ``key`` at ``version`` (``None``: the inference gave it none)."""
        return self.categories.get(key, version)


def _key(tensor: _TensorMetadata | None) -> Key | None:
    if tensor is None or tensor.id is None or tensor.allocation_id is None or tensor.storage_data_ptr is None:
        return None
    return (tensor.id, tensor.allocation_id, tensor.device)


def _allocation_key(fields: object) -> Key | None:
    if fields.id is None or fields.allocation_id is None or fields.ptr is None:  # type: ignore[attr-defined]
        return None
    return (fields.id, fields.allocation_id, fields.device)  # type: ignore[attr-defined]


class _Walk:
    """One pass over the event tree: the top-level operators and what each reads, allocates and frees; the
    gradients ``AccumulateGrad`` stores; the sizes of storages seen only as inputs; the marks."""

    def __init__(self, roots: list[_ProfilerEvent], mark_prefix: str) -> None:
        self.mark_prefix = mark_prefix
        self.schemas: dict[tuple[object, ...], tuple[bool, tuple[bool | None, ...]]] = {}
        self.nodes: list[_Node] = []
        self.allocation_times: dict[tuple[Key, bool], int] = {}
        self.allocation_sizes: dict[Key, int] = {}
        self.extents: dict[Key, int] = {}
        self.gradients: list[Key] = []
        self.marks: dict[int, tuple[Key, Category, int]] = {}
        self.untyped: list[tuple[int, int, int, torch.device]] = []
        stack: list[tuple[_ProfilerEvent, bool]] = [(root, False) for root in reversed(roots)]
        while stack:  # depth first, in tree order, as PyTorch's traversal
            event, backward = stack.pop()
            kind, fields = event.typed
            if kind == _EventType.Allocation:
                node = _Node(event.start_time_ns, backward)
                self._allocation(event, fields, node)
                self.nodes.append(node)
                continue
            if kind == _EventType.TorchOp:
                read = self._read(event)
                backward = backward or fields.scope == RecordScope.BACKWARD_FUNCTION
                if fields.scope == RecordScope.BACKWARD_FUNCTION or self._schema_facts(fields, read[1])[0]:
                    self.nodes.append(self._leaf(event, read, backward))
                    continue
            stack.extend((child, backward) for child in reversed(event.children))
        self.nodes.sort(key=lambda node: node.start)

    def _schema_facts(self, op: object, kinds: tuple[object, ...]) -> tuple[bool, tuple[bool | None, ...]]:
        """Whether the operator call matches one of its schemas, and which inputs it may mutate
        (``SchemaMatcher``), computed once per operator name and ``kinds`` of inputs (see :meth:`_read`) in
        one analysis (the registry of schemas can grow between analyses)."""
        signature = (op.name, kinds)  # type: ignore[attr-defined]
        facts = self.schemas.get(signature)
        if facts is None:
            facts = (bool(SchemaMatcher.match_schemas(op)), SchemaMatcher.inputs_are_mutable(op))  # type: ignore[arg-type]
            self.schemas[signature] = facts
        return facts

    def _read(self, event: _ProfilerEvent) -> tuple[list[object], tuple[object, ...]]:
        """The keys of an operator's inputs and their kinds as schema matching tells them apart (whether a
        tensor has a key, whether every tensor of a list has, else the value's type); what the operator tells
        by itself (a mark, or a gradient that ``AccumulateGrad`` stores)."""
        if event.name.startswith(self.mark_prefix):
            self._mark(event)
        elif event.name == _ACCUMULATE:
            self._accumulated(event)
        keys: list[object] = []
        kinds: list[object] = []
        for value in event.typed[1].inputs:
            if isinstance(value, _TensorMetadata):
                key = self._extent(value)
                keys.append(key)
                kinds.append(key is not None)
            elif isinstance(value, list):
                items = [self._extent(item) for item in value]
                keys.append(items)
                kinds.append(("list", None not in items))
            else:
                keys.append(None)
                kinds.append(type(value))
        return keys, tuple(kinds)

    def _extent(self, tensor: _TensorMetadata) -> Key | None:
        """The tensor's key, noting how far its view reaches (PyTorch's ``SizeMap``: the size of a storage
        that the profile never allocates or frees)."""
        key = _key(tensor)
        if key is not None and key not in self.allocation_sizes and tensor.layout == torch.strided:
            elements = max(size * stride for size, stride in zip(tensor.sizes or [1], tensor.strides or [1]))
            nbytes = elements * _element_size(tensor.dtype)
            if nbytes > self.extents.get(key, -1):
                self.extents[key] = nbytes
        return key

    def _allocation(self, event: _ProfilerEvent, fields: object, node: _Node) -> None:
        key = _allocation_key(fields)
        nbytes = fields.alloc_size  # type: ignore[attr-defined]
        if key is None:
            self.untyped.append((event.start_time_ns, fields.ptr, nbytes, fields.device))  # type: ignore[attr-defined]
            return
        self.allocation_times[(key, nbytes > 0)] = event.start_time_ns
        self.allocation_sizes.setdefault(key, abs(nbytes))
        if nbytes > 0:
            node.allocated.append(key)
        elif nbytes < 0:
            node.freed.append(key)

    def _leaf(self, event: _ProfilerEvent, read: tuple[list[object], tuple[object, ...]], backward: bool) -> _Node:
        """A top-level operator (its inputs ``read``): what every operator inside it reads (and may
        mutate), allocates and frees."""
        node = _Node(event.start_time_ns, backward)
        mutability: dict[Key, set[bool | None]] = {}
        stack = [event]
        while stack:
            inner = stack.pop()
            kind, fields = inner.typed
            if kind == _EventType.Allocation:
                self._allocation(inner, fields, node)
                continue
            if kind == _EventType.TorchOp:
                keys, kinds = read if inner is event else self._read(inner)
                mutable = self._schema_facts(fields, kinds)[1]
                for key, flag in zip(keys, mutable):
                    for item in key if isinstance(key, list) else [key]:
                        if item is not None:
                            mutability.setdefault(item, set()).add(flag)
            stack.extend(reversed(inner.children))
        node.reads = {key: (True in flags) or flags == {None} for key, flags in mutability.items()}
        return node

    def _accumulated(self, event: _ProfilerEvent) -> None:
        """A gradient ``AccumulateGrad`` stores (detached, or added to in place), as PyTorch detects it."""
        if event.typed[1].scope != RecordScope.BACKWARD_FUNCTION:
            return
        first = event.children[0] if event.children else None
        if first is not None and first.typed[0] == _EventType.TorchOp and first.name in ("aten::detach", "aten::add_"):
            inputs = first.typed[1].inputs
            if inputs and isinstance(inputs[0], _TensorMetadata):
                key = _key(inputs[0])
                if key is not None:
                    self.gradients.append(key)

    def _mark(self, event: _ProfilerEvent) -> None:
        name, nbytes = event.name.removeprefix(self.mark_prefix).split()
        alias = next((child for child in event.children if child.name == "aten::alias" and child.typed[1].inputs), None)
        key = None if alias is None else _key(alias.typed[1].inputs[0])
        if key is None:  # a tensor without a storage the profiler can name
            return
        category = Category[name]
        kept = self.marks.get(key[0])
        if kept is None or _PRECEDENCE.index(category) < _PRECEDENCE.index(kept[1]):
            self.marks[key[0]] = (key, category, int(nbytes))


def analyse(roots: list[_ProfilerEvent], mark_prefix: str) -> Flow:
    """The categories and timeline of a profile's event tree (``result.experimental_event_tree()``), the
    marks labelled ``mark_prefix`` imposed."""
    walk = _Walk(roots, mark_prefix)
    nodes = walk.nodes
    _connect(nodes)
    marked = [(key, category) for key, category, _ in walk.marks.values()]
    sizes = {**walk.extents, **walk.allocation_sizes,  # a storage live before the profile counts whole when marked
             **{key: nbytes for key, _, nbytes in walk.marks.values() if (key, True) not in walk.allocation_times}}
    categories = _Categories()

    def impose_marks() -> None:
        for key, category in marked:
            categories.set_by_id(key, category)

    impose_marks()
    for key in walk.gradients:  # gradients and temporaries, the unambiguous ones
        categories.set_by_id(key, Category.GRADIENT)
    for node in nodes:
        for key in node.intermediates:
            categories.by_key[key] = Category.TEMPORARY
    depends_on_gradient = _depends_on_gradient(nodes, categories)
    _set_inputs(nodes, categories, depends_on_gradient)
    _set_parameters(nodes, categories, depends_on_gradient)
    impose_marks()
    _set_activations(nodes, categories)
    _set_autograd_detail(nodes, categories)
    return Flow(roots, _timeline(nodes, categories, walk.allocation_times, sizes), walk.untyped, categories)


def _connect(nodes: list[_Node]) -> None:
    """Each node's inputs, outputs and intermediates, with the versions that in-place updates create, in time
    order (PyTorch's ``DataFlowNode``)."""
    versions: dict[Key, int] = {}
    for node in nodes:
        edges: dict[Key, list[int | bool | None]] = {}  # key → [input version (None: allocated), mutated (None: freed)]
        for key, mutated in node.reads.items():
            edges[key] = [versions.setdefault(key, 0), mutated]
        for key in node.freed:
            edge = edges.setdefault(key, [0, False])
            edge[0], edge[1] = versions.setdefault(key, 0), None
        for key in node.allocated:
            edges.setdefault(key, [0, False])[0] = None
        for key in sorted(edges, key=lambda key: key[:2]):
            version, mutated = edges[key]
            if version is not None:
                node.inputs.append((key, version))  # type: ignore[arg-type]
            if (version is None and mutated is not None) or mutated:
                node.outputs.append((key, 0 if version is None else version + 1))  # type: ignore[operator]
            if version is None and mutated is None:
                node.intermediates.append(key)
            if version is None:
                node.created.append(key)
            elif mutated:
                node.bumped.append((key, version))  # type: ignore[arg-type]
                versions[key] = version + 1  # type: ignore[operator]
            if mutated is None:
                node.destroyed.append(key)


def _depends_on_gradient(nodes: list[_Node], categories: _Categories) -> set[int]:
    """Ids of the tensors some version of which depends on a gradient, or feeds one (PyTorch's fixed point)."""
    seeded = [[key[0] for key, version in node.inputs if categories.get(key, version) in _WEIGHTS] for node in nodes]
    found: set[int] = set()
    while True:
        size = len(found)
        for node, seeds in zip(nodes, seeded):
            ids = seeds + [key[0] for key, _ in node.inputs if key[0] in found]
            if ids:
                found.update(ids)
                found.update(key[0] for key, _ in node.outputs)
        if len(found) == size:
            return found


def _set_inputs(nodes: list[_Node], categories: _Categories, depends_on_gradient: set[int]) -> None:
    """Inputs: what the computation of a gradient reads that depends on no gradient, not made by backward."""
    produces_gradient: set[tuple[Key, int]] = set()
    for node in reversed(nodes):
        tensors = set(node.inputs) | set(node.outputs)
        if any(categories.get(*tensor) in _WEIGHTS or tensor in produces_gradient for tensor in tensors):
            produces_gradient |= tensors
    for node in nodes:
        if node.backward:
            produces_gradient -= set(node.outputs)
    for key, version in produces_gradient:
        if key[0] not in depends_on_gradient:
            categories.setdefault_by_version(key, version, Category.INPUT)


def _snapshot(nodes: list[_Node], categories: _Categories) -> set[tuple[Key, int]]:
    """Every (storage, version) the graph knows."""
    known: set[tuple[Key, int]] = set()
    for node in nodes:
        known.update(node.inputs)
        known.update((key, 0) for key in node.intermediates)
        known.update(node.outputs)
    for keys in categories.ids.values():
        known.update((key, 0) for key in keys)
    return known


def _set_parameters(nodes: list[_Node], categories: _Categories, depends_on_gradient: set[int]) -> None:
    """Parameters: read by the forward pass, used for a gradient, and updated with one."""
    known = _snapshot(nodes, categories)
    forward = {tensor for tensor in known if categories.get(*tensor) == Category.INPUT}
    candidates: set[tuple[Key, int]] = set()
    for node in nodes:
        inputs = set(node.inputs)
        if (not node.backward and forward & inputs
                and not any(categories.get(*tensor) == Category.GRADIENT for tensor in (*node.inputs, *node.outputs))):
            forward.update(node.outputs)
            candidates |= inputs - forward
    used_for_gradient: set[tuple[Key, int]] = set()
    for node in reversed(nodes):
        if any(categories.get(*tensor) == Category.GRADIENT or tensor in used_for_gradient for tensor in node.outputs):
            used_for_gradient.update(node.inputs)
    parameters = {key[0] for key, _ in candidates & used_for_gradient} & depends_on_gradient
    for key, _ in known:
        if key[0] in parameters:
            categories.set_by_id(key, Category.PARAMETER)


def _set_activations(nodes: list[_Node], categories: _Categories) -> None:
    """Activations: flooded forward from the inputs through forward operators that read nothing unclassified."""
    for node in nodes:
        if node.backward:
            continue
        found = {categories.get(*tensor) for tensor in node.inputs}
        if found & _FLOODED and not found - _FLOODED - _ALLOWED_BESIDE_INPUTS:
            for key, version in node.outputs:
                categories.setdefault_by_version(key, version, Category.ACTIVATION)


def _set_autograd_detail(nodes: list[_Node], categories: _Categories) -> None:
    """What backward operators write that had no category before: autograd's own."""
    prior = {None, Category.AUTOGRAD_DETAIL}
    for node in nodes:
        if node.backward:
            for key, version in node.outputs:
                if version == 0 or categories.get(key, version - 1) in prior:
                    categories.setdefault_by_version(key, version, Category.AUTOGRAD_DETAIL)


def _timeline(nodes: list[_Node], categories: _Categories, allocation_times: dict[tuple[Key, bool], int],
              sizes: dict[Key, int]) -> list[tuple[int, Action, Key, int, int]]:
    """Creations, in-place updates and destructions of every storage, and those live before the profile."""
    known = _snapshot(nodes, categories)
    last_version: dict[Key, int] = {}
    for key, version in known:
        last_version[key] = max(version, last_version.get(key, 0))
    events: list[tuple[int, Action, Key, int, int]] = [
        (-1, Action.PREEXISTING, key, 0, sizes[key]) for key, version in known if version == 0 and (key, True) not in allocation_times
    ]
    for node in nodes:
        events.extend((allocation_times[(key, True)], Action.CREATE, key, 0, sizes[key]) for key in node.created)
        events.extend((node.start, Action.INCREMENT_VERSION, key, version, sizes[key]) for key, version in node.bumped)
        events.extend((allocation_times[(key, False)], Action.DESTROY, key, last_version[key], sizes[key]) for key in node.destroyed)
    events.sort(key=lambda event: (event[0], event[1].value))
    return events

