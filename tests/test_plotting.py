import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from matplotlib.text import Annotation

from revlib import plotting
from revlib.training import History


def test_book_style_is_applied() -> None:
    plotting.use_book_style()
    assert matplotlib.rcParams["axes.spines.top"] is False
    assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0] == plotting.PALETTE[0]


def test_plot_history_draws_train_and_test_curves_for_each_run() -> None:
    history = History([1.0, 0.5], [0.5, 0.8], [1.1, 0.6], [0.4, 0.7])
    figure = plotting.plot_history({"a": history, "b": history})
    loss_axis, accuracy_axis = figure.axes
    assert len(loss_axis.lines) == 4 and len(accuracy_axis.lines) == 4
    assert loss_axis.get_yscale() == "log"


def test_show_images_accepts_channel_dimension_and_checks_labels() -> None:
    figure = plotting.show_images(torch.rand(12, 1, 8, 8), torch.arange(12), columns=5)
    assert len(figure.axes) == 15
    with pytest.raises(ValueError, match="labels"):
        plotting.show_images(torch.rand(3, 8, 8), [1, 2])
    with pytest.raises(ValueError, match="images must have shape"):
        plotting.show_images(torch.rand(3, 2, 8, 8))


def test_show_images_shows_colour_images_stretched_to_the_unit_range() -> None:
    figure = plotting.show_images(torch.randn(4, 3, 32, 32) * 5, columns=4)
    shown = figure.axes[0].images[0].get_array()
    assert shown.shape == (32, 32, 3) and shown.min() == 0 and shown.max() == 1


def test_plot_points_needs_two_dimensional_inputs() -> None:
    figure = plotting.plot_points(torch.rand(10, 2), torch.randint(0, 3, (10,)))
    assert len(figure.axes) == 1
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plotting.plot_points(torch.rand(10, 3), torch.zeros(10))


def test_draw_graph_draws_every_node_and_edge() -> None:
    figure = plotting.draw_graph({"x": (0, 0), "*": (1, 0), "z": (2, 0)}, [("x", "*"), ("*", "z")], operators=["*"])
    arrows = [text for text in figure.axes[0].texts if isinstance(text, Annotation)]
    nodes = [text.get_text() for text in figure.axes[0].texts if not isinstance(text, Annotation)]
    assert sorted(nodes) == ["*", "x", "z"] and len(arrows) == 2
    with pytest.raises(ValueError, match="without a position"):
        plotting.draw_graph({"x": (0, 0)}, [("x", "y")])


def test_draw_graph_marks_the_stored_values_with_their_notes() -> None:
    positions = {"x": (0, 0), "*": (1, 0), "z": (2, 0)}
    figure = plotting.draw_graph(positions, [("x", "*"), ("*", "z")], operators=["*"], stored={"x": "4 KiB"})
    texts = {text.get_text(): text for text in figure.axes[0].texts if not isinstance(text, Annotation)}
    assert "4 KiB" in texts  # the note under the stored box
    assert texts["x"].get_bbox_patch().get_facecolor() != texts["z"].get_bbox_patch().get_facecolor()
    with pytest.raises(ValueError, match="operators hold no values"):
        plotting.draw_graph(positions, [("x", "*")], operators=["*"], stored={"*": ""})
    with pytest.raises(ValueError, match="without a position"):
        plotting.draw_graph(positions, [("x", "*")], stored={"w": ""})


@pytest.mark.parametrize(("schedule", "slots"), [("every", None), ("sqrt", None), ("revolve", 3)])
def test_plot_schedule_draws_every_evaluation_and_every_kept_input(schedule: str, slots: int | None) -> None:
    from revlib.checkpoint import checkpoint_plan

    plan = checkpoint_plan(10, schedule, slots)  # type: ignore[arg-type]
    axis = plotting.plot_schedule(plan).axes[0]
    segments = [line for line in axis.lines if len(line.get_xdata()) == 2 and line.get_ydata()[1] == line.get_ydata()[0] + 1]
    kept = [line for line in axis.lines if len(line.get_xdata()) == 2 and line.get_ydata()[1] == line.get_ydata()[0]]
    assert len(segments) == plan.evaluations - plan.steps, "one segment per advance and per turn"
    assert len(axis.lines[0].get_xdata()) == plan.steps + 1, "the forward pass climbs through every state"
    stored = sum(action == "store" for action, _ in plan.backward)
    assert len(kept) == len(plan.forward_checkpoints) + stored, "one bar per kept input"
    assert axis.get_xlim()[1] == plan.evaluations
    assert f"{plan.evaluations} evaluations" in axis.get_title()


