"""search.storage: which storage paths a multi-node Ray cluster accepts.

The cluster tests start three real Ray nodes on this machine (tests/ray_cluster.py) and run
the check in a driver process that joins them, as search/run.py does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_cluster import LocalRayCluster
from s3_server import BUCKET, moto_problem, s3_environment
from search import storage
from search.checkpoints import CHECKPOINT_FILE, SUMMARY_FILE, prune_checkpoints
from search.experiment import ExperimentError, load_experiment
from search.storage import (
    RemotePath, StorageError, append_line, check_storage_path, is_uri, local_path, remove_tree, storage_location,
)

REPO = Path(__file__).resolve().parents[1]

CHECK_SCRIPT = """
import sys
import ray
from search.storage import StorageError, check_storage_path
ray.init(address=sys.argv[1], logging_level="ERROR")
try:
    check_storage_path(sys.argv[2], timeout_s=60)
except StorageError as err:
    print(err)
    sys.exit(3)
print("accepted")
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("s3://bucket/ray-results", True),
        ("gs://bucket/prefix", True),
        ("file:///mnt/shared/runs", False),
        ("/mnt/nfs/runs", False),
        ("runs/search", False),
        ("C:\\runs", False),
    ],
)
def test_is_uri_by_scheme(path, expected):
    assert is_uri(path) is expected


def test_local_path_of_file_uri():
    assert local_path("file:///mnt/shared/runs") == Path("/mnt/shared/runs")
    assert local_path("/mnt/nfs/runs") == Path("/mnt/nfs/runs")


def test_uri_accepted_without_ray(monkeypatch):
    def fail():
        raise AssertionError("a URI must not need the list of nodes")

    monkeypatch.setattr(storage.ray, "nodes", fail)
    check_storage_path("s3://bucket/ray-results")


def test_local_path_accepted_on_one_node(monkeypatch, tmp_path):
    monkeypatch.setattr(storage.ray, "nodes", lambda: [{"Alive": True, "NodeID": "a" * 56}, {"Alive": False, "NodeID": "b" * 56}])
    check_storage_path(tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def run_check(cluster: LocalRayCluster, path: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, cluster.address, str(path)],
        cwd=REPO, env={**cluster.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180,
    )


def mount_namespace_problem(folder: Path) -> str | None:
    """Return why a private tmpfs cannot be mounted over folder here, or None when it can."""
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m", "probe", str(folder)],
        capture_output=True, text=True,
    )
    return None if probe.returncode == 0 else f"cannot mount a private tmpfs: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def cluster():
    """Start a head and a worker node, plus a node "isolated" with a private cluster.isolated_path.

    The isolated node finds an empty tmpfs of its own at that path. It exists only where
    mount namespaces are allowed; otherwise cluster.isolation_problem gives the reason.
    """
    with LocalRayCluster() as cluster:
        cluster.isolated_path = cluster.root / "node-local"
        cluster.isolated_path.mkdir()
        cluster.isolation_problem = mount_namespace_problem(cluster.isolated_path)
        cluster.start_head()
        cluster.add_node("shared")
        if cluster.isolation_problem is None:
            cluster.add_node("isolated", private_folder=cluster.isolated_path)
        cluster.num_nodes = 2 if cluster.isolation_problem else 3
        cluster.wait_for_nodes(cluster.num_nodes)
        yield cluster


