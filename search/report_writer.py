"""The numbers of a final test report, and its two files: report.json and report.md.

`build_report` collects everything into one JSON-ready mapping, and `write_markdown`
renders report.md from that mapping alone, so the two files always show the same numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from scipy import stats

from groupim.metrics import METRICS

CONFIDENCE = 0.95  # of the t-distribution confidence interval of a mean over seeds
SPLITS = ("test_groups", "test_users")  # where each model is evaluated
SPLIT_TITLES = {"test_groups": "Test groups", "test_users": "Test users"}
METRIC_TITLES = {"ndcg@20": "NDCG@20", "ndcg@50": "NDCG@50", "ndcg@100": "NDCG@100", "recall@20": "Recall@20", "recall@50": "Recall@50"}

# GroupIM's published results on the Weeplaces test groups, all 25,081 items ranked, as
# reported by Sankar et al., "GroupIM: A Mutual Information Maximization Framework for
# Neural Group Recommendation", SIGIR 2020, Table 2. NDCG@100 was not published.
PUBLISHED_SOURCE = "Sankar et al., SIGIR 2020, Table 2 (Weeplaces test groups)"
PUBLISHED = {
    "attention": {"ndcg@20": 0.521, "ndcg@50": 0.546, "recall@20": 0.716, "recall@50": 0.813},
    "meanpool": {"ndcg@20": 0.518, "ndcg@50": 0.543, "recall@20": 0.706, "recall@50": 0.804},
    "maxpool": {"ndcg@20": 0.479, "ndcg@50": 0.505, "recall@20": 0.676, "recall@50": 0.776},
}

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass(frozen=True)
class Summary:
    """Mean of a metric over seeds with its spread; NaN where fewer than two seeds give no spread."""

    n: int  # seeds with a finite value
    mean: float
    std: float  # sample standard deviation (ddof=1)
    ci_low: float  # CONFIDENCE interval of the mean, Student's t with n - 1 degrees of freedom
    ci_high: float


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Summarize one metric over seeds; NaN values (failed seeds) are left out."""
    finite = [float(value) for value in values if value is not None and math.isfinite(value)]
    n = len(finite)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(finite) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((value - mean) ** 2 for value in finite) / (n - 1))
    half_width = stats.t.ppf((1 + confidence) / 2, df=n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half_width, mean + half_width)


