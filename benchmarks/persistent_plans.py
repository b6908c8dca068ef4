"""How often a plan that drops an input early beats the best persistent plan, on random small chains.

Run: ``python benchmarks/persistent_plans.py [--chains 200] [--blocks 2 3 4] [--seed 0]``

``checkpoint_plan(..., schedule="optimal")`` solves the dynamic programme of ``revlib._rotor``, which finds
the fastest *persistent* plan: one that keeps every stored input until the last block that needs it is
turned. A plan that drops an input early and rebuilds it later can be faster where memory is tighter at some
turns than at others. For ``--chains`` random chains of each length (integer times and sizes, small enough
that every budget is solved exactly, in bytes), at every whole budget from the least any plan fits to plain
backprop's peak, this compares the programme's time with the fastest of *all* plans, found by a search over
every state of the memory model (``revlib._rotor.exhaustive_fastest``). It prints, per chain length, the
(chain, budget) pairs, how many of them a non-persistent plan wins, by how much at most, and whether the
least budget of the persistent plans is that of all plans.
"""

from __future__ import annotations

import argparse
import math
import random

from revlib._rotor import exhaustive_fastest, least_peak_bytes, optimal_chain_plan
from revlib.checkpoint import BlockCosts


def random_chain(rng: random.Random, blocks: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Forward times 1-5, backward times 1-6, input sizes 1-4 and graph sizes 0-5 (bytes), drawn uniformly."""
    return (
        [rng.randint(1, 5) for _ in range(blocks)],
        [rng.randint(1, 6) for _ in range(blocks)],
        [rng.randint(1, 4) for _ in range(blocks + 1)],
        [rng.randint(0, 5) for _ in range(blocks)],
    )


def survey(blocks: int, chains: int, rng: random.Random) -> dict[str, float]:
    pairs = wins = least_agree = 0
    largest = 0.0
    for _ in range(chains):
        chain = random_chain(rng, blocks)
        top = int(BlockCosts(*chain).backprop.peak_bytes)
        least = int(least_peak_bytes(*chain))
        least_agree += math.isinf(exhaustive_fastest(*chain, least - 1))
        for budget in range(least, top + 1):
            persistent = optimal_chain_plan(*chain, budget).time
            fastest = exhaustive_fastest(*chain, budget)
            pairs += 1
            if fastest < persistent:
                wins += 1
                largest = max(largest, persistent / fastest - 1)
    return {"pairs": pairs, "wins": wins, "largest": largest, "least_agree": least_agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=200, help="random chains per length")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 3, 4], help="chain lengths")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    rng = random.Random(arguments.seed)
    print("| blocks | chains | (chain, budget) pairs | a non-persistent plan faster | by at most | same least budget |")
    print("|---:|---:|---:|---:|---:|---:|")
    for blocks in arguments.blocks:
        found = survey(blocks, arguments.chains, rng)
        print(
            f"| {blocks} | {arguments.chains} | {found['pairs']} | {found['wins']} | {100 * found['largest']:.0f} % "
            f"| {found['least_agree']} of {arguments.chains} |"
        )


if __name__ == "__main__":
    main()
