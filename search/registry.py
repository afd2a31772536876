"""Log the best model of a search as an MLflow pyfunc model and register it as `champion`.

This runs on the driver from checkpoint storage, so it works when the trials ran on other
nodes. The model directory is built locally: the checkpoint, the member_items matrix and
the code of groupim and search/pyfunc_model.py. It is uploaded as artifacts of the best
trial's run (of the parent run when that trial has no run) and registered as a new
version of the model with the alias `champion`. Load it with
`mlflow.pyfunc.load_model("models:/NAME@champion")`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import scipy
import scipy.sparse as sp
import torch
import tqdm
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from groupim.checkpoint import save_checkpoint
from groupim.config import TrainConfig
from groupim.model import GroupIM
from search import pyfunc_model
from search.pyfunc_model import CHECKPOINT_ARTIFACT, DEFAULT_K, MEMBER_ITEMS_ARTIFACT, GroupRecommender
from search.tracking import TAG_VALUE_LIMIT, TrackingTarget, call_with_retry, find_trial_run, metric_key, new_client

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_PATH = "champion_model"  # in the run's artifacts
TAG_CHAMPION_VERSION = "champion_version"  # on the parent run
REPO_ROOT = Path(__file__).resolve().parent.parent


def registered_model_name(experiment_name: str) -> str:
    """Return the registry name of a search experiment's models, for example `groupim-weeplaces`."""
    return f"groupim-{experiment_name}"


def log_champion(
    target: TrackingTarget,
    model_name: str,
    model: GroupIM,
    config: TrainConfig,
    member_items: sp.csr_matrix,
    metrics: Mapping[str, float],
    trial_id: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    data_checksum: str | None = None,
) -> ModelVersion:
    """Log `model` as a pyfunc model, register it as a new version of `model_name`, alias it `champion`.

    `metrics` are the validation metrics of the model's epoch (for example `val/ndcg@100`).
    They become tags of the version, as do every training setting (`config.<name>`) and
    `extra_tags`. Raises MlflowException when the store rejects a step.
    """
    client = new_client(target.tracking_uri)
    run_id = _model_run_id(client, target, trial_id)
    with tempfile.TemporaryDirectory(prefix="groupim-pyfunc-") as folder:
        model_dir = build_model_dir(Path(folder), model, config, member_items, metrics, data_checksum)
        call_with_retry(lambda: client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH), "uploading the model")

    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
    _ensure_registered_model(client, model_name)
    tags = version_tags(config, metrics, trial_id, extra_tags)
    version = call_with_retry(
        lambda: client.create_model_version(model_name, source, run_id=run_id, tags=tags), "registering the model"
    )
    call_with_retry(
        lambda: client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version), "setting the alias"
    )
    client.set_tag(target.parent_run_id, TAG_CHAMPION_VERSION, f"{model_name}/{version.version}")
    logger.info("MLflow: registered %s version %s as @%s from run %s", model_name, version.version, CHAMPION_ALIAS, run_id)
    return version


def _model_run_id(client: MlflowClient, target: TrackingTarget, trial_id: str | None) -> str:
    if trial_id is not None:
        run = call_with_retry(lambda: find_trial_run(client, target, trial_id), "finding the best trial's run")
        if run is not None:
            return run.info.run_id
        logger.warning("MLflow: trial %s has no run; the model goes to parent run %s", trial_id, target.parent_run_id)
    return target.parent_run_id


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="GroupIM group recommender; the champion is the best trial of the latest search")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def version_tags(
    config: TrainConfig, metrics: Mapping[str, float], trial_id: str | None, extra_tags: Mapping[str, Any] | None
) -> dict[str, str]:
    tags = {f"config.{key}": str(value) for key, value in config.to_dict().items()}
    tags.update({metric_key(name): repr(float(value)) for name, value in metrics.items()})
    if trial_id is not None:
        tags["trial_id"] = trial_id
    tags.update({key: str(value) for key, value in (extra_tags or {}).items() if value is not None})
    return {key: value[:TAG_VALUE_LIMIT] for key, value in tags.items()}


