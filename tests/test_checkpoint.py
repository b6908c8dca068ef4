"""Tests of revlib.checkpoint: the optimal number of recomputations, the plans, and CheckpointedSequence."""

from __future__ import annotations

import heapq
import itertools
from functools import lru_cache

import pytest
import torch
from torch import nn

from allocations import Marked, added_peak, live_at_marks
from revlib.checkpoint import (
    BlockCosts,
    CheckpointPlan,
    CheckpointedSequence,
    check_plan,
    checkpoint_plan,
    griewank_steps,
    optimal_recomputations,
)
from revlib.measure import count_calls_per_module, saved_tensor_bytes
from revlib.verify import relative_error


def exhaustive_fewest_advances(steps: int, slots: int) -> int:
    """The fewest advances over *all* schedules, by a shortest-path search over every state of the problem.

    A state is (kept inputs, current input or None, blocks still to reverse). The forward pass may keep any
    set of at most ``slots`` inputs that includes x_0; the backward pass may restore, keep (up to ``slots``),
    drop, advance (cost 1) and turn the last unreversed block when its input is current.
    """
    start = [(frozenset(kept), None, steps) for size in range(1, slots + 1)
             for kept in ({0, *rest} for rest in itertools.combinations(range(1, steps), size - 1))]
    queue = [(0, index, state) for index, state in enumerate(start)]
    counter = itertools.count(len(queue))
    seen: set = set()
    while queue:
        cost, _, (kept, current, left) = heapq.heappop(queue)
        if left == 0:
            return cost
        if (kept, current, left) in seen:
            continue
        seen.add((kept, current, left))
        moves = [(0, (kept, position, left)) for position in kept]  # restore
        if current is not None:
            if current == left - 1:
                moves.append((0, (kept, None, left - 1)))  # turn the last unreversed block
            if current + 1 < left:
                moves.append((1, (kept, current + 1, left)))  # advance
            if current not in kept and len(kept) < slots:
                moves.append((0, (kept | {current}, current, left)))  # keep
        moves += [(0, (kept - {position}, current, left)) for position in kept if position != 0]  # drop
        for step, state in moves:
            heapq.heappush(queue, (cost + step, next(counter), state))
    raise AssertionError("no schedule reverses the blocks")


@lru_cache(maxsize=None)
def griewank_recursion(steps: int, checkpoints: int) -> int:
    """t(l, s) by its defining recursion: advance j, checkpoint, reverse the tail with s−1, the head with s."""
    if steps == 1:
        return 0
    if checkpoints == 1:
        return steps * (steps - 1) // 2
    return min(j + griewank_recursion(steps - j, checkpoints - 1) + griewank_recursion(j, checkpoints) for j in range(1, steps))


@pytest.mark.parametrize("steps, slots", [(n, s) for n in range(1, 8) for s in range(1, 5)])
def test_optimal_recomputations_is_the_exhaustive_optimum(steps: int, slots: int) -> None:
    assert optimal_recomputations(steps, slots) == exhaustive_fewest_advances(steps, slots)


def test_griewank_closed_form_matches_its_recursion() -> None:
    for steps, checkpoints in itertools.product(range(1, 80), range(1, 9)):
        assert griewank_steps(steps, checkpoints) == griewank_recursion(steps, checkpoints), (steps, checkpoints)


def test_limits_of_the_optimum() -> None:
    assert optimal_recomputations(10, 1) == 45, "one slot: rebuild every input from x_0, N(N-1)/2"
    assert optimal_recomputations(10, 10) == optimal_recomputations(10, 50) == 0, "a slot per block: no advance"
    assert [optimal_recomputations(64, s) for s in (2, 3, 4, 6)] == sorted([optimal_recomputations(64, s) for s in (2, 3, 4, 6)], reverse=True)
    assert 2 * 1024 < optimal_recomputations(1024, 10) < 3 * 1024, "ten slots for 1024 blocks: under three extra runs per block"


