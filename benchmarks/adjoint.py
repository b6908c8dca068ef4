"""Memory, time and gradient error of adjoint backprop for ODE-ResNets, against backprop and torchdiffeq.

Run: ``python benchmarks/adjoint.py [--device cuda] [--depths 8 32 128 256] [--batch 256] [--width 64]
[--sizes 64x16 256x64 1024x256 1024x512] [--time-depths 8 32] [--iterations 1 2] [--skip-memory]``

For every depth N (residual functions Linear → tanh → Linear of the given width, weights smooth in depth,
Euler steps 1/N) it prints, for four ways of differentiating the *same* network:

* backprop     — :class:`revlib.adjoint.ODEResNet` with ordinary autograd (stores every step);
* adjoint      — the same with ``memory_saving=True`` (stores the output, rebuilds by reversed Euler steps);
* adjoint heun — Heun steps with the adjoint (a different, second-order network: its error is against
  its own backprop gradient);
* torchdiffeq  — ``torchdiffeq.odeint_adjoint`` with fixed-step Euler on the same vector field
  (the continuous adjoint);

the MiB saved for backward, the peak memory of one forward+backward step (``revlib.forward_backward``;
CUDA allocator, or the peak resident memory of a fresh process on the CPU), the median time of that step, and the relative error of the
parameter gradient of ½‖x_N‖² against backprop.

A second table sets each adjoint's time against its operation count (``ODEResNet``'s docstring): per step
with s stages (1 Euler, 2 Heun) and k rebuild iterates the adjoint evaluates the residual functions s(2 + k)
times and takes backprop's s vector-Jacobian products (two evaluations each), so its time should be
(4 + k)/3 times backprop's through the same network. For every scheme and k (``--iterations``), depth
(``--time-depths``) and batch×width (``--sizes``) it prints the medians of backprop and of the adjoint
(forward+backward, all variants of one size and depth timed in turns), their measured ratio, the predicted
one, measured/predicted, the excess over the prediction per step in µs (what the arithmetic does not
explain: Python calls, autograd's per-call cost) and the relative gradient error. Where the arithmetic
dominates (wide layers, large batches) measured/predicted tends to 1; where it does not, the fixed excess
per step dominates.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from revlib.adjoint import ODEResNet, TorchdiffeqResNet, gradient_error, smooth_in_depth_, tanh_residuals
from revlib.measure import compare_times, forward_backward, peak_memory, saved_tensor_bytes
from revlib.runtime import resolve_device
from revlib.verify import flat_gradient, relative_error


def torchdiffeq_error(model: ODEResNet, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> float:
    """Relative error of ``odeint_adjoint``'s parameter gradient against backprop through ``model``."""
    parameters = list(model.parameters())
    exact, theirs = (flat_gradient(network, inputs, loss_fn, parameters) for network in (model, TorchdiffeqResNet(model)))
    return relative_error(theirs, exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: revlib's default device)")
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32, 128, 256])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["64x16", "256x64", "1024x256", "1024x512"], help="batch×width of the time table")
    parser.add_argument("--time-depths", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 2], help="rebuild iterates k of the time table")
    parser.add_argument("--skip-memory", action="store_true", help="print the time table only")
    arguments = parser.parse_args()
    device = resolve_device(arguments.device)
    if not arguments.skip_memory:
        memory_table(arguments, device)
    time_table(arguments, device)


