"""Fixtures shared by the test modules."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def weeplaces_dir() -> Path:
    """Folder of the real Weeplaces CSV files: $GROUPIM_WEEPLACES, else <repo>/../shared/data/weeplaces.

    Tests that use it are skipped where the folder or its train_ui.csv is missing.
    """
    folder = Path(os.environ.get("GROUPIM_WEEPLACES", REPO.parent / "shared" / "data" / "weeplaces"))
    if not (folder / "train_ui.csv").is_file():
        pytest.skip(f"Weeplaces data not found in {folder}; set GROUPIM_WEEPLACES to the folder of its nine CSV files")
    return folder


@pytest.fixture(scope="session")
def weeplaces_slice(weeplaces_dir, tmp_path_factory) -> Path:
    """A small valid slice of Weeplaces: the first 400 training and 150 val and test groups."""
    from groupim.data import write_slice

    return write_slice(weeplaces_dir, tmp_path_factory.mktemp("weeplaces-slice"), (400, 150, 150))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> Path:
    """Point $MLFLOW_TRACKING_URI at a SQLite store in a temporary folder for the whole session.

    Searches started by tests then log there instead of to mlflow.db in the working folder.
    """
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        yield folder


@pytest.fixture(scope="module")
def slice_dir(weeplaces_dir, tmp_path_factory) -> Path:
    """200 training and 60 validation and test groups: a search trial trains an epoch in under a second."""
    from groupim.data import write_slice

    return write_slice(weeplaces_dir, tmp_path_factory.mktemp("data") / "weeplaces", (200, 60, 60))


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray runtime with the 2 CPUs of the machine; its GCS address lets a driver join."""
    import ray

    from search.run import ray_runtime_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env())
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, shared by the tests of a module."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def trained(weeplaces_slice):
    """A model fitted for 2 group epochs on the slice: (data, config, FitResult)."""
    from groupim.config import TrainConfig
    from groupim.data import load_dataset
    from groupim.train import fit

    data = load_dataset(weeplaces_slice)
    config = TrainConfig(
        embedding_size=16, batch_size=64, pretrain_user_epochs=1, pretrain_mi_epochs=1, epochs=2, eval_freq=1,
        num_threads=1,
    )
    return data, config, fit(config, data, progress=False)