@pytest.mark.parametrize("steps", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("schedule, slots", [("every", None), ("sqrt", None), ("revolve", 1), ("revolve", 2), ("revolve", 3), ("revolve", 5)])
def test_plans_keep_their_budget_and_reverse_every_block_once(steps: int, schedule: str, slots: int | None) -> None:
    plan = checkpoint_plan(steps, schedule, slots)  # type: ignore[arg-type]
    turns = [index for action, index in plan.backward if action == "turn"]
    assert turns == list(reversed(range(steps)))
    assert plan.forward_checkpoints[0] == 0
    if schedule == "revolve":
        assert plan.most_stored <= slots and plan.advances == optimal_recomputations(steps, slots)
    if schedule == "every":
        assert plan.advances == 0 and plan.most_stored == steps
    if schedule == "sqrt":
        assert plan.advances == steps - len(plan.forward_checkpoints)
        assert plan.most_stored <= 2 * int(steps**0.5) + 2


def blocks(count: int, width: int = 5, dropout: float = 0.0, batch_norm: bool = False) -> list[nn.Module]:
    made = []
    for _ in range(count):
        layers: list[nn.Module] = [nn.Linear(width, width)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.Tanh(), nn.Dropout(dropout)]
        made.append(nn.Sequential(*layers))
    return made


SCHEDULES = [("every", None), ("sqrt", None), ("revolve", 1), ("revolve", 3)]


def gradients(model: nn.Module, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    model(x).pow(2).sum().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("schedule, slots", SCHEDULES)
def test_gradients_equal_plain_autograd(schedule: str, slots: int | None, device: torch.device) -> None:
    torch.manual_seed(0)
    made = blocks(9)
    checkpointed = CheckpointedSequence(*made, schedule=schedule, slots=slots).to(device, torch.float64)  # type: ignore[arg-type]
    plain = nn.Sequential(*made)
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    assert relative_error(gradients(checkpointed, x), gradients(plain, x)) < 1e-13


def test_gradcheck_in_float64() -> None:
    torch.manual_seed(0)
    sequence = CheckpointedSequence(*blocks(4, width=3), schedule="revolve", slots=2).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: sequence(x), (x, *sequence.parameters()))


@pytest.mark.parametrize("schedule, slots", SCHEDULES)
def test_block_evaluations_and_saved_bytes_are_the_plans(schedule: str, slots: int | None) -> None:
    torch.manual_seed(0)
    sequence = CheckpointedSequence(*blocks(12), schedule=schedule, slots=slots)  # type: ignore[arg-type]
    calls = [0]
    for block in sequence:
        block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x = torch.randn(8, 5, requires_grad=True)
    sequence(x).sum().backward()
    assert calls[0] == sequence.plan.evaluations == 2 * 12 + sequence.plan.advances
    saved = saved_tensor_bytes(sequence, x, exclude=sequence.parameters())
    assert saved == len(sequence.plan.forward_checkpoints) * x.numel() * x.element_size()
    if slots is not None:
        assert saved <= slots * x.numel() * x.element_size()


def test_dropout_masks_are_replayed_and_the_callers_stream_is_untouched() -> None:
    torch.manual_seed(0)
    made = blocks(6, dropout=0.3)
    checkpointed = CheckpointedSequence(*made, schedule="revolve", slots=2).double()
    plain = nn.Sequential(*made)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert relative_error(gradients(checkpointed, x, seed=3), gradients(plain, x, seed=3)) < 1e-13
    unreplayed = CheckpointedSequence(*made, schedule="revolve", slots=2, preserve_rng_state=False).double()
    assert relative_error(gradients(unreplayed, x, seed=3), gradients(plain, x, seed=3)) > 1e-3, "without replay the masks differ"
    torch.manual_seed(7)
    checkpointed(x.requires_grad_(True)).sum().backward()
    after_backward = torch.rand(2)
    torch.manual_seed(7)
    with torch.no_grad():
        checkpointed(x)
    assert torch.equal(torch.rand(2), after_backward)


def test_batchnorm_statistics_are_updated_once() -> None:
    torch.manual_seed(0)
    made = blocks(5, batch_norm=True)
    checkpointed = CheckpointedSequence(*made, schedule="revolve", slots=2).double()
    twin = nn.Sequential(*blocks(5, batch_norm=True)).double()
    twin.load_state_dict(checkpointed.state_dict())
    x = torch.randn(8, 5, dtype=torch.float64)
    assert relative_error(gradients(checkpointed, x), gradients(twin, x)) < 1e-12
    for key, value in checkpointed.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def test_shape_changing_blocks_and_input_without_grad() -> None:
    torch.manual_seed(0)
    made = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2)]
    sequence = CheckpointedSequence(*made, schedule="revolve", slots=2).double()
    plain = nn.Sequential(*made)
    x = torch.randn(5, 4, dtype=torch.float64)
    original = x.clone()
    sequence.zero_grad()
    sequence(x).pow(2).sum().backward()  # x does not require grad: the parameters still train
    from_checkpointed = [p.grad.clone() for p in sequence.parameters()]
    plain.zero_grad()
    plain(x).pow(2).sum().backward()
    assert relative_error(from_checkpointed, [p.grad for p in plain.parameters()]) < 1e-13
    assert torch.equal(x, original), "the caller's input is untouched"


