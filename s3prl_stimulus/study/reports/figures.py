"""The report's figures, each saved as PNG and PDF at one fixed size (:data:`FIGURE_PIXELS` for the PNG).

Fig. 2: the learned layer weights per train stimulus, averaged over folds and seeds (one figure per
upstream). For the upstream of Table IV: the cross-testing heatmap (train x test macro-F1) and per-class
F1 bars on the matched test sets. Missing cells are drawn as missing, never as zero, and a figure with no
data at all says "no data" instead of drawing empty axes or a colour bar of nothing. A figure drawn from
any run on part of the corpus says so in its title (and its index caption); heatmap cells from such runs
carry †. Values averaged over several seeds say so in the title ("mean over N seeds").

Layout: titles are wrapped to the figure's width and legends sit below the axes, so no legend covers a
title and no label falls off the fixed-size canvas (tests check every text's box).

Each figure function returns ``(caption, paths)``: the caption is the index's title for the figure.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from s3prl_stimulus import CLASSES
from s3prl_stimulus.io import atomic_path
from s3prl_stimulus.study.reports.build import Report
from s3prl_stimulus.study.reports.tables import MARK, TITLE_MARK, slug

FIGURE_INCHES = (6.4, 4.8)
FIGURE_DPI = 100
FIGURE_PIXELS = (640, 480)  # width, height: FIGURE_INCHES x FIGURE_DPI, saved without tight cropping
TITLE_CHARACTERS = 60
"""Titles wrap at this many characters: at the "medium" font a line then stays inside the 640 px canvas even
when centred over axes shifted right by the y label (an unwrapped long title ran off the canvas and under
Fig. 2's legend)."""
NO_DATA = "no data: every cell is missing (see missing_runs.csv)"


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")


def save_figure(fig, stem: Path) -> list:
    """PNG and PDF at the fixed size (no tight bbox: the PNG is exactly FIGURE_PIXELS)."""
    import matplotlib.pyplot as plt

    paths = []
    for ext in ("png", "pdf"):
        target = stem.with_suffix(f".{ext}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, dpi=FIGURE_DPI)
        paths.append(target)
    plt.close(fig)
    return paths


def layer_weight_means(report: Report, system: str) -> dict:
    """train stimulus -> (mean, std, n) over folds (and seeds) of the learned layer weights."""
    result = {}
    for train in report.study.train_stimuli:
        weights = [r.layer_weights for r in report.study.runs
                   if r.system == system and r.train_stimulus == train and r.layer_weights is not None]
        if not weights:
            continue
        if len({len(w) for w in weights}) > 1:
            report.notes.append(f"{system} / {train}: layer weights of different lengths; not plotted")
            continue
        array = np.array(weights)
        result[train] = (array.mean(axis=0), array.std(axis=0), len(weights))
    return result


def _caption(title: str, complete: bool, n_seeds=()) -> str:
    """The title: `` (mean over N seeds)`` when any shown value averages seeds, then † when incomplete."""
    seeds = sorted(set(n_seeds))
    if seeds and seeds[-1] > 1:
        title += f" (mean over {seeds[-1]} seeds)" if len(seeds) == 1 else \
            f" (mean over {seeds[0]}-{seeds[-1]} seeds per cell)"
    return title if complete else title + TITLE_MARK


def _title(ax, caption: str) -> None:
    ax.set_title(textwrap.fill(caption, TITLE_CHARACTERS), fontsize="medium")


def _no_data(ax) -> None:
    """Said in the axes: an empty plot would read as a drawing error, a zero bar as F1 = 0."""
    ax.text(0.5, 0.5, textwrap.fill(NO_DATA, 40), transform=ax.transAxes, ha="center", va="center",
            fontsize="large", bbox={"facecolor": "white", "edgecolor": "0.5"})


def figure_layer_weights(report: Report, system: str, out: Path) -> tuple[str, list]:
    complete = all(r.complete for r in report.study.runs if r.system == system and r.layer_weights is not None)
    caption = _caption(f"Fig. 2: layer weights, {system}", complete)
    means = layer_weight_means(report, system)
    if not means:
        return caption, []
    if all(len(m[0]) < 2 for m in means.values()):
        report.notes.append(f"Fig. 2 not drawn for {system}: its featurizer has a single layer")
        return caption, []
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    for train, (mean, std, n) in means.items():
        layers = np.arange(len(mean))
        ax.plot(layers, mean, marker="o", markersize=3, label=f"{train} ({n} runs)")
        ax.fill_between(layers, mean - std, mean + std, alpha=0.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = CNN / input features)")
    ax.set_ylabel("softmax weight (mean ± std over runs)")
    _title(ax, _caption(f"Fig. 2: learned layer weights, {system}", complete))
    # Below the axes: on the right, the legend's top met a long title (an upstream label, the † note).
    fig.legend(title="train stimulus (runs = folds x seeds)", loc="outside lower center", ncols=2, fontsize="small")
    return caption, save_figure(fig, out / f"fig2_layer_weights_{slug(system)}")


def figure_heatmap(report: Report, out: Path) -> tuple[str, list]:
    system, trains, tests = report.chosen, report.study.train_stimuli, report.study.test_stimuli
    cells = [[report.cell(system, s, t) for t in tests] for s in trains]
    values = np.array([[c.value for c in row] for row in cells])
    shown = [c for row in cells for c in row if not c.missing]
    caption = _caption(f"Cross-testing macro-F1, {system}", all(c.complete for c in shown), [c.n_seeds for c in shown])
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")  # missing cells show as grey, labelled below
    _heatmap_cells(ax, cells, values)
    ax.set_xticks(range(len(tests)), tests)
    ax.set_yticks(range(len(trains)), trains)
    ax.set_xlabel("test label set")
    ax.set_ylabel("train label set")
    _title(ax, caption)
    if shown:
        fig.colorbar(ax.images[0], ax=ax, label="macro-F1")
    else:  # a colour bar of no values is a meaningless -0.1..0.1 scale
        _no_data(ax)
    return caption, save_figure(fig, out / f"cross_test_heatmap_{slug(system)}")


def _heatmap_cells(ax, cells: list, values: np.ndarray) -> None:
    present = values[~np.isnan(values)]
    low, high = (present.min(), present.max()) if len(present) else (0.0, 1.0)
    if low == high:  # one value (or all equal): a degenerate range would again give a meaningless scale
        low, high = 0.0, 1.0
    ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", vmin=low, vmax=high)
    for (i, j), v in np.ndenumerate(values):
        text = "missing" if math.isnan(v) else f"{v:.3f}" + ("" if cells[i][j].complete else MARK)
        ax.text(j, i, text, ha="center", va="center", color="black" if math.isnan(v) else "white")


def figure_per_class(report: Report, out: Path) -> tuple[str, list]:
    system, trains = report.chosen, report.study.train_stimuli
    shown = [report.cell(system, t, t) for t in trains if not report.cell(system, t, t).missing]
    caption = _caption(f"Per-class F1 on the matched test set, {system}", all(c.complete for c in shown),
                       [c.n_seeds for c in shown])
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(len(trains), 1)
    positions = np.arange(len(CLASSES))
    for k, train in enumerate(trains):
        cell = report.cell(system, train, train)
        label = f"train {train} / test {train}" + (" (missing)" if cell.missing else "" if cell.complete else MARK)
        if cell.missing:  # no bar at all (a zero-height bar would read as F1 = 0); the legend says missing
            ax.bar([], [], width, label=label)
            continue
        ax.bar(positions + (k - (len(trains) - 1) / 2) * width, np.array(cell.per_class), width, label=label)
    ax.set_xticks(positions, CLASSES)
    # Fixed limits: with no bars, autoscaling put the first and last tick on the axes' edges and cut "happy".
    ax.set_xlim(-0.5, len(CLASSES) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (pooled test predictions)")
    _title(ax, caption)
    if not shown:
        _no_data(ax)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return caption, save_figure(fig, out / f"per_class_f1_{slug(system)}")
