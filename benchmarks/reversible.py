"""Memory and time of a RevNet against the same network with ordinary and checkpointed backprop.

Run: ``python benchmarks/reversible.py [--device cuda] [--depths 4 8 16 32 64] [--batch 128]``

For every depth N (reversible blocks in one stage of 32 channels on 8×8 inputs) it prints the bytes
saved for backward, the measured peak memory of one forward+backward step, and the median time of that
step, for three ways of running the *same* blocks with the *same* weights:

* plain      — ``nn.Sequential``, ordinary autograd (stores every block's activations);
* checkpoint — :class:`revlib.checkpoint.CheckpointedSequence` checkpointing every block (stores each block's
  input, recomputes the block in backward);
* reversible — :class:`revlib.reversible.ReversibleSequence` (stores the output, rebuilds the inputs).

The time ratios are reversible / plain and checkpoint / plain; theory says about 4/3 for both.
"""

from __future__ import annotations

import argparse
import functools

import torch

from revlib.measure import compare_times, forward_backward, peak_memory, saved_tensor_bytes
from revlib.reversible import RevNet
from revlib.runtime import resolve_device

VARIANTS = {"plain": {"reversible": False}, "checkpoint": {"reversible": False, "checkpointed": True}, "reversible": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: revlib's default device)")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    arguments = parser.parse_args()
    device = resolve_device(arguments.device)
    inputs = torch.randn(arguments.batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"device {device}, batch {arguments.batch}, one stage of width {arguments.width} on 8x8 inputs, {torch.get_num_threads()} threads")
    header = f"{'blocks':>6} | " + " | ".join(f"{name:>10} saved  peak  ms" for name in VARIANTS) + " | rev/plain  ckpt/plain"
    print(header)
    print("-" * len(header))
    for depth in arguments.depths:
        torch.manual_seed(0)
        models = {name: RevNet((arguments.width,), depth, device=device, **options) for name, options in VARIANTS.items()}
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


if __name__ == "__main__":
    main()