@pytest.mark.slow
def test_shared_folder_accepted_on_cluster(cluster):
    folder = cluster.root / "shared-runs"
    result = run_check(cluster, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accepted" in result.stdout
    assert list(folder.iterdir()) == [], "the marker file must be removed"


@pytest.mark.slow
def test_node_local_folder_rejected(cluster):
    if cluster.isolation_problem:
        pytest.skip(cluster.isolation_problem)
    result = run_check(cluster, cluster.isolated_path / "runs")
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout
    assert "is not shared by all 3 nodes" in message
    assert "does not see the file" in message
    assert message.count("does not see the file") == 1, "only the isolated node lacks the marker"
    assert "shared file system" in message
    assert "s3://" in message


@pytest.mark.slow
def test_s3_uri_accepted_on_cluster(cluster):
    result = run_check(cluster, "s3://groupim-example-bucket/ray-results")
    assert result.returncode == 0, result.stdout + result.stderr


def test_remote_path_joins_keep_query():
    root = storage_location("s3://bucket/ray-results?endpoint_override=127.0.0.1:9000&scheme=http")
    assert isinstance(root, RemotePath)

    child = root / "smoke" / "trials.csv"
    assert str(child) == "s3://bucket/ray-results/smoke/trials.csv?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child.name == "trials.csv"
    assert child.stem == "trials"
    assert child.parent == root / "smoke"
    assert child.fs_path == "bucket/ray-results/smoke/trials.csv"
    assert storage_location("/mnt/nfs/runs") == Path("/mnt/nfs/runs")


def test_experiment_keeps_s3_storage_path():
    experiment = load_experiment(REPO / "experiments" / "smoke.yaml", storage_path="s3://bucket/ray-results")
    assert isinstance(experiment.storage_path, RemotePath)
    assert str(experiment.path) == "s3://bucket/ray-results/smoke"
    assert experiment.to_dict()["storage_path"] == "s3://bucket/ray-results"


def test_invalid_storage_uri_rejected():
    with pytest.raises(ExperimentError, match="invalid storage_path"):
        load_experiment(REPO / "experiments" / "smoke.yaml", storage_path="s3:///no-bucket")


@pytest.fixture
def s3_env(monkeypatch):
    problem = moto_problem()
    if problem is not None:
        pytest.skip(problem)
    with s3_environment() as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield env


def test_remote_path_files_on_s3(s3_env):
    folder = storage_location(f"s3://{BUCKET}/experiment")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.json").write_text('{"epoch": 1}')
    (folder / "b.txt").write_bytes(b"\x00\x01")

    assert (folder / "a.json").is_file()
    assert (folder / "a.json").read_text() == '{"epoch": 1}'
    assert (folder / "b.txt").read_bytes() == b"\x00\x01"
    assert not (folder / "missing").exists()
    assert sorted(child.name for child in folder.iterdir()) == ["a.json", "b.txt"]
    assert [child.name for child in folder.glob("*.json")] == ["a.json"]

    (folder / "b.txt").unlink()
    (folder / "b.txt").unlink(missing_ok=True)
    assert not (folder / "b.txt").exists()


def test_append_line_on_s3(s3_env):
    attempts = storage_location(f"s3://{BUCKET}/experiment/attempts/trial.jsonl")
    append_line(attempts, "first")
    append_line(attempts, "second")
    assert attempts.read_text() == "first\nsecond\n"


def test_remove_tree_on_s3(s3_env):
    folder = storage_location(f"s3://{BUCKET}/experiment/checkpoint_000001")
    (folder / "training_state.pt").write_bytes(b"state")
    (folder / "checkpoint.json").write_text("{}")
    remove_tree(folder)
    assert not folder.exists()
    remove_tree(folder)  # a missing folder is not an error


def test_append_line_creates_local_file(tmp_path):
    attempts = tmp_path / "attempts" / "trial.jsonl"
    append_line(attempts, "first")
    append_line(attempts, "second")
    assert attempts.read_text() == "first\nsecond\n"


def test_prune_checkpoints_on_s3(s3_env):
    trial_dir = storage_location(f"s3://{BUCKET}/experiment/train_trial_0")
    for index, value in enumerate([0.1, 0.5, 0.3, 0.4, 0.2]):
        folder = trial_dir / f"checkpoint_{index:06d}"
        (folder / CHECKPOINT_FILE).write_bytes(b"state")
        (folder / SUMMARY_FILE).write_text(json.dumps({"epoch": index + 1, "val/ndcg@100": value}))

    deleted = prune_checkpoints(trial_dir, "bucket/ignored/checkpoint_000004", keep=2, metric="val/ndcg@100")

    assert sorted(folder.name for folder in deleted) == ["checkpoint_000000", "checkpoint_000002"]
    remaining = sorted(folder.name for folder in trial_dir.glob("checkpoint_*"))
    assert remaining == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000004"]
