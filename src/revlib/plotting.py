"""One look for every figure of the book.

:func:`use_book_style` sets matplotlib's defaults once per notebook (a colour-blind-safe palette, light
grid, no top/right frame, legible sizes); the helpers below draw the figures that recur from chapter to
chapter. Every helper returns the ``matplotlib.figure.Figure`` it drew on.
"""

from __future__ import annotations

import math

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from revlib.timeline import CATEGORIES, MemoryTimeline
from revlib.training import History

if TYPE_CHECKING:
    from revlib.checkpoint import CheckpointPlan
    from revlib.planner import BudgetTrials

__all__ = ["BOOK_STYLE", "KEPT_COLOURS", "PALETTE", "draw_graph", "label_points", "plot_budget_trials", "plot_history", "plot_plan_runs", "plot_points", "plot_schedule", "plot_timeline", "show_images", "use_book_style"]

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
"""The Okabe–Ito colours, distinguishable under every common form of colour blindness."""

#: The matplotlib settings of every figure in the book (applied by :func:`use_book_style`).
BOOK_STYLE = {
    "figure.figsize": (6.4, 3.8),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "figure.constrained_layout.use": True,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    "image.cmap": "viridis",
}


def use_book_style() -> None:
    """Apply the book's matplotlib defaults (:data:`BOOK_STYLE`) to every later figure."""
    mpl.rcParams.update(BOOK_STYLE)


def plot_history(histories: History | Mapping[str, History], *, title: str | None = None) -> Figure:
    """Learning curves: loss (left, log scale) and accuracy (right) per epoch.

    Training curves are solid, test curves dashed; each run keeps one colour.

    Args:
        histories: one :class:`~revlib.training.History`, or several keyed by the label to show.
        title: an optional title above both panels.
    """
    if isinstance(histories, History):
        histories = {"": histories}
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for (label, history), colour in zip(histories.items(), PALETTE * len(histories)):
        epochs = np.arange(1, history.epochs + 1)
        prefix = f"{label} " if label else ""
        loss_axis.plot(epochs, history.train_loss, color=colour, label=f"{prefix}train")
        loss_axis.plot(epochs, history.test_loss, color=colour, linestyle="--", label=f"{prefix}test")
        accuracy_axis.plot(epochs, history.train_accuracy, color=colour, label=f"{prefix}train")
        accuracy_axis.plot(epochs, history.test_accuracy, color=colour, linestyle="--", label=f"{prefix}test")
    loss_axis.set(xlabel="epoch", ylabel="loss", yscale="log")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy")
    accuracy_axis.legend()
    if title:
        figure.suptitle(title)
    return figure