def test_plot_plan_runs_draws_each_plan_s_runs_coloured_by_what_it_keeps() -> None:
    from matplotlib.colors import to_rgba

    from revlib.checkpoint import BlockCosts, checkpoint_plan

    costs = BlockCosts((1.0, 4.0, 1.0, 1.0), (2.0,) * 4, (8, 32, 8, 8, 8), (4, 64, 4, 4))
    plans = {"optimal": checkpoint_plan(4, "optimal", costs=costs, budget=costs.least_budget),
             "revolve-1": checkpoint_plan(4, "revolve", 1)}
    axis = plotting.plot_plan_runs(plans, block_names=["a", "b", "c", "d"]).axes[0]
    bars = axis.patches
    assert len(bars) == 8, "one bar per block and plan"
    for number, plan in enumerate(plans.values()):
        drawn = bars[4 * number: 4 * number + 4]
        assert [bar.get_height() for bar in drawn] == list(plan.runs)
        assert [bar.get_facecolor() for bar in drawn] == [to_rgba(plotting.KEPT_COLOURS[k]) for k in plan.kept]
    assert "graph" in plans["optimal"].kept, "the budget leaves room for a recorded graph"
    assert {bar.get_hatch() or "" for bar in bars[:4]} != {bar.get_hatch() or "" for bar in bars[4:]}
    assert [label.get_text() for label in axis.get_xticklabels()] == ["a", "b", "c", "d"]
    assert [text.get_text() for text in axis.get_legend().get_texts()][-2:] == ["optimal", "revolve-1"]
    with pytest.raises(ValueError, match="block_names must name the 4 blocks"):
        plotting.plot_plan_runs(plans, block_names=["a"])
    with pytest.raises(ValueError, match="same number of blocks"):
        plotting.plot_plan_runs({"a": plans["revolve-1"], "b": checkpoint_plan(3, "every")})
    with pytest.raises(ValueError, match="between 1 and 6"):
        plotting.plot_plan_runs({})


def _box(annotation: Annotation) -> tuple[float, float, float, float]:
    box = plotting._text_box(annotation, annotation.figure.canvas.get_renderer())  # without its leader line
    return box.x0, box.y0, box.x1, box.y1


def test_label_points_keeps_crowded_labels_apart_and_off_the_points() -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    # a cluster of five points, closer than a label's width, and two loners
    points = {f"method {i}": (1.0 + 0.05 * i, 2.0 + 0.04 * (i % 2)) for i in range(5)}
    points |= {"far left": (0.2, 0.5), "far right": (3.0, 3.0)}
    axes.scatter(*zip(*points.values()))
    axes.set(xlim=(0, 3.5), ylim=(0, 3.5))
    axes.legend(["points"], loc="upper left")
    labels = plotting.label_points(axes, points)
    assert set(labels) == set(points)
    boxes = {name: _box(note) for name, note in labels.items()}
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert plotting._overlap(boxes[a], boxes[b]) == 0, (a, b)
    renderer = figure.canvas.get_renderer()
    legend = axes.get_legend().get_window_extent(renderer)
    frame = axes.get_window_extent(renderer)
    for name, (x0, y0, x1, y1) in boxes.items():
        assert plotting._overlap((x0, y0, x1, y1), (legend.x0, legend.y0, legend.x1, legend.y1)) == 0, name
        assert frame.x0 <= x0 and x1 <= frame.x1 and frame.y0 <= y0 and y1 <= frame.y1, name
        for point in points.values():
            px, py = axes.transData.transform(point)
            assert not (x0 < px < x1 and y0 < py < y1), f"{name} covers a point"
    # a lone point keeps its first place: just right of the point, no leader line
    assert labels["far left"].xy == points["far left"]
    assert labels["far left"].xyann == (6, 2) and labels["far left"].arrow_patch is None
    plt.close(figure)


def test_label_points_rejects_bad_sizes() -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    with pytest.raises(ValueError, match="fontsize must be positive"):
        plotting.label_points(axes, {"a": (0.0, 0.0)}, fontsize=0)
    with pytest.raises(ValueError, match="marker_radius"):
        plotting.label_points(axes, {"a": (0.0, 0.0)}, marker_radius=-1)
    plt.close(figure)


def test_plot_budget_trials_draws_budgets_peaks_and_time_ratios() -> None:
    from torch import nn

    from revlib.planner import BudgetTrial, BudgetTrials

    def trial(peak: int, seconds: float, predicted: float | None = None) -> BudgetTrial:
        return BudgetTrial(nn.Identity(), "G", peak, peak, 0.0, seconds, seconds if predicted is None else predicted)

    trials = BudgetTrials({"big": 4 * 2**20, "small": 2 * 2**20}, 4 * 2**20, 3 * 2**19, 2.0, 4.0,
                          {("big", "plan"): trial(4 * 2**20, 2.0), ("big", "revolve"): trial(3 * 2**20, 3.0, 8.0),
                           ("small", "plan"): trial(2**20, 2.5, 6.0)})
    left, right = plotting.plot_budget_trials(trials, title="t").axes
    assert sorted(bar.get_height() for bar in left.patches) == [1, 2, 3, 4, 4], "two budgets, three peaks (MiB)"
    assert [list(line.get_ydata()) for line in left.lines] == [[1.5, 1.5]], "the least budget (MiB)"
    plan, plan_predicted, revolve, revolve_predicted = right.lines[:4]
    assert list(plan.get_ydata()) == [1.0, 1.25] and list(revolve.get_ydata()) == [1.5], "measured ÷ backprop's"
    assert list(plan_predicted.get_ydata()) == [0.5, 1.5] and list(revolve_predicted.get_ydata()) == [2.0], (
        "predicted ÷ backprop's predicted"
    )
    assert plan_predicted.get_color() == plan.get_color() and plan_predicted.get_markerfacecolor() == "none"
    assert [label.get_text() for label in left.get_xticklabels()] == ["big\n(4.0 MiB)", "small\n(2.0 MiB)"]
    assert plan.get_linestyle() == "None", "budgets are categories: markers, no lines"
