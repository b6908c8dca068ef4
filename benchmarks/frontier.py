"""The memory/compute frontier at two depths: every method of the book on one training step.

Run: ``python benchmarks/frontier.py [--device cuda] [--family conv] [--depths 16 64] [--width 32] [--batch 128]``

For each depth it prints :func:`revlib.frontier.frontier`'s table: MiB of parameters, gradients, optimiser
state (Adam) and saved activations, their sum, the measured peak of the step (CUDA allocator, or the peak
resident memory of a fresh process on the CPU), the median milliseconds per step (methods timed in turns),
the relative gradient error against exact backprop through the same network, and the extra evaluations of
each residual function per step.
"""

from __future__ import annotations

import argparse

import torch

from revlib.frontier import FAMILIES, format_table, frontier
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
    options = parser.parse_args()
    for depth in options.depths:
        rows = frontier(options.family, depth, options.width, options.batch, optimizer=options.optimizer, device=options.device,
                        repeats=options.repeats)
        print(f"\n{options.family}, {depth} blocks, width {options.width}, batch {options.batch}, {options.optimizer}, "
              f"{torch.get_num_threads()} threads; MiB unless stated")
        print(format_table(rows))


if __name__ == "__main__":
    main()