def build_model_dir(
    folder: Path,
    model: GroupIM,
    config: TrainConfig,
    member_items: sp.csr_matrix,
    metrics: Mapping[str, float],
    data_checksum: str | None,
) -> Path:
    """Save the pyfunc model under folder/model and return that path."""
    if member_items.shape[1] != model.n_items:
        raise ValueError(f"member_items has {member_items.shape[1]} items but the model {model.n_items}")
    checkpoint = save_checkpoint(folder / "model.pt", model, config, dict(metrics), data_checksum)
    member_items_path = folder / "member_items.npz"
    sp.save_npz(member_items_path, member_items.tocsr().astype(np.float32))
    code = _stage_code(folder / "code")

    model_dir = folder / "model"
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=GroupRecommender(),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), MEMBER_ITEMS_ARTIFACT: str(member_items_path)},
        code_paths=[str(code / "groupim"), str(code / "search")],
        # The example's params become the schema of `k` with its default; MLflow runs the
        # example through the model once, which checks the saved model end to end.
        input_example=(_example_groups(member_items), {"k": DEFAULT_K}),
        pip_requirements=_pip_requirements(),
        metadata={"data_checksum": data_checksum, "n_users": member_items.shape[0], "n_items": model.n_items},
    )
    return model_dir


def _stage_code(folder: Path) -> Path:
    """Copy the packages the pyfunc imports: groupim whole, and of search only pyfunc_model.py.

    The model is pickled with a reference to search.pyfunc_model.GroupRecommender, so the
    copy keeps the package layout. MLflow puts `folder` on sys.path when it loads the model.
    """
    shutil.copytree(REPO_ROOT / "groupim", folder / "groupim", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "search").mkdir(parents=True)
    (folder / "search" / "__init__.py").write_text("")
    shutil.copy2(pyfunc_model.__file__, folder / "search" / "pyfunc_model.py")
    return folder


def _example_groups(member_items: sp.csr_matrix) -> list[list[int]]:
    """Return one group made of the first two users with a history."""
    users = np.flatnonzero(np.diff(member_items.indptr) > 0)[:2]
    return [[int(user) for user in users]]


def _pip_requirements() -> list[str]:
    # Pinned to this environment, without local version labels such as "+cpu", which PyPI lacks.
    versions = {
        "mlflow": mlflow.__version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pandas": pd.__version__,
        "pyyaml": yaml.__version__,
        "tqdm": tqdm.__version__,
    }
    return [f"{name}=={version}" for name, version in versions.items()]


def log_best_trial(
    target: TrackingTarget,
    model_name: str,
    best: Mapping[str, Any],
    member_items: sp.csr_matrix,
    data_checksum: str | None = None,
) -> ModelVersion:
    """Register the checkpoint of a search's best trial (the content of best.json) as `champion`.

    Reads the trial checkpoint from storage with search.checkpoints.load_checkpoint_model.
    """
    from search.checkpoints import load_checkpoint_model  # imports Ray; only the driver needs it

    if not best.get("checkpoint"):
        raise FileNotFoundError(
            f"the best trial {best.get('trial_id')} has no kept checkpoint of its best epoch {best.get('epoch')}"
        )
    registered = _registered_checkpoint(target, model_name, str(best["checkpoint"]))
    if registered is not None:
        logger.info(
            "MLflow: %s version %s is already this search's best checkpoint, so it is not registered again",
            model_name, registered.version,
        )
        return registered
    model, config, details = load_checkpoint_model(best["checkpoint"])
    extra = {"epoch": details.get("epoch"), "checkpoint": best["checkpoint"], "experiment": best.get("experiment")}
    return log_champion(
        target, model_name, model, config, member_items, best["metrics"], best.get("trial_id"), extra, data_checksum
    )


def _registered_checkpoint(target: TrackingTarget, model_name: str, checkpoint: str) -> ModelVersion | None:
    """Return the version that this search already registered from `checkpoint`, or None.

    Resuming a finished search ends it again, and registering again would add a copy of
    the same model and move the alias back to it.
    """
    client = new_client(target.tracking_uri)
    try:
        tag = client.get_run(target.parent_run_id).data.tags.get(TAG_CHAMPION_VERSION, "")
        name, _, number = tag.rpartition("/")
        if name != model_name or not number:
            return None
        version = client.get_model_version(name, number)
    except MlflowException:
        return None
    return version if version.tags.get("checkpoint") == checkpoint[:TAG_VALUE_LIMIT] else None
