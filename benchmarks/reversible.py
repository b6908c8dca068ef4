"""Time and memory of reversible stacks against plain autograd, checkpointing and other libraries.

Run: ``python benchmarks/reversible.py [--table couplings|revnet|all] [--device cuda] [--depths 8 32] ...``

Two tables, each for the *same* blocks with the *same* weights under several memory mechanisms:

* ``couplings`` — N additive couplings y₁ = x₁ + F(x₂), y₂ = x₂ + G(y₁) on ``(batch, features)`` vectors,
  F and G each Linear(features/2 → hidden) → activation → Linear(hidden → features/2), one
  forward+backward step (loss: the output's sum) under

  * plain    — ``nn.Sequential`` of the blocks, ordinary autograd (stores every block's activations);
  * revlib   — :class:`revlib.reversible.ReversibleSequence` (stores the output, rebuilds the inputs;
    random state replayed, its default); with ``--without-rng`` also ``revlib-norng``, the same with
    ``preserve_rng_state=False``, which is what the two others do by default;
  * memcnn   — MemCNN's ``AdditiveCoupling`` in ``InvertibleModuleWrapper(keep_input=False)``, its
    memory-saving mode (each block inverted, then recomputed with its graph), when ``memcnn`` is importable;
  * revtorch — RevTorch's ``ReversibleSequence`` of ``ReversibleBlock``, when ``revtorch`` is importable.

  The stack's input comes from a leaf through one copy, as if a layer came before it (see ``_stem``). Each
  depth is timed in ``--runs`` fresh processes, the variants in turns (each round runs every variant once,
  in a new order: :func:`revlib.measure.compare_times` with ``shuffle=True``; median of ``--repeats``
  rounds), and the table gives the median ms and the ratio to plain and to the best peer (median of the
  runs, and their range).
  The processes run with glibc's heap kept (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` and
  ``MALLOC_MMAP_THRESHOLD_`` raised; ``--default-malloc`` to leave them): otherwise the memory one variant
  frees decides how many pages the next one faults in, and plain's time moved by 7 % with the other variants
  in its process. Before timing, every variant's input and parameter gradients are compared with plain
  autograd's (relative error, printed). The other libraries are compared, never depended on: missing ones
  are skipped with a note.
* ``revnet`` — a RevNet stage (N reversible blocks of 32 channels on 8×8 inputs) as plain, checkpointed
  (:class:`revlib.checkpoint.CheckpointedSequence`, every block) and reversible: bytes saved for backward,
  measured peak memory and median time of one step; theory says about 4/3 of plain's time for the last two.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from revlib.checkpoint import CheckpointedSequence
from revlib.measure import compare_times, forward_backward, peak_memory, saved_tensor_bytes
from revlib.reversible import RevNet, ReversibleBlock, ReversibleSequence
from revlib.runtime import resolve_device
from revlib.verify import relative_error

PEERS = ("memcnn", "revtorch")  # optional, for comparison only
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
# the same RevNet with plain autograd, each block checkpointed, and its reversible stages
REVNET_VARIANTS = {
    "plain": {"stage": nn.Sequential},
    "checkpoint": {"stage": functools.partial(CheckpointedSequence, schedule="every")},
    "reversible": {},
}


def _peer(name: str) -> tuple[Any, str]:
    """The peer library ``name``, or ``None`` and the reason when it is missing or fails to import."""
    try:
        with warnings.catch_warnings():  # MemCNN 1.5 uses torch.cuda.amp's deprecated decorators
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module(name), ""
    except Exception as error:  # an old peer may fail on a new torch in ways other than ImportError
        return None, f"{type(error).__name__}: {error}"


def coupling_variants(
    features: int,
    hidden: int,
    activation: str,
    depth: int,
    device: torch.device,
    peers: tuple[str, ...] = PEERS,
    seed: int = 0,
    without_rng: bool = False,
) -> dict[str, tuple[nn.Module, list[tuple[nn.Module, nn.Module]]]]:
    """The same ``depth`` couplings with the same weights under every available mechanism.

    Returns, per variant, the model and its (F, G) modules in order (to compare gradients parameter by parameter).
    """
    half = features // 2
    torch.manual_seed(seed)
    halves = [
        tuple(nn.Sequential(nn.Linear(half, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, half)).to(device) for _ in "fg")
        for _ in range(depth)
    ]

    def copies() -> list[tuple[nn.Module, nn.Module]]:
        return [(copy.deepcopy(f), copy.deepcopy(g)) for f, g in halves]

    variants: dict[str, tuple[nn.Module, list[tuple[nn.Module, nn.Module]]]] = {}
    pairs = copies()
    variants["plain"] = (nn.Sequential(*[ReversibleBlock(f, g) for f, g in pairs]), pairs)
    pairs = copies()
    variants["revlib"] = (ReversibleSequence(*[ReversibleBlock(f, g) for f, g in pairs]), pairs)
    if without_rng:
        pairs = copies()
        variants["revlib-norng"] = (ReversibleSequence(*[ReversibleBlock(f, g) for f, g in pairs], preserve_rng_state=False), pairs)
    memcnn, _ = _peer("memcnn") if "memcnn" in peers else (None, "")
    if memcnn is not None:
        pairs = copies()
        wrapped = [memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g, split_dim=1), keep_input=False, keep_input_inverse=False) for f, g in pairs]
        variants["memcnn"] = (nn.Sequential(*wrapped), pairs)
    revtorch, _ = _peer("revtorch") if "revtorch" in peers else (None, "")
    if revtorch is not None:
        pairs = copies()
        blocks = nn.ModuleList([revtorch.ReversibleBlock(f, g, split_along_dim=1) for f, g in pairs])
        variants["revtorch"] = (revtorch.ReversibleSequence(blocks), pairs)
    return variants


def _stem(inputs: Tensor) -> tuple[Tensor, Tensor]:
    """A leaf that requires grad and a copy of it for the stack, as if a layer came before the stack: RevTorch
    gives the parameters no gradient when the input requires none, MemCNN frees its input's storage in forward
    and, on a leaf, assigns the input's gradient on top of autograd's accumulation (doubling it)."""
    leaf = inputs.detach().requires_grad_(True)
    return leaf, leaf.clone()


def _step(model: nn.Module, inputs: Tensor) -> None:
    """One forward+backward step (loss: the output's sum)."""
    _, x = _stem(inputs)
    model(x).sum().backward()


def _gradients(model: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], inputs: Tensor, weight: Tensor) -> list[Tensor]:
    """Input and parameter gradients (F's then G's, block by block) of a fixed linear functional of the output."""
    model.zero_grad(set_to_none=True)
    leaf, x = _stem(inputs)
    (model(x) * weight).sum().backward()
    return [leaf.grad] + [p.grad for f, g in pairs for p in (*f.parameters(), *g.parameters())]


