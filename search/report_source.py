"""Find what a final test report retrains: a registered model version or a trial run in MLflow.

A registered version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`, as search/registry.py
registers the best trial) gives its configuration and its checkpoint. A trial run (its
run id) gives the configuration from its parameters and the checkpoint logged with it,
or else the trial's best checkpoint listed in the search's trials.csv. Either way the
search's parent run gives the data folder, the data checksum and the search's wall time.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import mlflow.artifacts
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from groupim.checkpoint import load_checkpoint
from groupim.config import ConfigError, TrainConfig
from groupim.model import GroupIM
from search.pyfunc_model import CHECKPOINT_ARTIFACT
from search.registry import MODEL_ARTIFACT_PATH
from search.results import TRIALS_CSV
from search.tracking import TAG_DATA_CHECKSUM, TAG_DATA_SOURCE, TAG_EXPERIMENT_FOLDER, TAG_TRIAL_ID

logger = logging.getLogger(__name__)

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))$")
PYFUNC_FLAVOR = "python_function"
# MLflow's error codes for a missing model, version or run, and (in MLflow 3.17) a missing alias.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")

# Kinds of checkpoint a report evaluates besides its seeds.
GROUPIM_CHECKPOINT = "groupim"  # written by groupim.checkpoint.save_checkpoint (a registered model's)
TRIAL_CHECKPOINT = "trial"  # a Ray Tune trial's checkpoint folder (search/checkpoints.py)


class ReportError(ValueError):
    """The model, run or data that a report should use is missing or inconsistent."""


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint on this machine that the report evaluates as it is."""

    label: str  # its row in report.md, for example "registered version 3"
    kind: str  # GROUPIM_CHECKPOINT or TRIAL_CHECKPOINT
    path: Path  # a model.pt file, or a trial checkpoint folder

    def load_model(self) -> GroupIM:
        """Load the checkpoint's model in eval mode on the CPU."""
        if self.kind == GROUPIM_CHECKPOINT:
            return load_checkpoint(self.path)[0]
        from search.checkpoints import load_checkpoint_model  # imports Ray Tune

        return load_checkpoint_model(self.path)[0]


@dataclass(frozen=True)
class ReportSource:
    """The searched configuration to retrain, where it came from and the search it belongs to."""

    description: str  # for the report's first line, e.g. "models:/groupim-smoke/1 (alias champion)"
    experiment_name: str  # the MLflow experiment, named after the search experiment
    experiment_id: str
    run_id: str  # the run whose parameters or registered checkpoint give the configuration
    parent_run_id: str | None  # the search's parent run; None when the run has none
    model_uri: str | None  # models:/NAME/VERSION for a registered model
    config: TrainConfig  # as the search trained it
    checkpoint: CheckpointRef | None  # None when no checkpoint of the run is kept
    data_source: str | None  # the data folder the search read
    data_checksum: str | None
    search_seconds: float | None  # the parent run's start to end, when it has ended

    def to_report(self, tracking_uri: str) -> dict[str, Any]:
        return {
            "description": self.description,
            "experiment": self.experiment_name,
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "search_parent_run_id": self.parent_run_id,
            "tracking_uri": tracking_uri,
            "evaluated_checkpoint": str(self.checkpoint.path) if self.checkpoint is not None else None,
        }


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split `models:/NAME@ALIAS` or `models:/NAME/VERSION` into (name, alias, version)."""
    match = MODEL_URI.match(uri)
    if match is None:
        raise ReportError(f"invalid model URI {uri!r}; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def resolve_model(client: MlflowClient, uri: str, tracking_uri: str, download_to: Path) -> ReportSource:
    """Find the registered version of `uri`, its run and search, and download its checkpoint into `download_to`."""
    name, alias, version_number = parse_model_uri(uri)
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, version_number)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND:
            raise
        raise ReportError(
            f"model {uri} not found in the registry at {tracking_uri}: {err.message}; "
            "run the search first, or pass --tracking-uri of the store it logged to"
        ) from None
    if not version.run_id:
        raise ReportError(f"{uri} (version {version.version}) has no run, so its search is unknown")

    checkpoint_path = download_model_checkpoint(version.source, tracking_uri, download_to)
    _, config, payload = load_checkpoint(checkpoint_path)
    run = client.get_run(version.run_id)
    described = f"models:/{name}/{version.version}" + (f" (alias {alias})" if alias else "")
    checkpoint = CheckpointRef(f"registered version {version.version}", GROUPIM_CHECKPOINT, checkpoint_path)
    return _source(client, run, described, f"models:/{name}/{version.version}", config, checkpoint, payload.get("data_checksum"))


def resolve_run(client: MlflowClient, run_id: str, tracking_uri: str, download_to: Path) -> ReportSource:
    """Find a trial run, its configuration (from its parameters) and a checkpoint of it."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND:
            raise
        raise ReportError(f"run {run_id} not found at {tracking_uri}: {err.message}") from None
    if TAG_TRIAL_ID not in run.data.tags:
        raise ReportError(
            f"run {run_id} ({run.info.run_name}) is not a trial run of a search (it has no {TAG_TRIAL_ID} tag); "
            "pass the run id of a trial, or --model models:/NAME@champion"
        )
    config = config_from_params(run.data.params, f"the parameters of run {run_id}")

    checkpoint = None
    logged = [artifact.path for artifact in client.list_artifacts(run_id)]
    if MODEL_ARTIFACT_PATH in logged:
        source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
        path = download_model_checkpoint(source, tracking_uri, download_to)
        checkpoint = CheckpointRef("model logged with the run", GROUPIM_CHECKPOINT, path)
    else:
        checkpoint = trial_checkpoint(client, run)
    described = f"trial run {run.info.run_name} ({run_id})"
    return _source(client, run, described, None, config, checkpoint, None)


