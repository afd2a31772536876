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