def summarize_seeds(seeds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Summarize every split and metric over the seeds that succeeded: {split: {metric: Summary fields}}."""
    succeeded = [seed for seed in seeds if seed.get("error") is None]
    return {
        split: {name: asdict(summarize([seed[split][name] for seed in succeeded])) for name in METRICS}
        for split in SPLITS
    }


def build_report(
    *,
    source: Mapping[str, Any],
    config: Mapping[str, Any],
    overrides: Mapping[str, Any],
    seeds: Sequence[Mapping[str, Any]],
    registered: Mapping[str, Any] | None,
    data: Mapping[str, Any],
    versions: Mapping[str, str | None],
    wall_time: Mapping[str, float | None],
    plots: Mapping[str, str],
) -> dict[str, Any]:
    """Collect the report's content; NaN becomes None so that the result is valid JSON.

    `seeds` contains one entry per seed with `seed`, `error` (None on success), the test
    metrics per split, `best_epoch`, `validation` (best validation group metrics), `seconds`,
    `checkpoint` and `history`. `registered` contains the test metrics of the registered
    checkpoint per split and its `label`, or is None when there is no checkpoint to evaluate.
    """
    report = {
        "source": dict(source),
        "config": dict(config),
        "overrides": dict(overrides),
        "confidence": CONFIDENCE,
        "seeds": [dict(seed) for seed in seeds],
        "summary": summarize_seeds(seeds),
        "registered_checkpoint": dict(registered) if registered is not None else None,
        "published": {"source": PUBLISHED_SOURCE, "rows": PUBLISHED},
        "data": dict(data),
        "versions": dict(versions),
        "wall_time": dict(wall_time),
        "plots": dict(plots),
    }
    return _json_ready(report)


def write_json(report: Mapping[str, Any], folder: Path) -> Path:
    path = folder / REPORT_JSON
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


# ---------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------

def write_markdown(report: Mapping[str, Any], folder: Path) -> Path:
    path = folder / REPORT_MD
    path.write_text(render_markdown(report))
    return path


def render_markdown(report: Mapping[str, Any]) -> str:
    """Render report.md from the mapping that build_report returns."""
    sections = [
        _title_section(report),
        _results_section(report, "test_groups"),
        _results_section(report, "test_users"),
        _plots_section(report),
        _config_section(report),
        _environment_section(report),
    ]
    return "\n\n".join(section.rstrip() for section in sections) + "\n"


def _title_section(report: Mapping[str, Any]) -> str:
    source = report["source"]
    config = report["config"]
    seeds = report["seeds"]
    failed = [seed for seed in seeds if seed["error"] is not None]
    lines = [
        f"# GroupIM test report: {source['experiment']}",
        "",
        f"Configuration of {source['description']}, retrained from scratch with {len(seeds)} seeds "
        f"({', '.join(str(seed['seed']) for seed in seeds)}) for {config['epochs']} group epochs, "
        f"and evaluated once on the test groups and test users. The validation split chose the best "
        f"epoch of each seed; the test split was used for this report only.",
    ]
    if failed:
        lines += ["", f"{len(failed)} seed(s) failed and are left out of the means:"]
        lines += [f"- seed {seed['seed']}: {seed['error']}" for seed in failed]
    return "\n".join(lines)


def _results_section(report: Mapping[str, Any], split: str) -> str:
    titles = [METRIC_TITLES[name] for name in METRICS]
    per_seed = ["seed", "best epoch", "validation NDCG@100", *titles, "minutes"] if split == "test_groups" else ["seed", *titles]
    lines = [f"## {SPLIT_TITLES[split]}", "", "Per seed:", "", _row(per_seed), _rule(len(per_seed), first="---:")]
    for seed in report["seeds"]:
        if seed["error"] is not None:
            lines.append(_row([seed["seed"], "failed"] + [""] * (len(per_seed) - 2)))
            continue
        values = [_number(seed[split][name]) for name in METRICS]
        if split == "test_groups":
            validation = _number(seed["validation"].get("ndcg@100"))
            lines.append(_row([seed["seed"], seed["best_epoch"], validation, *values, f"{seed['seconds'] / 60:.1f}"]))
        else:
            lines.append(_row([seed["seed"], *values]))

    summary = report["summary"][split]
    n = summary[METRICS[0]]["n"]
    lines += ["", "Summary:", "", _row(["", *titles]), _rule(len(titles) + 1, first="---")]
    lines.append(_row([f"mean ± std over {n} seeds", *(_mean_std(summary[name]) for name in METRICS)]))
    lines.append(_row([f"{report['confidence']:.0%} confidence interval of the mean", *(_interval(summary[name]) for name in METRICS)]))
    registered = report["registered_checkpoint"]
    if registered is not None:
        lines.append(_row([registered["label"], *(_number(registered[split][name]) for name in METRICS)]))
    if split == "test_groups":
        for aggregator, published in report["published"]["rows"].items():
            label = f"published GroupIM, {aggregator}" + (" (this aggregator)" if aggregator == report["config"]["aggregator"] else "")
            # Published to three decimals; more digits would claim a precision they lack.
            lines.append(_row([label, *(_number(published.get(name), digits=3) for name in METRICS)]))
    lines += ["", "The interval is Student's t with n - 1 degrees of freedom around the mean over the seeds."]
    if split == "test_groups":
        lines.append(
            f"Published rows: {report['published']['source']}, where NDCG@100 was not reported. Recall@K divides "
            "the hits in the top K by min(K, the number of held-out items), here as there."
        )
    return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _rule(columns: int, first: str) -> str:
    """Return the header rule of a table whose first column aligns as `first` and the rest to the right."""
    return _row([first] + ["---:"] * (columns - 1))


def _plots_section(report: Mapping[str, Any]) -> str:
    plots = report["plots"]
    lines = ["## Plots", ""]
    if "validation" in plots:
        lines += ["Validation NDCG@100 per group epoch, one line per seed:", "", f"![validation NDCG@100]({plots['validation']})", ""]
    if "landscape" in plots:
        lines += [
            "The search: best validation NDCG@100 of each trial against lambda, one line per aggregator "
            "and one panel per embedding size; open markers are trials that ASHA stopped early:",
            "",
            f"![search landscape]({plots['landscape']})",
        ]
    else:
        lines.append("No search landscape: the search's trial runs were not found in MLflow.")
    return "\n".join(lines)


def _config_section(report: Mapping[str, Any]) -> str:
    overrides = report["overrides"]
    lines = ["## Configuration", ""]
    if overrides:
        changed = ", ".join(f"{key}={value}" for key, value in overrides.items())
        lines += [f"Changed from the searched configuration with --set: {changed}.", ""]
    lines += ["| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in report["config"].items()]
    return "\n".join(lines)


def _environment_section(report: Mapping[str, Any]) -> str:
    source, data, wall = report["source"], report["data"], report["wall_time"]
    lines = ["## Source, data and environment", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in source.items() if value is not None and key != "description"]
    lines += [
        f"- data: {data['source']} ({data['n_items']} items, {data['n_users']} users, "
        f"{data['test_groups']} test groups, {data['test_users']} test users)",
        f"- data checksum (SHA-256 of the nine CSV files): {data['checksum']}",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in report["versions"].items() if version),
        f"- wall time of this report: {_minutes(wall.get('report_seconds'))}, "
        f"of which seed training {_minutes(wall.get('seeds_seconds'))} in parallel",
    ]
    if wall.get("search_seconds") is not None:
        lines.append(f"- wall time of the search (its MLflow parent run, start to end): {_minutes(wall['search_seconds'])}")
    return "\n".join(lines)


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(summary: Mapping[str, float | None]) -> str:
    if summary["mean"] is None:
        return "n/a"
    if summary["std"] is None:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}"


def _interval(summary: Mapping[str, float | None]) -> str:
    if summary["ci_low"] is None:
        return "n/a"
    return f"[{summary['ci_low']:.4f}, {summary['ci_high']:.4f}]"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"
