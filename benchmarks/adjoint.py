"""Memory, time and gradient error of adjoint backprop for ODE-ResNets, against backprop and torchdiffeq.

Run: ``python benchmarks/adjoint.py [--device cuda] [--depths 8 32 128 256] [--batch 256] [--width 64]``

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
    arguments = parser.parse_args()
    device = resolve_device(arguments.device)
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
