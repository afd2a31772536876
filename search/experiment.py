"""Search experiments: the YAML files under experiments/ loaded into one frozen dataclass.

An experiment file names its training defaults (`base`, a TrainConfig YAML file), overrides
some of them for every trial (`train`), and lists the search axes, the ASHA settings, the
resources of one trial and where results go. See experiments/weeplaces.yaml for a commented
example. Every unknown key and every invalid value raises ExperimentError naming it.

This module does not import Ray: search/tuner.py turns an Experiment into Ray objects.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from groupim.config import ConfigError, TrainConfig, load_config
from groupim.train import is_eval_epoch
from search.storage import RemotePath, is_uri, storage_location

ALGORITHMS = ("grid", "tpe")

# Axis kinds per search algorithm. Grid search enumerates `grid` values only; TPE samples
# from distributions and never enumerates a grid.
GRID_KINDS = ("grid",)
SAMPLED_KINDS = ("choice", "uniform", "loguniform", "quniform", "randint")

# TrainConfig fields that the experiment sets itself, so neither `train` nor an axis may.
EPOCHS_FIELD = "epochs"  # always scheduler.max_epochs
THREADS_FIELD = "num_threads"  # always resources.cpus_per_trial

EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExperimentError(ValueError):
    """An unknown key or an invalid value in a search experiment file."""


@dataclass(frozen=True)
class Axis:
    """One searched TrainConfig field and the values or distribution it takes."""

    name: str  # a TrainConfig field
    kind: str  # one of GRID_KINDS or SAMPLED_KINDS
    # grid, choice: the values; uniform, loguniform: (low, high); quniform: (low, high, step);
    # randint: (low, high) with high excluded, as in Ray Tune.
    values: tuple[Any, ...]


@dataclass(frozen=True)
class AshaSettings:
    """Asynchronous successive halving; its time unit is group-training epochs."""

    grace_period: int  # epochs every trial trains before it can be stopped
    reduction_factor: int  # 1 / fraction of trials promoted at each rung
    max_epochs: int  # no trial trains longer; also TrainConfig.epochs of every trial

    def rungs(self) -> list[int]:
        """Epochs at which ASHA compares trials: grace_period * reduction_factor**k up to max_epochs."""
        rungs, epoch = [], self.grace_period
        while epoch <= self.max_epochs:
            rungs.append(epoch)
            epoch *= self.reduction_factor
        return rungs


@dataclass(frozen=True)
class Resources:
    """Resources that Ray reserves for one trial."""

    cpus_per_trial: float
    gpus_per_trial: float  # a fraction lets several trials share one GPU

    @property
    def torch_threads(self) -> int:
        """torch CPU threads of a trial: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_trial))