def _source(
    client: MlflowClient,
    run: Run,
    description: str,
    model_uri: str | None,
    config: TrainConfig,
    checkpoint: CheckpointRef | None,
    checkpoint_data_checksum: str | None,
) -> ReportSource:
    parent_id = parent_run_id(run)
    parent = client.get_run(parent_id) if parent_id is not None else None
    parent_tags = parent.data.tags if parent is not None else {}
    data_checksum = parent_tags.get(TAG_DATA_CHECKSUM) or checkpoint_data_checksum
    if checkpoint_data_checksum and data_checksum and checkpoint_data_checksum != data_checksum:
        raise ReportError(
            f"the checkpoint of {description} was trained on data with checksum {checkpoint_data_checksum[:12]}, "
            f"but its search logged {data_checksum[:12]}"
        )
    seconds = None
    if parent is not None and parent.info.end_time:
        seconds = (parent.info.end_time - parent.info.start_time) / 1000
    return ReportSource(
        description=description,
        experiment_name=client.get_experiment(run.info.experiment_id).name,
        experiment_id=run.info.experiment_id,
        run_id=run.info.run_id,
        parent_run_id=parent_id,
        model_uri=model_uri,
        config=config,
        checkpoint=checkpoint,
        data_source=parent_tags.get(TAG_DATA_SOURCE),
        data_checksum=data_checksum,
        search_seconds=seconds,
    )


def parent_run_id(run: Run) -> str | None:
    """Return the search's parent run of a trial run, or the run itself when it is a parent run.

    search/registry.py logs the champion to the parent run when the best trial has no run.
    """
    tags = run.data.tags
    if MLFLOW_PARENT_RUN_ID in tags:
        return tags[MLFLOW_PARENT_RUN_ID]
    if TAG_TRIAL_ID not in tags:
        return run.info.run_id
    return None


def download_model_checkpoint(model_source: str, tracking_uri: str, download_to: Path) -> Path:
    """Download the groupim checkpoint of a logged pyfunc model (not the whole model) and return its path."""
    download_to.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model_source}/MLmodel", dst_path=str(download_to), tracking_uri=tracking_uri
    )
    flavor = Model.load(local).flavors.get(PYFUNC_FLAVOR, {})
    artifact = flavor.get("artifacts", {}).get(CHECKPOINT_ARTIFACT)
    if artifact is None:
        raise ReportError(f"{model_source} is not a GroupIM pyfunc model: its MLmodel has no {CHECKPOINT_ARTIFACT!r} artifact")
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model_source}/{artifact['path']}", dst_path=str(download_to), tracking_uri=tracking_uri
    )
    return Path(path)


def trial_checkpoint(client: MlflowClient, run: Run) -> CheckpointRef | None:
    """Find the trial's best kept checkpoint in its search's trials.csv; None with a warning when there is none."""
    trial_id = run.data.tags[TAG_TRIAL_ID]
    parent_id = parent_run_id(run)
    folder = client.get_run(parent_id).data.tags.get(TAG_EXPERIMENT_FOLDER) if parent_id else None
    trials_path = Path(folder) / TRIALS_CSV if folder else None
    if trials_path is None or not trials_path.is_file():
        logger.warning("no %s of the search on this machine (%s); the trial's checkpoint is not evaluated", TRIALS_CSV, trials_path)
        return None
    trials = pd.read_csv(trials_path, dtype={"trial_id": str})
    rows = trials[trials["trial_id"] == trial_id]
    path = rows["checkpoint"].iloc[0] if len(rows) else None
    if not isinstance(path, str) or not Path(path).is_dir():
        logger.warning("trial %s has no kept best checkpoint in %s; it is not evaluated", trial_id, trials_path)
        return None
    return CheckpointRef(f"best checkpoint of trial {trial_id}", TRIAL_CHECKPOINT, Path(path))


def config_from_params(params: Mapping[str, str], where: str) -> TrainConfig:
    """Rebuild a TrainConfig from MLflow parameters, which store every value as str(value)."""
    names = [field.name for field in fields(TrainConfig)]
    missing = [name for name in names if name not in params]
    if missing:
        raise ReportError(f"{where} lack the training settings {', '.join(missing)}, so the configuration is unknown")
    try:
        return TrainConfig.from_dict({name: _param_value(params[name]) for name in names}, source=where)
    except ConfigError as err:
        raise ReportError(str(err)) from None


def _param_value(text: str) -> Any:
    # str(None) and str(True) are Python spellings that YAML reads as a string and a bool.
    if text == "None":
        return None
    value = yaml.safe_load(text)
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return value if isinstance(value, (bool, int, float, str)) else text