def time_table(arguments: argparse.Namespace, device: torch.device) -> None:
    """Each adjoint's time against backprop's and against its operation count (4 + k)/3, with its gradient error."""
    squared = lambda out: 0.5 * out.pow(2).sum()  # noqa: E731
    print(f"\ntime against the operation count: device {device}, float32, {torch.get_num_threads()} threads, median of {arguments.repeats}")
    print("| scheme | k | depth | batch×width | backprop ms | adjoint ms | ratio | predicted | ratio/predicted | excess µs/step | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in arguments.sizes:
        batch, width = (int(part) for part in size.split("x"))
        for depth in arguments.time_depths:
            torch.manual_seed(0)
            residuals = tanh_residuals(depth, width)
            smooth_in_depth_(ODEResNet(*residuals), generator=torch.Generator().manual_seed(0))
            for f in residuals:
                f.to(device)
            inputs = torch.randn(batch, width, generator=torch.Generator().manual_seed(0)).to(device)
            variants: dict[tuple[str, int], ODEResNet] = {}
            for scheme in ("euler", "heun"):
                variants[scheme, 0] = ODEResNet(*residuals, scheme=scheme, memory_saving=False)  # k = 0: backprop
                for k in arguments.iterations:
                    variants[scheme, k] = ODEResNet(*residuals, scheme=scheme, rebuild_iterations=k)
            calls = {key: functools.partial(forward_backward, variant, inputs) for key, variant in variants.items()}
            times = compare_times(calls, warmup=1, repeats=arguments.repeats, device=device)  # type: ignore[arg-type]
            for (scheme, k), variant in variants.items():
                if k == 0:
                    continue
                backprop, adjoint = times[scheme, 0].median, times[scheme, k].median  # type: ignore[index]
                ratio, predicted = adjoint / backprop, (4 + k) / 3
                excess = (adjoint - predicted * backprop) / depth * 1e6
                error = gradient_error(variant, inputs, squared)
                print(f"| {scheme} | {k} | {depth} | {batch}×{width} | {backprop * 1e3:.1f} | {adjoint * 1e3:.1f} | {ratio:.2f} | "
                      f"{predicted:.2f} | {ratio / predicted:.2f} | {excess:.0f} | {error:.1e} |")
    print("ratio = adjoint/backprop through the same network (medians, timed in turns); predicted = (4 + k)/3; "
          "excess = (adjoint − predicted × backprop)/depth; error = relative gradient error against backprop")


def memory_table(arguments: argparse.Namespace, device: torch.device) -> None:
    """Saved and peak memory, time and gradient error of backprop, the Euler and Heun adjoints and torchdiffeq."""
    inputs = torch.randn(arguments.batch, arguments.width, generator=torch.Generator().manual_seed(0)).to(device)
    squared = lambda out: 0.5 * out.pow(2).sum()  # noqa: E731
    print(f"device {device}, batch {arguments.batch}, width {arguments.width}, {torch.get_num_threads()} threads")
    names = ("backprop", "adjoint", "adjoint heun", "torchdiffeq")
    header = f"{'N':>5} | " + " | ".join(f"{name:>12} saved  peak     ms   error" for name in names)
    print(header)
    print("-" * len(header))
    for depth in arguments.depths:
        torch.manual_seed(0)
        model = smooth_in_depth_(ODEResNet(*tanh_residuals(depth, arguments.width), memory_saving=False).to(device), generator=torch.Generator().manual_seed(0))
        variants: dict[str, nn.Module] = {
            "backprop": model,
            "adjoint": ODEResNet(*model.residuals),
            "adjoint heun": ODEResNet(*model.residuals, scheme="heun"),
            "torchdiffeq": TorchdiffeqResNet(model),
        }
        errors = {
            "backprop": 0.0,
            "adjoint": gradient_error(ODEResNet(*model.residuals), inputs, squared),
            "adjoint heun": gradient_error(ODEResNet(*model.residuals, scheme="heun"), inputs, squared),
            "torchdiffeq": torchdiffeq_error(model, inputs, squared),
        }
        calls = {name: functools.partial(forward_backward, variant, inputs) for name, variant in variants.items()}
        times = compare_times(calls, repeats=arguments.repeats, device=device)
        row = []
        for name, variant in variants.items():
            saved = saved_tensor_bytes(variant, inputs.clone().requires_grad_(True), exclude=variant.parameters())
            peak = peak_memory(forward_backward, variant, inputs, device=device)
            row.append(f"{'':>12} {saved / 2**20:5.2f} {peak / 2**20:5.1f} {times[name].median * 1e3:6.1f} {errors[name]:7.1e}")
        print(f"{depth:>5} | " + " | ".join(row))
    print("saved and peak in MiB; ms = median time of one forward+backward step; error = relative gradient error against backprop")


if __name__ == "__main__":
    main()