def test_autocast_is_replayed() -> None:
    torch.manual_seed(0)
    sequence = CheckpointedSequence(*blocks(4, width=16), schedule="sqrt")
    plain = nn.Sequential(*sequence)
    x, weight = torch.randn(8, 16), torch.randn(8, 16)

    def autocast_gradients(model: nn.Module) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        (out.float() * weight).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    assert relative_error(autocast_gradients(sequence), autocast_gradients(plain)) < 1e-6


def test_no_grad_and_state_dict_as_sequential() -> None:
    made = blocks(3)
    sequence = CheckpointedSequence(*made, schedule="every")
    assert list(sequence.state_dict()) == list(nn.Sequential(*made).state_dict())
    with torch.no_grad():
        assert torch.equal(sequence(torch.ones(2, 5)), nn.Sequential(*made)(torch.ones(2, 5)))
    assert "schedule='every'" in repr(sequence)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"schedule": "binomial"}, ValueError, "schedule must be one of"),
    ({"schedule": "optimal"}, ValueError, "needs costs=BlockCosts"),
    ({"schedule": "revolve"}, ValueError, "needs a budget"),
    ({"schedule": "revolve", "slots": 0}, ValueError, "slots must be a positive integer"),
    ({"schedule": "sqrt", "slots": 3}, ValueError, "leave slots out"),
])
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CheckpointedSequence(nn.Linear(2, 2), **kwargs)


def test_bad_blocks_and_counts() -> None:
    with pytest.raises(TypeError, match="block 1 must be an nn.Module"):
        CheckpointedSequence(nn.Linear(2, 2), torch.tanh)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        optimal_recomputations(0, 2)


def frozen_blocks(count: int, width: int) -> list[nn.Module]:
    """Blocks whose parameters need no gradient, so that a backward pass holds activations and nothing else."""
    return [Marked(nn.Sequential(nn.Linear(width, width), nn.Tanh())).requires_grad_(False) for _ in range(count)]


def test_revolve_holds_one_more_block_input_per_slot_during_backward() -> None:
    """The budget is kept at run time: each added slot raises the step's measured peak by exactly one block
    input (the forward pass's checkpoints are released when the plan drops them; kept for the whole backward
    pass they made it 1.5 inputs per slot)."""
    torch.manual_seed(0)
    made = frozen_blocks(32, 64)
    x = torch.randn(64, 64, requires_grad=True)
    block_input = x.numel() * x.element_size()
    peaks = {}
    for slots in (2, 3, 5, 8):
        sequence = CheckpointedSequence(*made, schedule="revolve", slots=slots)
        peaks[slots] = added_peak(lambda: sequence(x).sum().backward())
    per_slot = [(peaks[b] - peaks[a]) / ((b - a) * block_input) for a, b in ((2, 3), (3, 5), (5, 8))]
    assert per_slot == pytest.approx([1.0, 1.0, 1.0], abs=1e-3), per_slot


