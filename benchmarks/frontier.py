"""The memory/compute frontier: every method of the book and PyTorch's own tools on one training step.

Run: ``python benchmarks/frontier.py [--device cuda] [--family conv] [--depths 16 64] [--width 32] [--batch 128]
[--budgets 1 0.5 0] [--backend inductor] [--revlib-only] [--combined] [--only NAME ...]``

For each depth it prints :func:`revlib.frontier.frontier`'s table — MiB of parameters, gradients, optimiser
state (Adam) and activations, each at its largest during a steady-state step, the temporaries held at the
peak and the peak (PyTorch's memory profiler), the median milliseconds per step (methods timed in turns),
the relative gradient error against exact backprop through the same network (at the initial weights), and
the extra evaluations of each residual function per step — then the frontier table: each method's peak and
time as ratios to plain backprop's in the same run.

PyTorch's tools are configured as revlib's methods are, on the same blocks (``revlib.pytorch_tools``):
``torch.utils.checkpoint`` around every block (revlib's ``checkpoint every``); ``checkpoint_sequential``
with the ⌈√N⌉ segments of revlib's ``checkpoint sqrt`` (it keeps its last segment whole and recomputes a
segment at once, as PyTorch ships it); selective activation checkpointing of every block with two
policies; ``torch.compile`` at each activation memory budget of ``--budgets`` (backend
``aot_eager_decomp_partition`` by default, which needs no C++ compiler; ``--backend inductor`` generates
code with the same partitioner); bfloat16 autocast; and the batch in four micro-batches with
the gradients accumulated. On CUDA, ``offload`` is ``torch.autograd.graph.save_on_cpu``. ``--combined`` adds
bfloat16 autocast and four micro-batches on top of revlib's ``checkpoint every``, ``checkpoint sqrt`` and
``reversible``; ``--only`` keeps the named methods, in that order.
"""

from __future__ import annotations

import argparse

import torch

from revlib.frontier import FAMILIES, format_ratios, format_table, frontier
from revlib.training import OPTIMIZERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: revlib's default device)")
    parser.add_argument("--family", choices=FAMILIES, default="conv")
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets", type=float, nargs="*", default=[1.0, 0.5, 0.0],
                        help="torch.compile activation memory budgets, one row each (none: no compiled rows)")
    parser.add_argument("--backend", default="aot_eager_decomp_partition",
                        help="torch.compile backend of the compiled rows (inductor needs a C++ compiler on the CPU)")
    parser.add_argument("--revlib-only", action="store_true", help="leave PyTorch's tools out")
    parser.add_argument("--combined", action="store_true", help="bf16 and micro-batching on top of revlib's stacks")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="measure only these methods, in this order")
    options = parser.parse_args()
    for depth in options.depths:
        rows = frontier(options.family, depth, options.width, options.batch, optimizer=options.optimizer, device=options.device,
                        repeats=options.repeats, pytorch=not options.revlib_only, combined=options.combined,
                        budgets=() if options.revlib_only else options.budgets, only=options.only,
                        compile_backend=options.backend)
        print(f"\n{options.family}, {depth} blocks, width {options.width}, batch {options.batch}, {options.optimizer}, "
              f"{torch.get_num_threads()} threads, compiled rows: {options.backend}; MiB unless stated")
        print(format_table(rows))
        print("\nthe frontier: peak and time as ratios to backprop's in this run")
        print(format_ratios(rows))


if __name__ == "__main__":
    main()
