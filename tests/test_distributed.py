"""DistributedDataParallel: memory-saving models trained on two processes get one process's gradients.

Two processes on the CPU (the ``gloo`` backend) each take half of a batch; DDP averages their gradients,
which must equal the gradient of the mean loss over the whole batch computed by one process — also when each
process accumulates two micro-batches, the first under ``no_sync``. The models run in eval mode so that
BatchNorm uses its running statistics: with batch statistics each half would be normalised differently and
the two gradients would legitimately differ (SyncBatchNorm exists for that).
"""

import functools
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from revlib.adjoint import ODEResNet
from revlib.checkpoint import CheckpointedSequence
from revlib.reversible import RevNet

WORLD = 2
BATCH = 8
MODELS = ("reversible", "checkpointed", "adjoint")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "reversible":
        model = RevNet((4, 8), 2)
    elif name == "checkpointed":
        model = RevNet((4, 8), 2, stage=functools.partial(CheckpointedSequence, schedule="every"))
    else:
        residuals = [nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 64)) for _ in range(6)]
        model = nn.Sequential(nn.Flatten(), ODEResNet(*residuals, scheme="heun"), nn.Linear(64, 10))
    return model.double().eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 1, 8, 8, generator=generator, dtype=torch.float64), torch.randint(0, 10, (BATCH,), generator=generator)


def whole_batch_gradients(name: str) -> list[torch.Tensor]:
    model = build(name)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


def worker(rank: int, accumulate: bool, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = batch()
    x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]  # this process's half
    gradients = {}
    for name in MODELS:
        model = DistributedDataParallel(build(name))
        if accumulate:
            with model.no_sync():  # first micro-batch: gradients stay local
                (nn.functional.cross_entropy(model(x[: len(x) // 2]), y[: len(y) // 2]) / 2).backward()
            (nn.functional.cross_entropy(model(x[len(x) // 2 :]), y[len(y) // 2 :]) / 2).backward()  # synchronised
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        gradients[name] = [p.grad for p in model.module.parameters()]
    torch.save(gradients, f"{out}.{rank}.partial")
    os.replace(f"{out}.{rank}.partial", f"{out}.{rank}")  # complete once it exists
    dist.destroy_process_group()


def run_workers(accumulate: bool, store: str, out: str, limit: float = 600.0, grace: float = 30.0) -> None:
    """Run the WORLD workers; a worker that raises fails the test. gloo's teardown can hang a process after
    it has saved its gradients: once every rank's file exists, stragglers get ``grace`` seconds, then are
    killed. Nothing waits longer than ``limit`` seconds."""
    context = mp.spawn(worker, args=(accumulate, store, out), nprocs=WORLD, join=False)
    start, saved = time.monotonic(), None
    while not context.join(timeout=1):
        now = time.monotonic()
        if saved is None and all(Path(f"{out}.{rank}").exists() for rank in range(WORLD)):
            saved = now
        if (saved is not None and now > saved + grace) or now > start + limit:
            for process in context.processes:
                process.kill()
            break
    missing = [rank for rank in range(WORLD) if not Path(f"{out}.{rank}").exists()]
    assert not missing, f"ranks {missing} saved no gradients within {limit:.0f} s"


@pytest.mark.parametrize("accumulate", [False, True], ids=["one-step", "no_sync-accumulation"])
def test_ddp_on_two_processes_matches_one_process(accumulate: bool, tmp_path: Path) -> None:
    out = str(tmp_path / "gradients")
    run_workers(accumulate, str(tmp_path / "store"), out)
    for name in MODELS:
        expected = whole_batch_gradients(name)
        for rank in range(WORLD):
            received = torch.load(f"{out}.{rank}")[name]
            assert len(received) == len(expected)
            for index, (got, want) in enumerate(zip(received, expected)):
                assert got is not None, f"{name}, rank {rank}: parameter {index} received no gradient under DDP"
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{name}, rank {rank}, parameter {index}")