def predicted_at_turns(plan: CheckpointPlan) -> list[int]:
    """Block inputs held at each turn by the plan: the kept ones, plus the current one when it is not kept."""
    kept, current, held = set(plan.forward_checkpoints), None, []
    for action, index in plan.backward:
        if action == "turn":
            held.append(len(kept) + (current is not None and current not in kept))
            current = None
        elif action == "restore":
            current = index
        elif action == "advance":
            current = index + 1
        elif action == "store":
            kept.add(index)
        elif action == "drop":
            kept.discard(index)
    return held


@pytest.mark.parametrize("schedule, slots", [("every", None), ("sqrt", None), ("revolve", 2), ("revolve", 4)])
def test_memory_during_backward_follows_the_plan(schedule: str, slots: int | None) -> None:
    """At every turn the bytes held, less the block inputs the plan holds then, are the same: what the backward
    pass holds rises and falls with the plan, input by input (kept for the whole pass, the forward pass's
    checkpoints made it drift by several inputs)."""
    torch.manual_seed(0)
    made = frozen_blocks(16, 64)
    sequence = CheckpointedSequence(*made, schedule=schedule, slots=slots)  # type: ignore[arg-type]
    x = torch.randn(64, 64, requires_grad=True)
    block_input = x.numel() * x.element_size()
    live = live_at_marks(lambda: sequence(x).sum().backward())
    predicted = predicted_at_turns(sequence.plan)
    assert len(live) == len(predicted) == 16
    if schedule == "every":
        assert predicted == list(range(16, 0, -1)), "each input is released once its block has turned"
    rest = [(bytes_ - held * block_input) / block_input for bytes_, held in zip(live[1:], predicted[1:])]  # the first
    assert max(rest) - min(rest) < 0.01, rest  # turn's upstream gradient (of .sum()) is a view, not an allocation


def test_a_second_backward_pass_gives_the_same_gradients() -> None:
    """The first backward pass releases the checkpoints; a second one (retain_graph=True) rebuilds them."""
    torch.manual_seed(0)
    sequence = CheckpointedSequence(*blocks(7, dropout=0.2, batch_norm=True), schedule="revolve", slots=2).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    out = sequence(x).pow(2).sum()
    first = torch.autograd.grad(out, [x, *sequence.parameters()], retain_graph=True)
    second = torch.autograd.grad(out, [x, *sequence.parameters()])
    assert relative_error(list(second), list(first)) == 0.0


def test_a_repeated_block_runs_each_time_and_sums_its_gradients(device: torch.device) -> None:
    torch.manual_seed(0)
    shared, other = blocks(2)
    order = [shared, other, shared, shared]
    for schedule, slots in SCHEDULES:
        sequence = CheckpointedSequence(*order, schedule=schedule, slots=slots).to(device, torch.float64)  # type: ignore[arg-type]
        plain = nn.Sequential(*order)
        x = torch.randn(3, 5, dtype=torch.float64, device=device)
        assert len(sequence) == 4 and list(sequence) == order
        assert relative_error(gradients(sequence, x), gradients(plain, x)) < 1e-13


def sequences_agree(made: nn.Module, expected: list[nn.Module]) -> None:
    assert isinstance(made, CheckpointedSequence) and list(made) == expected
    assert made.plan == checkpoint_plan(len(expected), made.schedule, made.slots)  # type: ignore[arg-type]
    x = torch.randn(3, 5, dtype=torch.float64)
    assert relative_error(gradients(made, x), gradients(nn.Sequential(*expected), x)) < 1e-13


