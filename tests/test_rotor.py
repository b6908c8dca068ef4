"""Tests of revlib._rotor: the dynamic programme for chains of unequal blocks, against a search over every
plan, against revolve, and its simulator and arguments."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from revlib._rotor import (
    ChainPlan,
    Simulation,
    _in_units,
    _time_table,
    _validated_chain,
    checkpoint_plan_actions,
    exhaustive_fastest,
    least_peak_bytes,
    optimal_chain_plan,
    simulate,
)
from revlib.checkpoint import checkpoint_plan, griewank_steps, optimal_recomputations


def random_chain(rng: random.Random, steps: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Unequal integer times and sizes (small, so that the memory units are the bytes themselves)."""
    return (
        [rng.randint(1, 5) for _ in range(steps)],  # forward_time
        [rng.randint(1, 6) for _ in range(steps)],  # backward_time
        [rng.randint(1, 4) for _ in range(steps + 1)],  # input_bytes
        [rng.randint(0, 5) for _ in range(steps)],  # activation_bytes
    )


def least_budget(chain: tuple[list[int], ...], allow_record: bool = True) -> int:
    """The least budget the dynamic programme accepts, read from its error at budget 1 (or 1 itself)."""
    try:
        optimal_chain_plan(*chain, 1, allow_record=allow_record)
    except ValueError as error:
        return int(str(error).split("is ")[-1].split(" bytes")[0])
    return 1


# ---------------------------------------------------------------------------------------------------------
# Optimality: the dynamic programme against the search over every plan


INSTANCES = [(steps, seed) for steps in (1, 2, 3, 4) for seed in range(3)] + [(5, 0), (5, 1)]


@pytest.mark.parametrize("steps, seed", INSTANCES)
@pytest.mark.parametrize("allow_record", [True, False])
def test_programme_reaches_the_exhaustive_optimum_at_every_budget(steps: int, seed: int, allow_record: bool) -> None:
    """The fastest persistent plan (stored inputs kept until their block is turned), found by searching every
    one, at budgets from the least to more than plain backprop needs; the least budget is that of all plans."""
    chain = random_chain(random.Random(1000 * steps + seed), steps)
    least = least_budget(chain, allow_record)
    assert exhaustive_fastest(*chain, least - 1, allow_record) == math.inf, "the least budget is the least of every plan"
    everything = sum(chain[2]) + sum(chain[3]) + max(chain[2]) * 4  # more than plain backprop holds
    budgets = sorted({least, least + 1, least + 2, least + 4, (least + everything) // 2, everything})
    for budget in budgets:
        plan = optimal_chain_plan(*chain, budget, allow_record=allow_record)
        assert plan.unit_bytes == 1, "integer sizes and a budget under the units: the exact problem"
        assert plan.time == exhaustive_fastest(*chain, budget, allow_record, persistent=True), (budget, plan)
        simulated = simulate(plan.forward, plan.backward, *chain)
        assert simulated.time == plan.time and simulated.peak_bytes == plan.peak_bytes <= budget
        if not allow_record:
            assert plan.records == 0
        if steps <= 4:
            assert plan.time >= exhaustive_fastest(*chain, budget, allow_record)


def test_a_plan_that_drops_an_input_early_can_be_faster() -> None:
    """The limit of the persistent family. Turning block 2 needs 6 of the 7 bytes, so only x_0 (1 byte) may be
    kept beside it, while the forward pass and the turn of block 3 leave room for x_1 as well. The fastest
    plan keeps x_1 from the forward pass, rebuilds x_2 from it, *drops it* to turn block 2, and rebuilds it
    from x_0 for block 1: 53. A persistent plan must rebuild x_2 from x_0: 57, the programme's answer."""
    chain = ([4, 4, 2, 4], [2, 6, 4, 5], [1, 1, 2, 0, 2], [0, 0, 2, 1])
    plan = optimal_chain_plan(*chain, 7, allow_record=False)
    assert plan.time == exhaustive_fastest(*chain, 7, False, persistent=True) == 57
    assert exhaustive_fastest(*chain, 7, False) == 53
    forward = (("store", 0), ("advance", 0), ("store", 1), ("advance", 1), ("advance", 2), ("store", 3), ("advance", 3))
    backward = (("restore", 3), ("turn", 3), ("drop", 3), ("restore", 1), ("drop", 1), ("advance", 1), ("turn", 2),
                ("restore", 0), ("advance", 0), ("turn", 1), ("restore", 0), ("turn", 0))
    assert simulate(forward, backward, *chain) == Simulation(time=53, peak_bytes=7)


def test_more_memory_is_never_slower() -> None:
    chain = random_chain(random.Random(7), 12)
    least = least_budget(chain)
    times = [optimal_chain_plan(*chain, budget).time for budget in range(least, least + 60, 3)]
    assert times == sorted(times, reverse=True) and times[-1] < times[0]


# ---------------------------------------------------------------------------------------------------------
# Special cases: revolve, plain backprop, records


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6])
def test_equal_blocks_without_records_reduce_to_griewank(slots: int) -> None:
    """Equal blocks (a bytes each input, g each graph), no records, B = (s + 4) a + g: a turn holds s kept
    inputs, its own input and output, two gradients and the graph. The advances are Griewank's count for N
    steps whose first sweep ends with x_{N−1} in hand, t(N, s) − (N − 1), which is revolve's A(N − 1, s):
    between the passes (no graph, one gradient) the forward pass can keep x_{N−1} too. Revolve's own plan
    (nothing in hand after the forward pass) fits the same budget with A(N, s) advances."""
    size, graph, forward, backward = 2, 1, 1.0, 3.0
    budget = (slots + 4) * size + graph
    for steps in range(2, 31):
        chain = ([forward] * steps, [backward] * steps, [size] * (steps + 1), [graph] * steps)
        plan = optimal_chain_plan(*chain, budget, allow_record=False)
        assert plan.advances == griewank_steps(steps, slots) - (steps - 1) == optimal_recomputations(steps - 1, slots), (steps, slots)
        assert plan.time == steps * forward + plan.advances * forward + steps * (forward + backward)
        revolve = simulate(*checkpoint_plan_actions(checkpoint_plan(steps, "revolve", slots)), *chain)
        assert revolve.peak_bytes <= budget
        assert revolve.time == plan.time + (optimal_recomputations(steps, slots) - plan.advances) * forward