def coupling_run(arguments: argparse.Namespace, depth: int) -> dict[str, Any]:
    """One fresh process's measurement of one depth: median ms per variant and gradient errors against plain."""
    device = resolve_device(arguments.device)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(arguments.batch, arguments.features, generator=generator).to(device)
    weight = torch.randn(arguments.batch, arguments.features, generator=generator).to(device)
    variants = coupling_variants(
        arguments.features, arguments.hidden, arguments.activation, depth, device, tuple(arguments.peers), without_rng=arguments.without_rng
    )
    reference = _gradients(*variants["plain"], inputs, weight)
    errors = {name: relative_error(_gradients(model, pairs, inputs, weight), reference) for name, (model, pairs) in variants.items()}
    calls = {name: functools.partial(_step, model, inputs) for name, (model, _) in variants.items()}
    timings = compare_times(calls, warmup=2, repeats=arguments.repeats, device=device, shuffle=True)
    return {"ms": {name: timing.median * 1e3 for name, timing in timings.items()}, "errors": errors}


def _worker_environment(arguments: argparse.Namespace) -> dict[str, str]:
    """The measuring process's environment: glibc keeps its heap (no trimming, no mmap for large blocks)
    unless ``--default-malloc``, so that each variant's page faults do not depend on the variant before it."""
    environment = dict(os.environ)
    if not arguments.default_malloc:
        environment.update(MALLOC_TRIM_THRESHOLD_=str(2**40), MALLOC_TOP_PAD_=str(2**28), MALLOC_MMAP_THRESHOLD_=str(2**30))
    return environment


