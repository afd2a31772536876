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