def test_a_large_budget_records_every_block() -> None:
    """Plain backprop: every block recorded in the forward pass, turned through its graph, nothing rerun."""
    chain = random_chain(random.Random(3), 10)
    forward_time, backward_time, input_bytes, activation_bytes = chain
    plan = optimal_chain_plan(*chain, 10**6)
    assert plan.forward == tuple(("record", i) for i in range(10))
    assert plan.backward == tuple(("turn", i) for i in reversed(range(10)))
    assert plan.time == sum(forward_time) + sum(backward_time) and plan.advances == 0
    # between the passes every input, every graph and δ_N are held: the peak of plain backprop
    assert plan.peak_bytes >= sum(input_bytes) + sum(activation_bytes) + input_bytes[-1]


def test_recording_a_block_with_a_small_graph_beats_recomputing_it() -> None:
    """Block 1 is slow and its graph holds nothing besides its input and output; block 0's graph is large.
    Within 32 bytes the plan keeps block 1's graph instead of running it again, and not block 0's."""
    chain = ([1, 20, 1], [1, 1, 1], [4, 4, 4, 4], [8, 0, 8])
    checkpointing = optimal_chain_plan(*chain, 32, allow_record=False)
    recording = optimal_chain_plan(*chain, 32)
    assert (recording.time, checkpointing.time) == (26, 47)
    assert recording.forward == (("store", 0), ("advance", 0), ("record", 1), ("record", 2))
    assert recording.advances == 0 and ("record", 0) not in recording.backward, "block 0 is turned by running it again"
    assert checkpointing.time - recording.time == 20 + 1, "without records blocks 1 and 2 run again in their turns"
    assert recording.time == exhaustive_fastest(*chain, 32) and checkpointing.time == exhaustive_fastest(*chain, 32, False)


# ---------------------------------------------------------------------------------------------------------
# The headline: an unequal chain, faster than revolve at the same budget


MiB = 2**20


