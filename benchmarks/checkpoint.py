"""Memory, time and recomputation of the checkpointing schedules, against plain and reversible backprop.

Run: ``python benchmarks/checkpoint.py [--device cuda] [--depths 16 64] [--batch 128] [--width 32]``

For every depth N, the same N reversible blocks (as in a RevNet stage: F and G are pre-activation
convolutions on half of ``width`` channels, 8×8 inputs) with the same weights run one forward+backward step
under each memory mechanism:

* plain       — ``nn.Sequential``, ordinary autograd: every block's activations are stored;
* every       — :class:`revlib.checkpoint.CheckpointedSequence`, ``schedule="every"``: every block input;
* sqrt        — ``schedule="sqrt"``: ⌈√N⌉ segment inputs, one segment rebuilt at a time;
* revolve-s   — ``schedule="revolve", slots=s`` for s = ⌈log2 N⌉ and s = 2: the optimal schedule;
* reversible  — :class:`revlib.reversible.ReversibleSequence`: only the output, inputs rebuilt by inversion.

It prints MiB saved for backward, MiB peak memory of the step (CUDA allocator, or the peak resident memory of
a fresh process on the CPU), the median milliseconds per step (variants timed in turns), the block
evaluations the backward pass adds besides one per block (advances; counted, and checked against the
plan), and the time relative to plain.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
from torch import nn

from revlib.checkpoint import CheckpointedSequence
from revlib.measure import compare_times, forward_backward, peak_memory, saved_tensor_bytes
from revlib.reversible import ReversibleBlock, ReversibleSequence, conv_residual
from revlib.runtime import resolve_device


def variants(depth: int, width: int) -> dict[str, nn.Module]:
    """The mechanisms, all over one set of blocks (so the same weights)."""
    torch.manual_seed(0)
    blocks = [ReversibleBlock(conv_residual(width // 2), conv_residual(width // 2)) for _ in range(depth)]
    budgets = sorted({2, max(2, math.ceil(math.log2(depth)))})
    made: dict[str, nn.Module] = {"plain": nn.Sequential(*blocks)}
    made["every"] = CheckpointedSequence(*blocks, schedule="every")
    made["sqrt"] = CheckpointedSequence(*blocks, schedule="sqrt")
    made |= {f"revolve-{slots}": CheckpointedSequence(*blocks, schedule="revolve", slots=slots) for slots in budgets}
    made["reversible"] = ReversibleSequence(*blocks)
    return made


def counted_advances(model: nn.Module, inputs: torch.Tensor, depth: int) -> int:
    """Block evaluations in one step beyond two per block (the forward pass and the turn), counted by hooks."""
    blocks = [module for module in model.modules() if isinstance(module, ReversibleBlock)]
    calls = [0]
    hooks = [block.f.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for block in blocks]
    forward_backward(model, inputs)
    for hook in hooks:
        hook.remove()
    return calls[0] - 2 * depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: revlib's default device)")
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    device = resolve_device(arguments.device)
    inputs = torch.randn(arguments.batch, arguments.width, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"device {device}, batch {arguments.batch}, {arguments.width} channels on 8x8 inputs, {torch.get_num_threads()} threads")
    print(f"{'blocks':>6} {'variant':>12} {'saved MiB':>10} {'peak MiB':>9} {'ms':>8} {'advances':>9} {'planned':>8} {'time/plain':>11}")
    for depth in arguments.depths:
        models = {name: model.to(device) for name, model in variants(depth, arguments.width).items()}
        calls = {name: functools.partial(forward_backward, model, inputs) for name, model in models.items()}
        times = {name: timing.median for name, timing in compare_times(calls, repeats=arguments.repeats, device=device).items()}
        for name, model in models.items():
            saved = saved_tensor_bytes(model, inputs, exclude=model.parameters())
            peak = peak_memory(forward_backward, model, inputs)
            advances = counted_advances(model, inputs, depth) if isinstance(model, CheckpointedSequence) else 0
            planned = model.plan.advances if isinstance(model, CheckpointedSequence) else 0
            print(f"{depth:>6} {name:>12} {saved / 2**20:10.2f} {peak / 2**20:9.1f} {times[name] * 1e3:8.1f} {advances:9d} "
                  f"{planned:8d} {times[name] / times['plain']:11.2f}")
    print("advances: block evaluations beyond the forward pass and one recomputation per block; the reversible "
          "network recomputes F and G once per block (counted as its turns)")


if __name__ == "__main__":
    main()
