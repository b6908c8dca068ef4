"""Memory, time and recomputation of the checkpointing schedules, against plain and reversible backprop.

Run: ``python benchmarks/checkpoint.py [--device cuda] [--depths 16 64] [--batch 128] [--width 32]``

For every depth N, the same N reversible blocks (as in a RevNet stage: F and G are pre-activation
convolutions on half of ``width`` channels, 8×8 inputs) with the same weights run one forward+backward step
under each memory mechanism:

* plain       — ``nn.Sequential``, ordinary autograd: every block's activations are stored;
* every       — :class:`revlib.checkpoint.CheckpointedSequence`, ``schedule="every"``: every block input;
* sqrt        — ``schedule="sqrt"``: ⌈√N⌉ segment inputs, one segment rebuilt at a time;
* revolve-s   — ``schedule="revolve", slots=s`` for s = ⌈log2 N⌉ and s = 2: the optimal schedule;
* reversible  — :class:`revlib.reversible.ReversibleSequence`: only the output, inputs rebuilt by inversion;
* torch-sqrt  — PyTorch's ``checkpoint_sequential`` with ⌈√N⌉ segments (its last segment runs normally):
  :class:`revlib.pytorch_tools.TorchCheckpointed` with ``segments``;
* torch-sac   — PyTorch's selective activation checkpointing on every block: the convolutions' outputs are
  kept, the pointwise operations (BatchNorm, ReLU, additions) recomputed:
  :class:`revlib.pytorch_tools.SelectiveCheckpointed` with ``policy="matmuls"``;
* offload     — on CUDA only, ordinary autograd with every saved tensor moved to pinned host memory
  (``torch.autograd.graph.save_on_cpu``): :class:`revlib.pytorch_tools.Offloaded`.

It prints MiB saved for backward, MiB peak memory of the step (CUDA allocator, or the peak resident memory of
a fresh process on the CPU), the median milliseconds per step (variants timed in turns), the evaluations
of each block in one step (counted with hooks; for revlib's schedules also the plan's prediction), and the
time relative to plain. Saved bytes are what autograd's saved-tensor hooks see: selective checkpointing keeps
its saved operator outputs in a cache of its own, so for torch-sac only the peak tells the truth.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
from torch import nn

from revlib.checkpoint import CheckpointedSequence
from revlib.measure import compare_times, count_calls, forward_backward, peak_memory, saved_tensor_bytes
from revlib.blocks import conv_residual
from revlib.pytorch_tools import Offloaded, SelectiveCheckpointed, TorchCheckpointed
from revlib.reversible import ReversibleBlock, ReversibleSequence
from revlib.runtime import resolve_device


def variants(depth: int, width: int, device: torch.device) -> dict[str, nn.Module]:
    """The mechanisms, all over one set of blocks (so the same weights)."""
    torch.manual_seed(0)
    blocks = [ReversibleBlock(conv_residual(width // 2), conv_residual(width // 2)) for _ in range(depth)]
    budgets = sorted({2, max(2, math.ceil(math.log2(depth)))})
    made: dict[str, nn.Module] = {"plain": nn.Sequential(*blocks)}
    made["every"] = CheckpointedSequence(*blocks, schedule="every")
    made["sqrt"] = CheckpointedSequence(*blocks, schedule="sqrt")
    made |= {f"revolve-{slots}": CheckpointedSequence(*blocks, schedule="revolve", slots=slots) for slots in budgets}
    made["reversible"] = ReversibleSequence(*blocks)
    made["torch-sqrt"] = TorchCheckpointed(*blocks, segments=math.ceil(math.sqrt(depth)))
    made["torch-sac"] = SelectiveCheckpointed(*blocks, policy="matmuls")
    if device.type == "cuda":
        made["offload"] = Offloaded(*blocks)
    return made


def evaluations(model: nn.Module, inputs: torch.Tensor) -> int:
    """Evaluations of the blocks' F in one forward+backward step, counted with hooks."""
    functions = [module.f for module in model.modules() if isinstance(module, ReversibleBlock)]
    return count_calls(functions, forward_backward, model, inputs)


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
    print(f"{'blocks':>6} {'variant':>12} {'saved MiB':>10} {'peak MiB':>9} {'ms':>8} {'evals/block':>12} {'planned':>8} {'time/plain':>11}")
    for depth in arguments.depths:
        models = {name: model.to(device) for name, model in variants(depth, arguments.width, device).items()}
        calls = {name: functools.partial(forward_backward, model, inputs) for name, model in models.items()}
        times = {name: timing.median for name, timing in compare_times(calls, repeats=arguments.repeats, device=device).items()}
        for name, model in models.items():
            saved = saved_tensor_bytes(model, inputs, exclude=model.parameters())
            peak = peak_memory(forward_backward, model, inputs)
            counted = evaluations(model, inputs) / depth
            planned = f"{model.plan.evaluations / depth:8.2f}" if isinstance(model, CheckpointedSequence) else f"{'':>8}"
            shown_saved = f"{'n/a':>10}" if name == "torch-sac" else f"{saved / 2**20:10.2f}"
            print(f"{depth:>6} {name:>12} {shown_saved} {peak / 2**20:9.1f} {times[name] * 1e3:8.1f} {counted:12.2f} "
                  f"{planned} {times[name] / times['plain']:11.2f}")


if __name__ == "__main__":
    main()