def test_the_plan_follows_every_change_of_the_blocks() -> None:
    torch.manual_seed(0)
    made = [block.double() for block in blocks(6)]
    sequence = CheckpointedSequence(*made[:3], schedule="revolve", slots=2)
    sequence.append(made[3])
    sequences_agree(sequence, made[:4])
    sequence.insert(0, made[4])
    sequences_agree(sequence, [made[4], *made[:4]])
    del sequence[1]
    sequences_agree(sequence, [made[4], *made[1:4]])
    sequence.extend([made[5]])
    sequences_agree(sequence, [made[4], *made[1:4], made[5]])
    sequences_agree(sequence[1:4], made[1:4])
    sequences_agree(sequence + nn.Sequential(made[0]), [made[4], *made[1:4], made[5], made[0]])
    sequences_agree(sequence[:2] * 2, [made[4], made[1]] * 2)
    assert sequence[0] is made[4]
    empty = sequence[5:]
    assert len(empty) == 0 and torch.equal(empty(torch.ones(2, 5)), torch.ones(2, 5)), "an empty sequence is the identity"


def test_a_block_that_changes_its_input_in_place_is_refused_by_name() -> None:
    torch.manual_seed(0)
    sequence = CheckpointedSequence(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), schedule="every")
    with pytest.raises(ValueError, match=r"block 1 changed its input in place.*inplace=False"):
        sequence(torch.randn(2, 4, requires_grad=True))


