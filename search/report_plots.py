"""PNG plots of a final test report: validation curves per seed and the search landscape.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting needs
no display and leaves matplotlib's global backend alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

VALIDATION_PLOT = "validation_ndcg100.png"
LANDSCAPE_PLOT = "search_landscape.png"
DPI = 120

# Columns of the search landscape table (see search.report_tracking.search_landscape).
AGGREGATOR, EMBEDDING_SIZE, LAMBDA, BEST_METRIC, STOPPED_EARLY = (
    "aggregator", "embedding_size", "lambda_mi", "best_val_ndcg@100", "stopped_early"
)


def plot_validation_curves(seeds: Sequence[Mapping[str, Any]], path: Path, metric: str = "ndcg@100") -> Path:
    """Plot validation `metric` against the group epoch, one line per seed that has a history."""
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for seed in seeds:
        history = seed.get("history") or []
        if not history:
            continue
        epochs = [record["epoch"] for record in history]
        values = [record[metric] for record in history]
        axes.plot(epochs, values, marker="o", markersize=3, label=f"seed {seed['seed']}")
    axes.set_xlabel("group-training epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"validation {metric.replace('ndcg', 'NDCG')}")
    axes.set_title("Validation groups during retraining")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def plot_search_landscape(trials: pd.DataFrame, path: Path) -> Path:
    """Plot each trial's best validation NDCG@100 against lambda on a log2 axis.

    One panel per embedding size and one line per aggregator. Repeated configurations
    show their best trial. Trials that ASHA stopped early get open markers. Raises
    ValueError when no trial has a positive lambda and a finite metric.
    """
    usable = trials[(trials[LAMBDA] > 0) & trials[BEST_METRIC].map(lambda value: math.isfinite(value))]
    if usable.empty:
        raise ValueError("no trial with a lambda_mi > 0 and a finite validation NDCG@100 to plot")
    # The best trial of each configuration, which keeps its stopped_early flag.
    best = usable.sort_values(BEST_METRIC, ascending=False).drop_duplicates([EMBEDDING_SIZE, AGGREGATOR, LAMBDA])

    sizes = sorted(best[EMBEDDING_SIZE].unique())
    aggregators = sorted(best[AGGREGATOR].unique())
    figure = Figure(figsize=(4.5 * len(sizes), 4.2))
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    colors = {aggregator: f"C{index}" for index, aggregator in enumerate(aggregators)}
    for panel, size in zip(panels, sizes):
        for aggregator in aggregators:
            points = best[(best[EMBEDDING_SIZE] == size) & (best[AGGREGATOR] == aggregator)].sort_values(LAMBDA)
            if points.empty:
                continue
            color = colors[aggregator]
            panel.plot(points[LAMBDA], points[BEST_METRIC], color=color, label=aggregator)
            early = points[STOPPED_EARLY].astype(bool)
            panel.scatter(points.loc[~early, LAMBDA], points.loc[~early, BEST_METRIC], color=color, s=20)
            panel.scatter(points.loc[early, LAMBDA], points.loc[early, BEST_METRIC], facecolors="none", edgecolors=color, s=20)
        panel.set_xscale("log", base=2)
        panel.set_title(f"embedding size {size}")
        panel.set_xlabel("lambda (log2 scale)")
        panel.grid(alpha=0.3)
    panels[0].set_ylabel("best validation NDCG@100")
    panels[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path