def resnet_chain(per_stage: int = 4, graph_per_input: float = 1.0) -> tuple[list[float], list[float], list[int], list[int]]:
    """Four stages of ``per_stage`` blocks; each stage halves the resolution and doubles the width, so block
    inputs halve in bytes (8, 4, 2, 1 MiB) and every block costs the same time (forward 1, backward 2)."""
    input_bytes = [8 * MiB] * (per_stage + 1) + [4 * MiB] * per_stage + [2 * MiB] * per_stage + [MiB] * per_stage
    steps = len(input_bytes) - 1
    return [1.0] * steps, [2.0] * steps, input_bytes, [int(graph_per_input * size) for size in input_bytes[:-1]]


def fastest_revolve_within(chain: tuple, budget: float) -> tuple[float, int]:
    """The fastest revolve plan (over its slot counts) whose peak under the model fits the budget."""
    steps = len(chain[0])
    fitting = []
    for slots in range(1, steps + 1):
        simulated = simulate(*checkpoint_plan_actions(checkpoint_plan(steps, "revolve", slots)), *chain)
        if simulated.peak_bytes <= budget:
            fitting.append((simulated.time, slots))
    return min(fitting)


def fastest_size_blind_within(chain: tuple, budget: float) -> float:
    """The fastest of the programme's plans for *equal* blocks (Griewank's, with s = 1 … N slots: unit inputs,
    unit graphs, budget s + 5), run on the real sizes, that fits: what knowing the sizes adds."""
    steps = len(chain[0])
    times = []
    for slots in range(1, steps + 1):
        blind = optimal_chain_plan(chain[0], chain[1], [1] * (steps + 1), [1] * steps, slots + 5, allow_record=False)
        simulated = simulate(blind.forward, blind.backward, *chain)
        if simulated.peak_bytes <= budget:
            times.append(simulated.time)
    return min(times)


@pytest.mark.parametrize("per_stage, budget_mib", [(4, 56), (4, 64), (8, 56), (8, 64), (8, 80)])
def test_unequal_chain_is_faster_than_revolve_at_the_same_budget(per_stage: int, budget_mib: int) -> None:
    """With 32 blocks and 64 MiB: revolve's best 193, the equal-block plans' best 190, the programme without
    records 142, with records 125; plain backprop takes 96 but needs 257 MiB."""
    chain = resnet_chain(per_stage)
    budget = budget_mib * MiB
    revolve_time, _ = fastest_revolve_within(chain, budget)
    checkpointing = optimal_chain_plan(*chain, budget, allow_record=False)
    recording = optimal_chain_plan(*chain, budget)
    assert recording.time < checkpointing.time < min(revolve_time, fastest_size_blind_within(chain, budget))
    assert recording.peak_bytes <= budget and checkpointing.peak_bytes <= budget
    if (per_stage, budget_mib) == (8, 64):
        assert (revolve_time, fastest_size_blind_within(chain, budget), checkpointing.time, recording.time) == (193, 190, 142, 125)


# ---------------------------------------------------------------------------------------------------------
# The simulator


def test_simulator_counts_the_memory_model_by_hand() -> None:
    """Two blocks, x_0 kept, block 1 recorded: every moment's bytes written out (a recorded graph holds its
    input and its output)."""
    chain = ([1, 2], [3, 4], [10, 20, 30], [5, 7])  # f, b, a (x_0, x_1, x_2), g
    forward = (("store", 0), ("advance", 0), ("record", 1))
    backward = (("turn", 1), ("restore", 0), ("turn", 0), ("drop", 0))
    # advance 0: x_0 + x_1 = 30; record 1: x_0 + x_1 + g_1 + x_2 = 67; the loss: 67 + δ_2 = 97;
    # turn 1 through its graph (which holds x_1 and x_2): x_0 + x_1 + g_1 + x_2 + δ_2 + δ_1 = 117;
    # turn 0 rebuilt: x_0 + δ_1 + g_0 + x_1 + δ_0 = 10 + 20 + 5 + 20 + 10 = 65
    simulated = simulate(forward, backward, *chain)
    assert simulated.peak_bytes == 117 and simulated.time == 1 + 2 + 4 + (1 + 3)