def test_a_kept_input_changed_in_place_is_refused() -> None:
    torch.manual_seed(0)
    sequence = CheckpointedSequence(*blocks(4), schedule="every")
    x = torch.randn(2, 5, requires_grad=True)
    out = sequence(x * 1.0)
    kept = out.grad_fn.kept  # type: ignore[union-attr]
    kept.get(2, "block 2").mul_(2)  # a kept block input, changed behind the sequence's back
    with pytest.raises(RuntimeError, match="kept input of block 2 was modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("schedule, slots", [("every", None), ("sqrt", None), ("revolve", 1), ("revolve", 3)])
def test_every_plan_is_executable(schedule: str, slots: int | None) -> None:
    for steps in range(1, 20):
        check_plan(checkpoint_plan(steps, schedule, slots))  # type: ignore[arg-type]


@pytest.mark.parametrize("forward, backward, match", [
    ((("advance", 1),), (), "the current input is x_0"),
    ((("store", 0), ("advance", 0)), (("restore", 0), ("turn", 1)), "runs 1 of 2 blocks|the next block to turn is 0"),
    ((("advance", 0), ("advance", 1)), (("restore", 0),), "x_0 is not kept"),
    ((("store", 0), ("advance", 0), ("advance", 1)), (("restore", 0), ("turn", 1)), "has neither its input current"),
    ((("store", 0), ("advance", 0), ("advance", 1)), (("restore", 0), ("advance", 0), ("turn", 1)), "turns 1 of 2 blocks"),
])
def test_check_plan_names_what_is_wrong(forward: tuple, backward: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_plan(CheckpointPlan(2, "by hand", forward, backward))


@pytest.mark.parametrize("schedule, slots, budget", [("every", None, None), ("sqrt", None, None), ("revolve", 1, None),
                                                     ("revolve", 3, None), ("optimal", None, 32), ("optimal", None, 36)])
def test_runs_per_block_are_counted_by_hooks_and_sum_to_the_evaluations(schedule: str, slots: int | None,
                                                                       budget: int | None) -> None:
    made = [nn.Linear(3, 3) for _ in range(6)]
    costs = BlockCosts((1.0, 20.0, 1.0, 1.0, 9.0, 1.0), (1.0,) * 6, (4,) * 7, (8, 0, 8, 8, 0, 8)) if budget else None
    sequence = CheckpointedSequence(*made, schedule=schedule, slots=slots, costs=costs, budget=budget)
    plan = sequence.plan
    x = torch.randn(2, 3, requires_grad=True)
    assert count_calls_per_module(made, lambda: sequence(x).sum().backward()) == plan.runs
    assert sum(plan.runs) == plan.evaluations
    assert plan.kept.count("input") == len(plan.forward_checkpoints)
    assert plan.kept.count("graph") == sum(action == "record" for action, _ in plan.forward)
    if schedule == "every":
        assert plan.runs == (2,) * 6 and plan.kept == ("input",) * 6
    if schedule == "optimal":
        recorded = [i for i, kept in enumerate(plan.kept) if kept == "graph"]
        assert recorded and all(plan.runs[i] == 1 for i in recorded), "a recorded block runs once"


def test_most_revolve_slots_is_the_largest_that_fits_and_backprop_is_the_fastest_plan() -> None:
    costs = BlockCosts((1.0, 2.0, 1.0, 3.0, 1.0), (2.0,) * 5, (64, 32, 32, 16, 16, 8), (128, 64, 64, 32, 32))
    peaks = [costs.simulate(checkpoint_plan(5, "revolve", s)).peak_bytes for s in range(1, 6)]
    assert costs.most_revolve_slots(min(peaks) - 1) is None
    for budget in sorted(set(peaks)) + [max(peaks) + 100]:
        found = costs.most_revolve_slots(budget)
        assert peaks[found - 1] <= budget and all(peak > budget for peak in peaks[found:])
    backprop = costs.backprop
    assert backprop.time == sum(costs.forward_time) + sum(costs.backward_time)
    assert backprop.peak_bytes >= costs.least_budget
    # a little above backprop's peak: the dynamic programme rounds sizes up to its memory units
    recording = checkpoint_plan(5, "optimal", costs=costs, budget=1.05 * backprop.peak_bytes)
    assert recording.predicted_time == backprop.time, "nothing need run twice"
    with pytest.raises(ValueError, match="budget must be a positive"):
        costs.most_revolve_slots(0)


def test_forward_work_weights_each_block_s_runs_by_its_forward_time() -> None:
    costs = BlockCosts((1.0, 3.0, 0.0, 4.0), (2.0,) * 4, (8,) * 5, (8,) * 4)
    assert costs.forward_work(checkpoint_plan(4, "every")) == 2.0  # every block runs twice
    one_slot = checkpoint_plan(4, "revolve", 1)  # x_0 kept: block i runs 1 + (3 - i) + 1 times
    assert one_slot.runs == (5, 4, 3, 2)
    assert costs.forward_work(one_slot) == (1 * 5 + 3 * 4 + 0 * 3 + 4 * 2) / 8
    recording = checkpoint_plan(4, "optimal", costs=costs, budget=1.05 * costs.backprop.peak_bytes)
    assert costs.forward_work(recording) == 1.0, "plain backprop runs every block once"
    free = BlockCosts((0.0,) * 3, (1.0,) * 3, (8,) * 4, (8,) * 3)
    assert free.forward_work(checkpoint_plan(3, "revolve", 1)) == sum(checkpoint_plan(3, "revolve", 1).runs) / 3
    with pytest.raises(ValueError, match="plan is for 3 blocks, the costs for 4"):
        costs.forward_work(checkpoint_plan(3, "every"))


def test_averaged_costs_are_alike_blocks_with_the_same_sums() -> None:
    costs = BlockCosts((1.0, 3.0, 2.0), (2.0, 2.0, 5.0), (30, 60, 90, 7), (0, 300, 600))
    alike = costs.averaged()
    assert alike.forward_time == (2.0,) * 3 and alike.backward_time == (3.0,) * 3
    assert alike.input_bytes == (60.0, 60.0, 60.0, 7), "the inputs averaged, the output kept"
    assert alike.activation_bytes == (300.0,) * 3
    assert alike.averaged() == alike, "alike blocks are their own average"
    assert alike.backprop.time == costs.backprop.time, "the same total work"
    # a plan for the alike blocks: what the differences change, e.g. the least budget
    assert alike.least_budget < costs.least_budget, "the largest turn is smaller when the sizes are spread evenly"
