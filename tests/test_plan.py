"""Tests of revlib.plan (revlib.planner): a chain fitted into a memory budget, its gradients, its measured peak, its errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import revlib
from allocations import added_peak
from revlib.checkpoint import CheckpointedSequence
from revlib.planner import BudgetTrials, Planner, PlanReport, _inverted_runs, _measure_chain, budget_trials, plan
from revlib.reversible import ReversibleBlock, ReversibleSequence
from revlib.verify import relative_error


def chain(widths: list[int]) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(widths, widths[1:])]


EQUAL = [64] * 17
UNEQUAL = [32] + [128] * 4 + [64] * 4 + [32] * 4 + [16] * 4  # a narrow stem, then stages whose activations halve
BATCH = 512


def step_with_gradients(module: nn.Module, x: torch.Tensor):
    parameters = list(module.parameters())
    return lambda: torch.autograd.grad(module(x).sum(), parameters)  # the parameters' gradients made in the step


@pytest.mark.parametrize("widths", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_measured_peak_is_within_three_budgets(widths: list[int]) -> None:
    blocks = chain(widths)
    x = torch.randn(BATCH, widths[0])
    plain = added_peak(step_with_gradients(nn.Sequential(*blocks), x))
    least = plan(blocks, x, budget=10 * plain, repeats=1).report.least_budget  # type: ignore[union-attr]
    assert least < plain
    strategies = []
    for budget in (int(least + 0.1 * (plain - least)), int(least + 0.6 * (plain - least)), int(1.3 * plain)):
        module = plan(blocks, x, budget=budget, repeats=1)
        report = module.report  # type: ignore[union-attr]
        assert list(module) == blocks and report.measured_peak <= budget
        measured = added_peak(step_with_gradients(module, x))
        assert measured <= budget, (measured, budget, str(report))
        strategies.append(report.strategy)
    assert strategies[0] == "optimal checkpointing" and strategies[-1] == "store everything"


@pytest.mark.parametrize("widths", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_gradients_equal_plain_backprop(widths: list[int]) -> None:
    blocks = [block.double() for block in chain(widths)]
    x = torch.randn(BATCH, widths[0], dtype=torch.float64, requires_grad=True)
    plain = nn.Sequential(*blocks)
    least = plan(blocks, x, budget=10**9, repeats=1).report.least_budget  # type: ignore[union-attr]
    module = plan(blocks, x, budget=least, repeats=1)
    assert isinstance(module, CheckpointedSequence) and all(a is b for a, b in zip(module.parameters(), plain.parameters()))

    def gradients(model: nn.Module) -> list[torch.Tensor]:
        return list(torch.autograd.grad(model(x).pow(2).sum(), [x, *model.parameters()]))

    assert relative_error(gradients(module), gradients(plain)) < 1e-13


def test_no_plan_fits_names_the_budget_and_the_least() -> None:
    blocks = chain(EQUAL)
    x = torch.randn(BATCH, EQUAL[0])
    with pytest.raises(ValueError, match=r"no plan fits in budget=1000 bytes: the least feasible budget is \d+ bytes") as error:
        plan(blocks, x, budget=1000, repeats=1)
    least = int(re.search(r"least feasible budget is (\d+)", str(error.value)).group(1))  # type: ignore[union-attr]
    assert plan(blocks, x, budget=least, repeats=1).report.measured_peak <= least  # type: ignore[union-attr]


def test_the_report_is_a_table() -> None:
    blocks = chain(UNEQUAL)
    x = torch.randn(BATCH, UNEQUAL[0])
    least = plan(blocks, x, budget=10**9, repeats=1).report.least_budget  # type: ignore[union-attr]
    report = plan(blocks, x, budget=least, repeats=1).report  # type: ignore[union-attr]
    assert isinstance(report, PlanReport) and report.plan is not None
    text = str(report)
    assert text.startswith("optimal checkpointing within") and "plain backprop" in text
    assert len(text.splitlines()) == 2 + len(blocks) + 2
    assert report.predicted_time >= report.backprop_time and report.measured_peak < report.backprop_peak
    assert sum(report.runs) == report.plan.evaluations


def coupled_chain(couplings: int, width: int = 128) -> list[nn.Module]:
    """A stem, ``couplings`` reversible couplings on ``width`` features and a head, float64."""
    torch.manual_seed(0)

    def half() -> nn.Module:
        return nn.Sequential(nn.Linear(width // 2, 2 * width), nn.Tanh(), nn.Linear(2 * width, width // 2))

    stem = nn.Sequential(nn.Linear(16, width), nn.Tanh())
    return [stem, *(ReversibleBlock(half(), half()) for _ in range(couplings)), nn.Linear(width, 16)]


def test_inverting_the_reversible_run_fits_where_no_checkpointing_plan_does() -> None:
    """Bytes, not timings (the tests run two at a time): between the least budget of the couplings inverted and
    that of the same couplings checkpointed, only inversion fits."""
    blocks = [block.double() for block in coupled_chain(12)]
    x = torch.randn(BATCH, 16, dtype=torch.float64, requires_grad=True)
    # control: the same couplings, each wrapped so that it is not recognised, can only be checkpointed
    hidden = [nn.Sequential(block) if isinstance(block, ReversibleBlock) else block for block in blocks]
    without = plan(hidden, x, budget=10**10, repeats=1).report.least_budget  # type: ignore[union-attr]
    with_inversion = _measure_chain(_inverted_runs(blocks), x, 1).least  # type: ignore[arg-type]
    assert with_inversion < without, (with_inversion, without)
    budget = (with_inversion + without) // 2
    with pytest.raises(ValueError, match="no plan fits"):
        plan(hidden, x, budget=budget, repeats=1)
    module = plan(blocks, x, budget=budget, repeats=1)
    report = module.report  # type: ignore[union-attr]
    assert report.strategy.endswith("reversible runs inverted") and report.units[1] == (1, 13, True), str(report)
    units = list(module)
    assert [type(unit) for unit in units] == [nn.Sequential, ReversibleSequence, nn.Linear]
    assert list(units[1]) == blocks[1:13], "the same coupling objects, nothing copied"
    assert added_peak(step_with_gradients(module, x)) <= budget
    plain = nn.Sequential(*blocks)

    def gradients(model: nn.Module) -> list[torch.Tensor]:
        return list(torch.autograd.grad(model(x).pow(2).sum(), [x, *model.parameters()]))

    assert relative_error(gradients(module), gradients(plain)) < 1e-10, "backprop's, up to the rebuilt inputs' rounding"
    assert len(str(report).splitlines()) == 2 + len(report.units) + 2 and " 1-12 inv" in str(report)


def test_consecutive_couplings_of_different_dimensions_are_separate_runs() -> None:
    def coupling(dim: int) -> ReversibleBlock:
        return ReversibleBlock(nn.Linear(2, 2), nn.Linear(2, 2), dim=dim)

    a, b, c, d = coupling(1), coupling(1), coupling(-1), coupling(-1)
    units = _inverted_runs([a, b, nn.Identity(), c, d, coupling(1)])
    assert units is not None and [len(u) if isinstance(u, ReversibleSequence) else 0 for u in units] == [2, 0, 2, 1]
    assert _inverted_runs([nn.Linear(2, 2)]) is None


def test_revlib_plan_is_callable_from_the_facade() -> None:
    blocks = chain([8, 8])
    module = revlib.plan(blocks, torch.randn(4, 8), budget=10**7, repeats=1)
    assert isinstance(module, nn.Sequential) and module.report.strategy == "store everything"  # type: ignore[union-attr]
    assert revlib.PlanReport is PlanReport


def test_a_planner_measures_once_and_plans_as_plan_does(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = chain(UNEQUAL)
    x = torch.randn(BATCH, UNEQUAL[0])
    planner = Planner(blocks, x, repeats=1)
    measured = []
    monkeypatch.setattr("revlib.planner._measure_chain", lambda *args: measured.append(args))
    budgets = (planner.backprop_peak, (planner.backprop_peak + planner.least_budget) // 2, planner.least_budget)
    modules = [planner.plan(budget) for budget in budgets]
    assert measured == [], "planning for a budget measures nothing again"
    assert isinstance(modules[0], nn.Sequential) and all(isinstance(m, CheckpointedSequence) for m in modules[1:])
    for module, budget in zip(modules, budgets):
        assert list(module) == blocks and added_peak(step_with_gradients(module, x)) <= budget
    kept = [m.report.kept for m in modules]  # type: ignore[union-attr]
    assert kept[1] != kept[2], "a tighter budget keeps less"
    monkeypatch.undo()
    assert plan(blocks, x, budget=budgets[1], repeats=1).report.costs.steps == len(blocks)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no plan fits"):
        planner.plan(planner.least_budget // 2)


def test_budget_trials_measure_each_plan_and_revolve_on_the_same_budget() -> None:
    blocks = [block.double() for block in chain(UNEQUAL)]
    x = torch.randn(BATCH, UNEQUAL[0], dtype=torch.float64)
    planner = Planner(blocks, x, repeats=1)
    trials = budget_trials(planner, repeats=1)
    assert isinstance(trials, BudgetTrials) and list(trials.budgets) == ["backprop's peak", "halfway", "least + 5 %"]
    assert {method for _, method in trials.trials} == {"plan", "revolve"}
    for (name, method), trial in trials.trials.items():
        assert trial.peak <= trials.budgets[name] or method == "revolve", (name, trial.peak)
        assert trial.error < 1e-12 and trial.seconds > 0 and trial.predicted_seconds > 0
        if method == "revolve":
            assert trial.kept.endswith((" slot", " slots")) and isinstance(trial.module, CheckpointedSequence)
            simulated = planner.costs.simulate(trial.module.plan).peak_bytes
            assert trial.predicted_peak == int(simulated + planner.chain_reserve), "the model's peak plus the reserve"
        else:
            assert len(trial.kept) == len(blocks) and set(trial.kept) <= set("GI.")
            assert trial.predicted_peak == trial.module.report.predicted_peak <= trials.budgets[name]
    assert trials.trials["backprop's peak", "plan"].kept == "G" * len(blocks)
    assert trials.trials["backprop's peak", "plan"].peak == trials.backprop_peak
    text = str(trials)
    assert len(text.splitlines()) == 4 + len(trials.trials) and "least + 5 %" in text
    assert max(len(line) for line in text.splitlines()) <= 85, "the table fits a book's page"
    with pytest.raises(TypeError, match="planner must be a revlib.planner.Planner, got list"):
        budget_trials(blocks)  # type: ignore[arg-type]


def test_budget_trials_mark_inverted_runs() -> None:
    blocks = [block.double() for block in coupled_chain(12)]
    x = torch.randn(BATCH, 16, dtype=torch.float64)
    planner = Planner(blocks, x, repeats=1)
    trials = budget_trials(planner, {"least": planner.least_budget}, revolve=False, repeats=1)
    (trial,) = trials.trials.values()
    assert trial.kept.count("R") == 1 and len(trial.kept) == 3, trial.kept
    assert trial.peak <= planner.least_budget and trial.error < 1e-10


@pytest.mark.parametrize("arguments, error, match", [
    (dict(blocks=nn.Linear(2, 2)), TypeError, "blocks must be an iterable of nn.Module blocks"),
    (dict(blocks=[nn.Linear(2, 2), "relu"]), TypeError, r"blocks\[1\] must be an nn.Module, got str"),
    (dict(blocks=[]), ValueError, "blocks must hold at least one"),
    (dict(example=[1.0, 2.0]), TypeError, "example must be a tensor"),
    (dict(budget="1 MiB"), TypeError, "budget must be a number of bytes, got str"),
    (dict(budget=0), ValueError, "budget must be a positive, finite number of bytes, got 0"),
    (dict(budget=float("inf")), ValueError, "budget must be a positive, finite"),
    (dict(repeats=0), ValueError, "repeats"),
])
def test_bad_arguments_name_the_argument(arguments: dict, error: type, match: str) -> None:
    given = dict(blocks=[nn.Linear(2, 2)], example=torch.ones(3, 2), budget=10**6, repeats=1) | arguments
    with pytest.raises(error, match=match):
        plan(given.pop("blocks"), given.pop("example"), **given)