@pytest.mark.parametrize("forward, backward, match", [
    ((("advance", 0), ("advance", 1)), (("turn", 1), ("turn", 0)), r"backward action 0: turn 1: block 1 has no recorded graph and x_1 is not current \(current: none\)"),
    ((("store", 0), ("advance", 0), ("advance", 1)), (("turn", 0),), r"backward action 0: turn 0: .* the next is block 1"),
    ((("store", 0), ("advance", 0), ("advance", 1)), (("restore", 1),), r"restore 1: x_1 is not kept"),
    ((("store", 0), ("advance", 0), ("advance", 1)), (("restore", 0), ("advance", 1)), r"advance 1: x_1 is not current \(current: x_0\)"),
    ((("store", 0), ("advance", 0)), (), r"forward pass ends with x_1 current, not the output x_2"),
    ((("store", 0), ("restore", 0), ("advance", 0), ("advance", 1)), (), r"forward action 1 .* only stores, advances and records"),
    ((("record", 0), ("advance", 1)), (("restore", 0), ("advance", 0), ("turn", 1), ("turn", 0)), r"restore 0: x_0 is not kept"),
    ((("record", 0), ("record", 1)), (("turn", 1),), r"ends before turning blocks \[0\]"),
    ((("record", 0), ("record", 1)), (("turn", 1), ("turn", 0), ("turn", 0)), r"the next is no block"),
    ((("record", 0), ("record", 1)), (("jump", 1),), r"unknown action 'jump'"),
    ((("record", 0), ("record", 1)), ("turn",), r"an action is a pair"),
])
def test_simulator_rejects_invalid_plans(forward: tuple, backward: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simulate(forward, backward, [1, 1], [1, 1], [1, 1, 1], [1, 1])


def test_revolve_plans_are_valid_in_the_model() -> None:
    for steps, slots in itertools.product((1, 5, 17), (1, 2, 4)):
        chain = ([1] * steps, [2] * steps, [1] * (steps + 1), [0] * steps)
        simulated = simulate(*checkpoint_plan_actions(checkpoint_plan(steps, "revolve", slots)), *chain)
        assert simulated.time == steps + optimal_recomputations(steps, slots) + 3 * steps


# ---------------------------------------------------------------------------------------------------------
# The discretisation


def test_coarse_units_never_exceed_the_budget_and_cost_little() -> None:
    chain = resnet_chain(4)
    exact = optimal_chain_plan(*chain, 64 * MiB, units=64 * 2**10)  # a unit of 1 KiB: sizes are whole units
    assert exact.unit_bytes == 2**10
    for units in (50, 200, 500):
        plan = optimal_chain_plan(*chain, 64 * MiB + 12345, units=units)
        assert plan.peak_bytes <= 64 * MiB + 12345 and plan.time >= exact.time
    assert optimal_chain_plan(*chain, 64 * MiB, units=500).time <= exact.time * 1.1


def test_rounding_that_leaves_no_plan_falls_back_to_the_least_peak() -> None:
    chain = ([1, 1, 1], [1, 1, 1], [1000, 1001, 1001, 1001], [0, 0, 0])
    least = least_budget(chain)
    plan = optimal_chain_plan(*chain, least, units=7)  # units of about 600 bytes: every size rounds up a lot
    assert plan.peak_bytes == least
    assert isinstance(plan, ChainPlan) and plan.steps == 3


@pytest.mark.parametrize("allow_record", [True, False])
def test_plain_backprop_is_the_plan_wherever_it_fits(allow_record: bool) -> None:
    """Every block runs at least once and is turned once, so the plan that runs nothing again (recording every
    block; without records, storing every input) is the fastest there is. At its own peak, with sizes that no
    unit divides, the rounded table alone misses it (the control: it finds a slower plan), so the programme
    must return it before the table."""
    rng = random.Random(7)
    steps = 10
    chain = (
        [rng.uniform(0.5, 2.0) for _ in range(steps)],
        [rng.uniform(1.0, 4.0) for _ in range(steps)],
        [rng.uniform(1e5, 3e5) for _ in range(steps + 1)],
        [rng.uniform(1e5, 9e5) for _ in range(steps)],
    )
    if allow_record:
        passes = tuple(("record", i) for i in range(steps)), tuple(("turn", i) for i in reversed(range(steps)))
    else:
        forward = tuple(action for i in range(steps) for action in (("store", i), ("advance", i)))
        passes = forward, tuple(action for i in reversed(range(steps)) for action in (("restore", i), ("turn", i), ("drop", i)))
    fastest = simulate(*passes, *chain)
    assert fastest.time == pytest.approx(sum(chain[0]) * (1 if allow_record else 2) + sum(chain[1]))
    plan = optimal_chain_plan(*chain, fastest.peak_bytes, allow_record=allow_record)
    assert (plan.forward, plan.backward) == passes and plan.time == fastest.time
    # the control: the table on the rounded sizes, at the same budget, finds only slower plans
    unit = Fraction(fastest.peak_bytes) / 500
    validated = _validated_chain(*chain)
    sizes = _in_units(validated.a, unit), _in_units(validated.g, unit)
    cost, _ = _time_table(validated, *sizes, 500, allow_record)
    assert cost[0, steps + 1, 500] > fastest.time * 1.001


def test_sizes_with_fractions_of_a_byte_fit_the_least_budget_exactly() -> None:
    # ten alike blocks whose sizes are means of whole bytes (137.6 KiB inputs, 315.2 KiB graphs): in floating
    # point the least peak and the plan's simulated peak summed the same sizes in different orders and
    # disagreed in the last bit, so the plan at the least budget "exceeded" it
    sizes = [1376 * 1024 / 10] * 10 + [5120], [3152 * 1024 / 10] * 10
    chain = [0.9e-3] * 10, [1.9e-3] * 10, *sizes
    least = least_peak_bytes(*chain)
    for budget in (least, least * (1 + 1e-15), least * 1.02):
        plan = optimal_chain_plan(*chain, budget)
        assert plan.peak_bytes <= budget
        assert simulate(plan.forward, plan.backward, *chain).peak_bytes == plan.peak_bytes
    assert optimal_chain_plan(*chain, least).peak_bytes == least
    with pytest.raises(ValueError, match="no plan fits"):
        optimal_chain_plan(*chain, least * (1 - 1e-12))


# ---------------------------------------------------------------------------------------------------------
# Bad input


GOOD = ([1, 1], [1, 1], [1, 1, 1], [1, 1])


@pytest.mark.parametrize("chain, budget, kwargs, match", [
    (([1], [1, 1], [1, 1, 1], [1, 1]), 100, {}, r"backward_time must have 1 entries for 1 blocks"),
    (([1, 1], [1, 1], [1, 1], [1, 1]), 100, {}, r"input_bytes must have 3 entries .* needs the output's size"),
    (([1, 1], [1, 1], [1, 1, 1], [1]), 100, {}, r"activation_bytes must have 2 entries"),
    (([], [], [1], []), 100, {}, r"forward_time must have one entry per block"),
    (([1, -1], [1, 1], [1, 1, 1], [1, 1]), 100, {}, r"forward_time\[1\] must be finite and non-negative, got -1"),
    (([1, 1], [1, math.nan], [1, 1, 1], [1, 1]), 100, {}, r"backward_time\[1\] must be finite"),
    (([1, 1], [1, 1], [1, -2, 1], [1, 1]), 100, {}, r"input_bytes\[1\] must be finite and non-negative, got -2"),
    (([1, 1], [1, 1], [1, 1, 1], [1, "8"]), 100, {}, r"activation_bytes\[1\] must be a number"),
    ((5, [1, 1], [1, 1, 1], [1, 1]), 100, {}, r"forward_time must be a sequence"),
    (GOOD, 0, {}, r"budget must be a positive number of bytes, got 0"),
    (GOOD, -3.0, {}, r"budget must be a positive number"),
    (GOOD, math.inf, {}, r"budget must be a positive number"),
    (GOOD, 5, {}, r"no plan fits in budget=5 bytes: the least peak of any plan is 6 bytes"),
    (GOOD, 100, {"units": 0}, r"units must be a positive integer, got 0"),
    (GOOD, 100, {"allow_record": "yes"}, r"allow_record must be True or False"),
])
def test_bad_arguments_name_the_argument(chain: tuple, budget: float, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        optimal_chain_plan(*chain, budget, **kwargs)