@dataclass(frozen=True)
class Experiment:
    """A loaded search experiment; local paths are absolute."""

    name: str  # folder of the experiment under storage_path
    source: Path | RemotePath | None  # the YAML file it was loaded from
    train: TrainConfig  # settings of every trial before the axes are applied
    algorithm: str  # "grid" or "tpe"
    axes: tuple[Axis, ...]
    num_samples: int  # grid: repetitions of the whole grid; tpe: trials
    search_seed: int | None  # seed of the TPE sampler, or of the grid's shuffled order (None: 0)
    largest_first: tuple[str, ...]  # grid axes whose larger values start first, then the shuffled order
    max_concurrent_trials: int | None  # None: as many as the resources allow
    scheduler: AshaSettings
    resources: Resources
    max_failures: int  # retries of a failed trial, each from its latest checkpoint
    checkpoints_to_keep: int  # best checkpoints kept per trial, by the selection metric
    storage_path: Path | RemotePath  # a local folder, or a URI such as s3://bucket/prefix
    data: Path | None  # None: groupim.data.load_dataset(None), which downloads Weeplaces

    @property
    def path(self) -> Path | RemotePath:
        """The experiment folder: Ray Tune's trials, trials.csv, best.json and, if local, the pre-training store."""
        return self.storage_path / self.name

    @property
    def num_trials(self) -> int:
        """Number of trials the search runs to completion."""
        if self.algorithm == "grid":
            return self.num_samples * math.prod(len(axis.values) for axis in self.axes)
        return self.num_samples

    def trial_config(self, sampled: Mapping[str, Any]) -> TrainConfig:
        """Return the full TrainConfig of a trial whose axes took the `sampled` values."""
        return self.train.replace(**dict(sampled))

    def to_dict(self) -> dict[str, Any]:
        """Convert to a mapping that load_experiment_dict turns back into an equal Experiment."""
        return {
            "name": self.name,
            "data": None if self.data is None else str(self.data),
            "storage_path": str(self.storage_path),
            "train": {k: v for k, v in self.train.to_dict().items() if k not in (EPOCHS_FIELD, THREADS_FIELD)},
            "search": {
                "algorithm": self.algorithm,
                "num_samples": self.num_samples,
                "seed": self.search_seed,
                "largest_first": list(self.largest_first),
                "max_concurrent_trials": self.max_concurrent_trials,
                "axes": {axis.name: {axis.kind: list(axis.values)} for axis in self.axes},
            },
            "scheduler": {
                "grace_period": self.scheduler.grace_period,
                "reduction_factor": self.scheduler.reduction_factor,
                "max_epochs": self.scheduler.max_epochs,
            },
            "resources": {
                "cpus_per_trial": self.resources.cpus_per_trial,
                "gpus_per_trial": self.resources.gpus_per_trial,
            },
            "max_failures": self.max_failures,
            "checkpoints_to_keep": self.checkpoints_to_keep,
        }


TOP_LEVEL_KEYS = (
    "name", "base", "data", "storage_path", "train", "search", "scheduler", "resources",
    "max_failures", "checkpoints_to_keep",
)
SEARCH_KEYS = ("algorithm", "num_samples", "seed", "largest_first", "max_concurrent_trials", "axes")
SCHEDULER_KEYS = ("grace_period", "reduction_factor", "max_epochs")
RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial")

DEFAULT_STORAGE_PATH = "runs/search"
DEFAULT_MAX_FAILURES = 1
DEFAULT_CHECKPOINTS_TO_KEEP = 2


def load_experiment(
    path: str | Path | RemotePath,
    *,
    data: str | Path | None = None,
    storage_path: str | Path | None = None,
    num_samples: int | None = None,
) -> Experiment:
    """Load an experiment YAML file; keyword arguments override the file's values.

    `base` is relative to the YAML file's folder; `data` and `storage_path` are relative to
    the current directory, like the command-line options that override them.
    """
    path = storage_location(path)  # a URI when --resume reads the settings of an experiment on s3://
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ExperimentError(f"invalid YAML in {path}: {err}") from err
    if not isinstance(values, dict):
        raise ExperimentError(f"{path} must contain a mapping of key: value, not {type(values).__name__}")

    values = dict(values)
    values.setdefault("name", path.stem)
    if data is not None:
        values["data"] = str(data)
    if storage_path is not None:
        values["storage_path"] = str(storage_path)
    if num_samples is not None:
        values.setdefault("search", {})
        values["search"] = {**_mapping(values["search"], "search", path), "num_samples": num_samples}
    return load_experiment_dict(values, source=path)