def show_images(
    images: Tensor | np.ndarray,
    labels: Sequence[object] | Tensor | None = None,
    *,
    columns: int = 10,
    cmap: str = "gray_r",
) -> Figure:
    """A grid of images, each titled with its label.

    Colour images are shown with each one's values stretched to [0, 1] (standardised inputs are not
    pixel values any more); grey-scale ones through ``cmap``.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` grey-scale images, or ``(N, 3, H, W)`` colour images
            (CPU or GPU tensors, or an array).
        labels: an optional label per image.
        columns: images per row.
        cmap: the colour map (dark ink on white by default).
    """
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 4 and array.shape[1] == 3:
        low = array.min(axis=(1, 2, 3), keepdims=True)
        high = array.max(axis=(1, 2, 3), keepdims=True)
        array = ((array - low) / np.maximum(high - low, 1e-12)).transpose(0, 2, 3, 1)  # (N, H, W, 3) in [0, 1]
    if array.ndim != 3 and not (array.ndim == 4 and array.shape[-1] == 3):
        raise ValueError(f"images must have shape (N, H, W), (N, 1, H, W) or (N, 3, H, W), got {array.shape}")
    if labels is not None and len(labels) != len(array):
        raise ValueError(f"labels has {len(labels)} entries for {len(array)} images")
    columns = min(columns, len(array))
    rows = -(-len(array) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(0.9 * columns, 1.0 * rows + 0.2), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(array):
            axis.imshow(array[index], cmap=cmap)
            if labels is not None:
                axis.set_title(str(int(labels[index]) if isinstance(labels, Tensor) else labels[index]), fontsize=9)
    return figure


def plot_points(inputs: Tensor, labels: Tensor, *, ax: plt.Axes | None = None, title: str | None = None) -> Figure:
    """A scatter plot of 2-D points coloured by class (e.g. :func:`revlib.data.make_spirals`).

    Raises:
        ValueError: ``inputs`` is not ``(N, 2)``.
    """
    if inputs.dim() != 2 or inputs.shape[1] != 2:
        raise ValueError(f"inputs must have shape (N, 2), got {tuple(inputs.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    points, classes = inputs.detach().cpu().numpy(), labels.detach().cpu().numpy()
    for label in np.unique(classes):
        chosen = classes == label
        ax.scatter(points[chosen, 0], points[chosen, 1], s=8, color=PALETTE[int(label) % len(PALETTE)], label=str(label))
    ax.set(aspect="equal", title=title or "")
    ax.legend(title="class", markerscale=2)
    return ax.figure


def draw_graph(
    positions: Mapping[str, tuple[float, float]],
    edges: Sequence[tuple[str, str]],
    *,
    operators: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    stored: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Figure:
    """Draw a computational graph: variables as boxes, operators as circles, data flow as arrows.

    Args:
        positions: each node's ``(x, y)`` position.
        edges: ``(source, target)`` pairs, both keys of ``positions``.
        operators: the nodes drawn as operators (circles); all others are variables (boxes).
        labels: text shown for a node (matplotlib mathtext allowed); defaults to the node's key.
        stored: the variables whose values the backward pass keeps (e.g. found by
            :class:`revlib.measure.SavedTensors`), each with a note written under its box (its size);
            drawn filled in orange with a thick border, the others white.
        title: an optional title.

    Raises:
        ValueError: an edge, operator or stored node names a node without a position, or an operator is
            marked as stored.
    """
    stored = dict(stored or {})
    if set(stored) & set(operators):
        raise ValueError(f"operators hold no values to store: {sorted(set(stored) & set(operators))}")
    unknown = {name for edge in edges for name in edge} | set(operators) | set(stored)
    unknown -= set(positions)
    if unknown:
        raise ValueError(f"nodes without a position: {sorted(unknown)}")
    labels = labels or {}
    xs = [x for x, _ in positions.values()]
    ys = [y for _, y in positions.values()]
    figure, axis = plt.subplots(figsize=(1.0 * (max(xs) - min(xs) + 2), 1.0 * (max(ys) - min(ys) + 1.6)))
    nodes = {}
    for name, (x, y) in positions.items():
        if name in operators:
            box = {"boxstyle": "circle,pad=0.3", "facecolor": "white", "edgecolor": PALETTE[1]}
        elif name in stored:
            box = {"boxstyle": "round,pad=0.4", "facecolor": "#FBE3C4", "edgecolor": PALETTE[4], "linewidth": 2.5}
        elif stored:
            box = {"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": PALETTE[0]}
        else:
            box = {"boxstyle": "round,pad=0.4", "facecolor": "#DCEBF7", "edgecolor": PALETTE[0]}
        nodes[name] = axis.text(x, y, labels.get(name, name), ha="center", va="center", fontsize=12, bbox=box)
        if stored.get(name):
            # on a white ground above the arrows, so that an edge leaving the box downwards does not cross it
            axis.text(x, y - 0.42, stored[name], ha="center", va="top", fontsize=9, color="0.25", zorder=4,
                      bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"})
    # each arrow is clipped to the outlines of its two nodes, so that it ends at the node's edge whatever
    # its size (a large operator circle would hide an arrowhead that stops a fixed distance from the centre)
    for source, target in edges:
        start, end = nodes[source].get_bbox_patch(), nodes[target].get_bbox_patch()
        axis.annotate(
            "", xy=positions[target], xytext=positions[source],
            arrowprops={"arrowstyle": "-|>", "color": "0.35", "lw": 1.3, "patchA": start, "patchB": end,
                        "shrinkA": 3, "shrinkB": 3},
        )
    axis.set(xlim=(min(xs) - 0.7, max(xs) + 0.7), ylim=(min(ys) - (1.0 if stored else 0.7), max(ys) + 0.7), title=title or "")
    axis.set_aspect("equal")
    axis.axis("off")
    return figure


def plot_schedule(plan: CheckpointPlan, *, ax: plt.Axes | None = None, title: str | None = None) -> Figure:
    """Draw a checkpointing plan (:func:`revlib.checkpoint.checkpoint_plan`) as a time line.

    Time runs to the right in block evaluations; the state :math:`x_i` is on the vertical axis, so each
    evaluation of block :math:`i` is a segment from :math:`x_i` up to :math:`x_{i+1}`: the forward pass
    (blue), the backward pass's advances that rebuild inputs without a graph (grey) and its turns, where
    the block runs with its graph and is back-propagated through (vermilion). A green bar spans the time
    during which an input is kept, so the number of bars crossing a vertical line is the memory in use.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.2))
    steps = plan.steps
    ax.plot(range(steps + 1), range(steps + 1), color=PALETTE[0], lw=2.2)
    kept_since = {index: index for index in plan.forward_checkpoints}  # the time at which x_i was kept
    spans: list[tuple[int, int, int]] = []
    time = steps
    for action, index in plan.backward:
        if action in ("advance", "turn"):
            ax.plot([time, time + 1], [index, index + 1], color="0.6" if action == "advance" else PALETTE[1], lw=2.2)
            time += 1
        elif action == "store":
            kept_since[index] = time
        elif action == "drop":
            spans.append((index, kept_since.pop(index), time))
    spans += [(index, start, time) for index, start in kept_since.items()]
    for index, start, end in spans:
        ax.plot([start, end], [index, index], color=PALETTE[2], lw=5, alpha=0.35, solid_capstyle="butt")
    legend = [mpl.lines.Line2D([], [], color=color, lw=width, alpha=alpha) for color, width, alpha in
              ((PALETTE[0], 2.2, 1.0), ("0.6", 2.2, 1.0), (PALETTE[1], 2.2, 1.0), (PALETTE[2], 5, 0.35))]
    ax.legend(legend, ["forward", "advance", "turn", "input kept"], loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set(xlabel="block evaluations", ylabel="state $x_i$", xlim=(0, time), ylim=(-0.5, steps + 0.5),
           title=title or f"{plan.schedule}: {plan.evaluations} evaluations, at most {plan.most_stored} inputs kept")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # evaluations are whole
    return ax.figure


#: The colour of each entry of :attr:`~revlib.checkpoint.CheckpointPlan.kept` in :func:`plot_plan_runs`.
KEPT_COLOURS = {"graph": PALETTE[2], "input": PALETTE[0], "-": "0.75"}
_HATCHES = ("", "//", "..", "xx", "\\\\", "++")


def plot_plan_runs(plans: Mapping[str, CheckpointPlan], *, block_names: Sequence[str] | None = None,
                   ax: plt.Axes | None = None, title: str | None = None) -> Figure:
    """Draw how often each block runs under each plan: one group of bars per block, one bar per plan (each
    plan its own hatching, named in the legend), its height :attr:`~revlib.checkpoint.CheckpointPlan.runs`
    and its colour what the plan's forward pass keeps of the block
    (:attr:`~revlib.checkpoint.CheckpointPlan.kept`, :data:`KEPT_COLOURS`): its graph (green; it then runs
    once), its input (blue) or nothing (grey; rebuilt from an earlier input).

    Args:
        plans: name → plan, all for the same number of blocks (at most six plans).
        block_names: a label per block for the horizontal axis (default: the block indices).

    Raises:
        ValueError: no plans or more than six, plans for different numbers of blocks, or ``block_names`` of
            another length.
    """
    if not 0 < len(plans) <= len(_HATCHES):
        raise ValueError(f"plans must name between 1 and {len(_HATCHES)} plans, got {len(plans)}")
    steps = {plan.steps for plan in plans.values()}
    if len(steps) != 1:
        raise ValueError(f"plans must be for the same number of blocks, got {sorted(steps)}")
    (blocks,) = steps
    if block_names is not None and len(block_names) != blocks:
        raise ValueError(f"block_names must name the {blocks} blocks, got {len(block_names)} names")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.4, 0.6 * blocks * len(plans)), 3.2))
    width = 0.8 / len(plans)
    for number, (hatch, plan) in enumerate(zip(_HATCHES, plans.values())):
        bars = ax.bar([block - 0.4 + (number + 0.5) * width for block in range(blocks)], plan.runs, width=width,
                      color=[KEPT_COLOURS[kept] for kept in plan.kept], hatch=hatch, edgecolor="white")
        ax.bar_label(bars, fontsize=7)
    kept_names = {"graph": "graph kept", "input": "input kept", "-": "nothing kept"}
    handles = [mpl.patches.Patch(color=colour, label=kept_names[kept]) for kept, colour in KEPT_COLOURS.items()]
    handles += [mpl.patches.Patch(facecolor="white", edgecolor="0.3", hatch=hatch, label=name)
                for hatch, name in zip(_HATCHES, plans)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_xticks(range(blocks), list(block_names) if block_names is not None else [str(b) for b in range(blocks)])
    most = max(max(plan.runs) for plan in plans.values())
    ax.set(ylabel="evaluations", ylim=(0, 1.2 * most), title=title)
    return ax.figure


def plot_budget_trials(trials: BudgetTrials, *, title: str | None = None) -> Figure:
    """Draw :func:`revlib.planner.budget_trials` in two panels: per budget the budget and each method's
    measured peak (left, bars; a dashed line at the least budget the planner accepts, its cost model's
    floor), and each method's step time over plain backprop's, measured (filled markers) and predicted by
    the cost model (hollow markers, each over backprop's predicted time; right). The budgets are
    categories, named with their size in MiB, so the markers are not joined.

    Args:
        trials: the measured plans (and revolve's trials, where present).
        title: a title over both panels.
    """
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    names = list(trials.budgets)
    methods = list(dict.fromkeys(method for _, method in trials.trials))
    width = 0.8 / (1 + len(methods))
    left.bar([n - 0.4 + width / 2 for n in range(len(names))], [trials.budgets[n] / 2**20 for n in names],
             width=width, color="0.8", label="budget")
    for number, method in enumerate(methods, start=1):
        shown = [n for n in names if (n, method) in trials.trials]
        left.bar([names.index(n) - 0.4 + (number + 0.5) * width for n in shown],
                 [trials.trials[n, method].peak / 2**20 for n in shown], width=width,
                 label=f"{method}, measured peak")
        positions = [names.index(n) for n in shown]
        marker = "os^"[(number - 1) % 3]
        (measured,) = right.plot(positions, [trials.trials[n, method].seconds / trials.backprop_seconds for n in shown],
                                 marker=marker, linestyle="none", markersize=7, label=f"{method}, measured")
        right.plot(positions, [trials.trials[n, method].predicted_seconds / trials.backprop_predicted for n in shown],
                   marker=marker, linestyle="none", markersize=9, markerfacecolor="none",
                   color=measured.get_color(), label=f"{method}, predicted")
    left.axhline(trials.least_budget / 2**20, color="0.3", linestyle="--", linewidth=1,
                 label="least budget the planner accepts")
    labels = [f"{name}\n({trials.budgets[name] / 2**20:.1f} MiB)" for name in names]
    left.set(xticks=range(len(names)), xticklabels=labels, xlabel="budget", ylabel="MiB added by one step",
             title="peak against budget")
    right.axhline(1, color="0.5", linestyle=":", label="backprop")
    right.set(xticks=range(len(names)), xticklabels=labels, xlabel="budget", ylabel="step time / backprop's",
              title="time, measured and predicted")
    left.legend()
    right.legend()
    if title is not None:
        figure.suptitle(title)
    return figure


#: Bytes per unit of the memory axis of :func:`plot_timeline`.
MEMORY_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

#: The colour of each category of a :class:`~revlib.timeline.MemoryTimeline`.
CATEGORY_COLOURS = dict(zip(CATEGORIES, (PALETTE[0], PALETTE[4], PALETTE[2], PALETTE[5], PALETTE[1], PALETTE[3], "0.7")))


def plot_timeline(timeline: MemoryTimeline, *, ax: plt.Axes | None = None, title: str | None = None, unit: str = "MiB") -> Figure:
    """Draw a :func:`revlib.timeline.memory_timeline` as stacked areas, one per category, over the call's time.

    The height of the stack at a time is the memory held then; the forward pass, the backward pass and the
    optimiser step are shaded and named along the top, and a dashed line marks the peak. Time is the profiled
    call's, which profiling slows down unevenly: read the figure for the order and the sizes of things. Categories that stay
    empty throughout are left out of the legend.

    Args:
        timeline: the measured call.
        ax: the axes to draw on (a new figure when ``None``).
        title: the title (by default the peak and what the call adds to the memory live at its start).
        unit: the unit of the memory axis, one of ``MEMORY_UNITS``.

    Raises:
        ValueError: an unknown unit.
    """
    if unit not in MEMORY_UNITS:
        raise ValueError(f"unit must be one of {tuple(MEMORY_UNITS)}, got {unit!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7.2, 3.8))
    scale = MEMORY_UNITS[unit]
    milliseconds = timeline.times * 1e3
    shown = [name for name in CATEGORIES if timeline.largest[name] > 0]
    ax.stackplot(milliseconds, *(timeline.series[name] / scale for name in shown), step="post",
                 colors=[CATEGORY_COLOURS[name] for name in shown], labels=[name.replace("_", " ") for name in shown], alpha=0.85)
    for index, phase in enumerate(timeline.phases):
        ax.axvspan(phase.start * 1e3, phase.end * 1e3, color="0.5", alpha=0.12 if index % 2 == 0 else 0.06, lw=0)
        # staggered, so that the names of short phases do not overlap; offsets in points, so that they stay
        # below the title whatever the axes' height
        ax.annotate(phase.name, xy=((phase.start + phase.end) / 2 * 1e3, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(0, 2 + 10 * (index % 2)), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.axhline(timeline.peak / scale, color="0.25", lw=0.8, ls="--")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), reverse=True)
    ax.set(xlabel="time (ms)", ylabel=f"memory ({unit})", xlim=(0, milliseconds[-1]), ylim=(0, timeline.peak / scale * 1.08))
    default = f"peak {timeline.peak / scale:.3g} {unit}, of which the call adds {timeline.added_peak / scale:.3g}"
    ax.set_title(default if title is None else title, pad=30)  # room for the phases' names (22 points)
    return ax.figure


def label_points(
    ax: plt.Axes,
    points: Mapping[str, tuple[float, float]],
    *,
    fontsize: float = 8,
    marker_radius: float = 6,
) -> dict[str, plt.Annotation]:
    """Label scattered points so that no label covers another label or a point.

    Each label is tried at offsets around its point, nearest first (right, left, above, below, then
    farther out with a leader line), and takes the first place where its box overlaps no label placed before
    it, no point (a square of ``marker_radius`` points around each) and no legend, and stays inside the
    axes; if none is free, the place with the least overlap. Labels are placed from the most crowded point
    outwards, so the points with the fewest free places choose first. Call it last, once the axes' limits,
    scales and legend are final: the boxes are measured in display coordinates.

    Args:
        ax: The axes the points are drawn on.
        points: Label text to ``(x, y)`` in data coordinates.
        fontsize: The labels' font size.
        marker_radius: Half the side of the square kept free around each point, in typographic points.

    Returns:
        The annotation of each label.
    """
    if fontsize <= 0 or marker_radius < 0:
        raise ValueError(f"fontsize must be positive and marker_radius non-negative, got {fontsize} and {marker_radius}")
    figure = ax.figure
    figure.draw_without_rendering()  # settles the layout, so the axes no longer move
    renderer = figure.canvas.get_renderer()
    to_pixels = figure.dpi / 72
    centres = {name: ax.transData.transform(xy) for name, xy in points.items()}
    radius = marker_radius * to_pixels
    obstacles = [(x - radius, y - radius, x + radius, y + radius) for x, y in centres.values()]
    if (legend := ax.get_legend()) is not None:
        box = legend.get_window_extent(renderer)
        obstacles.append((box.x0, box.y0, box.x1, box.y1))
    frame = ax.get_window_extent(renderer)
    # (x offset, y offset) in points, horizontal alignment, vertical alignment
    near = [(6, 2, "left", "bottom"), (-6, 2, "right", "bottom"), (6, -2, "left", "top"), (-6, -2, "right", "top"),
            (0, 7, "center", "bottom"), (0, -7, "center", "top")]
    farther = [(dx, dy) for dx in (12, -12, 0) for dy in (10, -10, 20, -20, 30, -30)]
    places = near + sorted(
        ((dx, dy, "left" if dx > 0 else "right" if dx < 0 else "center", "bottom" if dy > 0 else "top")
         for dx, dy in farther),
        key=lambda place: math.hypot(place[0], place[1]),
    )

    def crowding(name: str) -> float:
        x, y = centres[name]
        return -sum(1 for u, v in centres.values() if abs(u - x) < 80 * to_pixels and abs(v - y) < 20 * to_pixels)

    placed: list[tuple[float, float, float, float]] = []
    annotations: dict[str, plt.Annotation] = {}
    for name in sorted(points, key=crowding):
        best: tuple[float, plt.Annotation] | None = None
        for dx, dy, ha, va in places:
            far = abs(dy) > 7 or abs(dx) > 6
            note = ax.annotate(name, points[name], xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=fontsize, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if far else None)
            box = _text_box(note, renderer)
            overlap = sum(_overlap((box.x0, box.y0, box.x1, box.y1), other) for other in placed + obstacles)
            outside = box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1
            cost = overlap + (box.width * box.height if outside else 0.0)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note)
            else:
                note.remove()
            if cost == 0:
                break
        assert best is not None
        box = _text_box(best[1], renderer)
        placed.append((box.x0, box.y0, box.x1, box.y1))
        annotations[name] = best[1]
    return annotations


def _text_box(note: plt.Annotation, renderer: object) -> Bbox:
    """The box of an annotation's text alone, without its leader line, in display coordinates."""
    note.get_window_extent(renderer)  # places the text where it will be drawn
    return Text.get_window_extent(note)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The area two boxes ``(x0, y0, x1, y1)`` share."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)