def coupling_table(arguments: argparse.Namespace) -> None:
    for name in arguments.peers:
        module, reason = _peer(name)
        if module is None:
            print(f"note: {name} is not importable, skipped ({reason})")
    device = resolve_device(arguments.device)
    print(
        f"additive couplings on {device}: features {arguments.features} (halves {arguments.features // 2}), F and G "
        f"Linear→{arguments.activation}→Linear with hidden {arguments.hidden}, batch {arguments.batch}, {arguments.threads} thread(s); "
        f"{arguments.runs} fresh processes per depth, variants in turns, median of {arguments.repeats} rounds each, "
        f"{'default malloc' if arguments.default_malloc else 'heap kept'}"
    )
    for depth in arguments.depths:
        runs = []
        for _ in range(arguments.runs):
            command = [sys.executable, __file__, "--worker", str(depth), *sys.argv[1:]]
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=_worker_environment(arguments))
            if done.returncode:
                raise RuntimeError(f"the measuring process failed:\n{done.stderr}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        names = list(runs[0]["ms"])
        medians = {name: statistics.median(run["ms"][name] for run in runs) for name in names}
        peers = [name for name in names if name in PEERS]
        best_peer = min(peers, key=medians.__getitem__) if peers else None
        header = f"{'blocks':>6} | {'variant':<12} | {'ms':>7} | {'ratio to plain (range)':>22} | {'ratio to best peer (range)':>26} | {'grad error':>10}"
        print()
        print(header)
        print("-" * len(header))
        for name in names:
            ratio = _ratio_column(runs, name, "plain")
            to_peer = _ratio_column(runs, name, best_peer) if best_peer else "–"
            print(f"{depth:>6} | {name:<12} | {medians[name]:7.1f} | {ratio:>22} | {to_peer:>26} | {runs[0]['errors'][name]:10.1e}")
    print(
        "ms: median over runs of each run's median step; ratio: each run's ms / plain's (or the best peer's: the peer "
        "with the lowest ms) in that run, median (min–max)"
    )


def _ratio_column(runs: list[dict[str, Any]], name: str, reference: str) -> str:
    """``name``'s time over ``reference``'s, paired within each run: median (min–max) over the runs."""
    ratios = [run["ms"][name] / run["ms"][reference] for run in runs]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"


def revnet_table(arguments: argparse.Namespace) -> None:
    device = resolve_device(arguments.device)
    inputs = torch.randn(arguments.batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"RevNet on {device}, batch {arguments.batch}, one stage of width {arguments.width} on 8x8 inputs, {torch.get_num_threads()} threads")
    header = f"{'blocks':>6} | " + " | ".join(f"{name:>10} saved  peak  ms" for name in REVNET_VARIANTS) + " | rev/plain  ckpt/plain"
    print(header)
    print("-" * len(header))
    for depth in arguments.depths:
        torch.manual_seed(0)
        models = {name: RevNet((arguments.width,), depth, device=device, **options) for name, options in REVNET_VARIANTS.items()}
        for model in models.values():
            model.load_state_dict(models["reversible"].state_dict())
        calls = {name: functools.partial(forward_backward, model, inputs) for name, model in models.items()}
        times = {name: timing.median for name, timing in compare_times(calls, repeats=arguments.repeats, device=device).items()}
        row = []
        for name, model in models.items():
            saved = saved_tensor_bytes(model, inputs, exclude=model.parameters())
            peak = peak_memory(forward_backward, model, inputs)
            row.append(f"{'':>10} {saved / 2**20:5.1f} {peak / 2**20:5.1f} {times[name] * 1e3:5.0f}")
        ratios = f"{times['reversible'] / times['plain']:9.2f} {times['checkpoint'] / times['plain']:10.2f}"
        print(f"{depth:>6} | " + " | ".join(row) + " | " + ratios)
    print("saved and peak in MiB; ms = median time of one forward+backward step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("couplings", "revnet", "all"), default="all")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: revlib's default device)")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="blocks (default: 8 32 for couplings, 4 8 16 32 64 for revnet)")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 for couplings, 128 for revnet")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (ratios are steadiest at 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per process")
    parser.add_argument("--features", type=int, default=256, help="couplings: features of the input (two halves)")
    parser.add_argument("--hidden", type=int, default=512, help="couplings: hidden width of F and G")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu", help="couplings: F's and G's activation")
    parser.add_argument("--runs", type=int, default=3, help="couplings: fresh processes per depth")
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS), help="couplings: the other libraries to time, when importable")
    parser.add_argument("--without-rng", action="store_true", help="couplings: also time revlib with preserve_rng_state=False")
    parser.add_argument("--default-malloc", action="store_true", help="couplings: leave glibc's heap trimming as it is")
    parser.add_argument("--width", type=int, default=32, help="revnet: channels of the stage")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one fresh-process run of one depth
    arguments = parser.parse_args()
    if arguments.features < 2 or arguments.features % 2:
        parser.error(f"--features must be a positive even number, got {arguments.features}")
    torch.set_num_threads(arguments.threads)
    if arguments.worker is not None:
        arguments.batch = arguments.batch or 256
        print(json.dumps(coupling_run(arguments, arguments.worker)))
        return
    tables = ("couplings", "revnet") if arguments.table == "all" else (arguments.table,)
    for table in tables:
        options = copy.copy(arguments)
        if table == "couplings":
            options.depths, options.batch = arguments.depths or [8, 32], arguments.batch or 256
            coupling_table(options)
        else:
            options.depths, options.batch = arguments.depths or [4, 8, 16, 32, 64], arguments.batch or 128
            revnet_table(options)
        print()


if __name__ == "__main__":
    main()