def load_experiment_dict(values: Mapping[str, Any], source: Path | RemotePath | None = None) -> Experiment:
    """Build an Experiment from the parsed YAML mapping (see load_experiment)."""
    where = str(source) if source is not None else "experiment"
    _reject_unknown(values, TOP_LEVEL_KEYS, "", where)

    name = values.get("name")
    if not isinstance(name, str) or not EXPERIMENT_NAME.match(name):
        raise ExperimentError(
            f"invalid name in {where}: {name!r}; expected a folder name of letters, digits, '.', '_' and '-'"
        )

    scheduler = _load_scheduler(_mapping(values.get("scheduler"), "scheduler", where), where)
    resources = _load_resources(_mapping(values.get("resources", {}), "resources", where), where)
    train = _load_train(values, source, scheduler, resources, where)
    search = _mapping(values.get("search"), "search", where)
    _reject_unknown(search, SEARCH_KEYS, "search.", where)
    algorithm = search.get("algorithm", "grid")
    if algorithm not in ALGORITHMS:
        raise ExperimentError(f"invalid search.algorithm in {where}: {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    axes = _load_axes(_mapping(search.get("axes"), "search.axes", where), algorithm, train, where)
    _check_rungs_are_evaluated(scheduler, train, where)

    return Experiment(
        name=name,
        source=source,
        train=train,
        algorithm=algorithm,
        axes=axes,
        num_samples=_integer(search.get("num_samples", 1), "search.num_samples", where, minimum=1),
        search_seed=_optional_integer(search.get("seed"), "search.seed", where, minimum=0),
        largest_first=_load_largest_first(search.get("largest_first", []), algorithm, axes, where),
        max_concurrent_trials=_optional_integer(
            search.get("max_concurrent_trials"), "search.max_concurrent_trials", where, minimum=1
        ),
        scheduler=scheduler,
        resources=resources,
        max_failures=_integer(values.get("max_failures", DEFAULT_MAX_FAILURES), "max_failures", where, minimum=0),
        checkpoints_to_keep=_integer(
            values.get("checkpoints_to_keep", DEFAULT_CHECKPOINTS_TO_KEEP), "checkpoints_to_keep", where, minimum=1
        ),
        storage_path=_storage_path(values.get("storage_path", DEFAULT_STORAGE_PATH), where),
        data=None if values.get("data") is None else _absolute_path(values["data"], "data", where),
    )


def _load_train(
    values: Mapping[str, Any], source: Path | RemotePath | None, scheduler: AshaSettings, resources: Resources, where: str
) -> TrainConfig:
    overrides = dict(_mapping(values.get("train", {}), "train", where))
    for reserved, owner in ((EPOCHS_FIELD, "scheduler.max_epochs"), (THREADS_FIELD, "resources.cpus_per_trial")):
        if reserved in overrides:
            raise ExperimentError(f"train.{reserved} in {where} is set by {owner}; remove it from train")
    overrides[EPOCHS_FIELD] = scheduler.max_epochs
    overrides[THREADS_FIELD] = resources.torch_threads

    base = values.get("base")
    if base is not None and not isinstance(base, str):
        raise ExperimentError(f"invalid base in {where}: {base!r}; expected a path to a TrainConfig YAML file")
    base_path = None
    if base is not None:
        folder = source.parent if source is not None else Path.cwd()
        base_path = (folder / base).resolve()
    try:
        return load_config(base_path, overrides)
    except ConfigError as err:
        raise ExperimentError(f"invalid training settings in {where} (base {base_path}, train block): {err}") from err


def _load_scheduler(block: Mapping[str, Any], where: str) -> AshaSettings:
    _reject_unknown(block, SCHEDULER_KEYS, "scheduler.", where)
    for key in SCHEDULER_KEYS:
        if key not in block:
            raise ExperimentError(f"missing scheduler.{key} in {where}")
    settings = AshaSettings(
        grace_period=_integer(block["grace_period"], "scheduler.grace_period", where, minimum=1),
        reduction_factor=_integer(block["reduction_factor"], "scheduler.reduction_factor", where, minimum=2),
        max_epochs=_integer(block["max_epochs"], "scheduler.max_epochs", where, minimum=1),
    )
    if settings.grace_period > settings.max_epochs:
        raise ExperimentError(
            f"invalid scheduler.grace_period in {where}: {settings.grace_period} is above "
            f"scheduler.max_epochs {settings.max_epochs}"
        )
    return settings


def _load_resources(block: Mapping[str, Any], where: str) -> Resources:
    _reject_unknown(block, RESOURCE_KEYS, "resources.", where)
    cpus = _number(block.get("cpus_per_trial", 1), "resources.cpus_per_trial", where)
    gpus = _number(block.get("gpus_per_trial", 0), "resources.gpus_per_trial", where)
    if cpus <= 0:
        raise ExperimentError(f"invalid resources.cpus_per_trial in {where}: {cpus!r}; expected a number > 0")
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ExperimentError(
            f"invalid resources.gpus_per_trial in {where}: {gpus!r}; expected 0, a fraction below 1 or a whole number"
        )
    return Resources(cpus_per_trial=cpus, gpus_per_trial=gpus)


def _load_axes(block: Mapping[str, Any], algorithm: str, train: TrainConfig, where: str) -> tuple[Axis, ...]:
    if not block:
        raise ExperimentError(f"search.axes in {where} is empty; name at least one TrainConfig field to search")
    known = {f.name for f in fields(TrainConfig)}
    axes = []
    for name, spec in block.items():
        label = f"search.axes.{name}"
        if name not in known:
            raise ExperimentError(f"unknown {label} in {where}: not a TrainConfig field; valid fields: {', '.join(sorted(known))}")
        if name in (EPOCHS_FIELD, THREADS_FIELD):
            raise ExperimentError(f"{label} in {where} cannot be searched: it is set by the scheduler or resources block")
        axis = _load_axis(name, spec, label, where)
        allowed = GRID_KINDS if algorithm == "grid" else SAMPLED_KINDS
        if axis.kind not in allowed:
            raise ExperimentError(
                f"invalid {label} in {where}: {axis.kind!r} does not work with search.algorithm {algorithm}; "
                f"use one of {', '.join(allowed)}"
            )
        _check_axis_values(axis, train, label, where)
        axes.append(axis)
    return tuple(axes)


def _load_largest_first(value: Any, algorithm: str, axes: tuple[Axis, ...], where: str) -> tuple[str, ...]:
    """Return the axes of search.largest_first: numeric grid axes whose larger values start first."""
    label = "search.largest_first"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ExperimentError(f"invalid {label} in {where}: {value!r}; expected a list of axis names, e.g. [embedding_size]")
    if value and algorithm != "grid":
        raise ExperimentError(f"{label} in {where} orders a grid; remove it or set search.algorithm to grid")
    by_name = {axis.name: axis for axis in axes}
    for name in value:
        if name not in by_name:
            raise ExperimentError(f"invalid {label} in {where}: {name!r} is not an axis; axes: {', '.join(by_name)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in by_name[name].values):
            raise ExperimentError(
                f"invalid {label} in {where}: axis {name} has values that are not numbers; "
                "name a numeric grid axis such as embedding_size"
            )
    if len(set(value)) != len(value):
        raise ExperimentError(f"invalid {label} in {where}: {value!r} names an axis twice")
    return tuple(value)


def _load_axis(name: str, spec: Any, label: str, where: str) -> Axis:
    kinds = GRID_KINDS + SAMPLED_KINDS
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
        raise ExperimentError(
            f"invalid {label} in {where}: {spec!r}; expected one of {', '.join(kinds)} as the only key, "
            "e.g. {grid: [32, 64]} or {loguniform: [1.0e-4, 1.0e-2]}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ExperimentError(f"invalid {label}.{kind} in {where}: {values!r}; expected a non-empty list")
    if kind in ("grid", "choice"):
        if len(set(map(repr, values))) != len(values):
            raise ExperimentError(f"invalid {label}.{kind} in {where}: {values!r} repeats a value")
        return Axis(name, kind, tuple(values))

    expected = 3 if kind == "quniform" else 2
    if len(values) != expected:
        raise ExperimentError(f"invalid {label}.{kind} in {where}: {values!r}; expected {expected} numbers")
    numbers = tuple(_number(v, f"{label}.{kind}", where) for v in values)
    low, high = numbers[0], numbers[1]
    if not low < high:
        raise ExperimentError(f"invalid {label}.{kind} in {where}: low {low} is not below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ExperimentError(f"invalid {label}.{kind} in {where}: low {low} must be > 0 on a log scale")
    if kind == "randint" and not all(float(v).is_integer() for v in numbers):
        raise ExperimentError(f"invalid {label}.{kind} in {where}: {values!r}; expected integers")
    if kind == "quniform" and numbers[2] <= 0:
        raise ExperimentError(f"invalid {label}.{kind} in {where}: step {numbers[2]} must be > 0")
    return Axis(name, kind, numbers)


def _check_axis_values(axis: Axis, train: TrainConfig, label: str, where: str) -> None:
    """Validate the axis values through TrainConfig, so an invalid value fails at load time."""
    if axis.kind in ("grid", "choice"):
        samples = axis.values
    elif axis.kind == "randint":
        samples = (int(axis.values[0]), int(axis.values[1]) - 1)
    else:
        samples = axis.values[:2]
    for value in samples:
        try:
            train.replace(**{axis.name: value})
        except ConfigError as err:
            raise ExperimentError(f"invalid {label} in {where}: {err}") from err


def _check_rungs_are_evaluated(scheduler: AshaSettings, train: TrainConfig, where: str) -> None:
    """Require a validation evaluation at every ASHA rung, because trials report only then.

    A rung between two evaluations would be decided only at the next evaluation, so every
    trial would train past the rung before ASHA could stop it.
    """
    late = [rung for rung in scheduler.rungs() if not is_eval_epoch(rung - 1, scheduler.max_epochs, train)]
    if late:
        raise ExperimentError(
            f"invalid scheduler in {where}: group training does not evaluate at the ASHA rungs {late} "
            f"(train.eval_freq {train.eval_freq}, train.eval_final_epoch {train.eval_final_epoch}); "
            "choose a grace_period that is a multiple of eval_freq"
        )


def _reject_unknown(block: Mapping[str, Any], known: tuple[str, ...], prefix: str, where: str) -> None:
    unknown = sorted(set(block) - set(known))
    if unknown:
        names = ", ".join(prefix + key for key in unknown)
        raise ExperimentError(f"unknown key(s) in {where}: {names}; valid keys: {', '.join(prefix + k for k in known)}")


def _mapping(value: Any, label: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ExperimentError(f"invalid {label} in {where}: {value!r}; expected a mapping of key: value")
    return value


def _number(value: Any, label: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (YAML reads 1e-4 without a dot as a string; write 1.0e-4)" if _looks_like_exponent(value) else ""
        raise ExperimentError(f"invalid {label} in {where}: {value!r}; expected a number{hint}")
    if not math.isfinite(value):
        raise ExperimentError(f"invalid {label} in {where}: {value!r}; expected a finite number")
    return value


def _looks_like_exponent(value: Any) -> bool:
    """Return True for strings such as "1e-4", which YAML 1.1 reads as text because they lack a dot."""
    if not isinstance(value, str) or "e" not in value.lower():
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _integer(value: Any, label: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExperimentError(f"invalid {label} in {where}: {value!r}; expected an integer >= {minimum}")
    return value


def _optional_integer(value: Any, label: str, where: str, minimum: int) -> int | None:
    return None if value is None else _integer(value, label, where, minimum)


def _storage_path(value: Any, where: str) -> Path | RemotePath:
    """Return a URI such as s3://bucket/prefix as a RemotePath, else the absolute local folder."""
    if isinstance(value, str) and is_uri(value):
        try:
            return storage_location(value)
        except ValueError as err:
            raise ExperimentError(f"invalid storage_path in {where}: {err}") from err
    return _absolute_path(value, "storage_path", where)


def _absolute_path(value: Any, label: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ExperimentError(f"invalid {label} in {where}: {value!r}; expected a folder path")
    return Path(value).expanduser().resolve()
