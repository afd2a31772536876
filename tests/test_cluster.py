"""cluster.yaml and the search on a multi-node Ray cluster.

The configuration tests read cluster.yaml offline with Ray's own cluster-config schema and
defaults; nothing here talks to AWS.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.tune import ExperimentAnalysis

from ray_cluster import LocalRayCluster
from s3_server import BUCKET, moto_problem, s3_environment
from search.checkpoints import load_checkpoint_model
from search.experiment import load_experiment
from search.registry import CHAMPION_ALIAS, registered_model_name
from search.results import TRIALS_CSV
from search.storage import storage_location
from search.tracking import new_client
from search.tuner import trainable

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
BUCKET_PLACEHOLDER = "change-me-groupim-bucket"
INTERNET = {"0.0.0.0/0", "::/0"}


@pytest.fixture
def no_network(monkeypatch):
    """Make every socket connection and name lookup of this process fail."""

    def refuse(*args, **kwargs):
        raise OSError("network access is not allowed in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def all_commands(config: dict) -> list[str]:
    keys = (
        "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands",
    )
    return [command for key in keys for command in config.get(key, [])]


def pyproject_requirement(name: str) -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    candidates = project["dependencies"] + [req for group in project["optional-dependencies"].values() for req in group]
    for text in candidates:
        requirement = Requirement(text)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"{name} is not a requirement in pyproject.toml")


def pinned_version(commands: list[str], package: str) -> str:
    """Return the version of `package==X` in the pip install commands; fail if pinned twice differently."""
    versions = set()
    for command in commands:
        for word in shlex.split(command):
            match = re.fullmatch(rf"{re.escape(package)}(\[[\w,]+\])?==([\w.+]+)", word)
            if match and "install" in command:
                versions.add(match.group(2))
    assert len(versions) == 1, f"{package} pinned as {versions or 'nothing'} in {commands}"
    return versions.pop()


def test_cluster_yaml_valid_for_ray_schema(config, no_network):
    prepared = prepare_config(config)
    validate_config(prepared)

    # Ray fills absent keys from its AWS defaults, whose setup commands install another
    # Ray build. The prepared lists must therefore be exactly the file's.
    assert prepared["head_setup_commands"] == config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == config["worker_setup_commands"]
    assert set(prepared["available_node_types"]) == {"head.cpu", "worker.gpu"}


def test_cluster_shape(config):
    head = config["available_node_types"][config["head_node_type"]]
    workers = [node for name, node in config["available_node_types"].items() if name != config["head_node_type"]]

    assert config["provider"]["type"] == "aws"
    assert config["idle_timeout_minutes"] > 0
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert len(workers) == 1
    assert workers[0]["node_config"]["InstanceType"] == "g5.xlarge"
    assert workers[0]["resources"]["GPU"] == 1
    assert workers[0]["min_workers"] == 0
    assert workers[0]["max_workers"] == config["max_workers"] > 0


def test_only_ssh_open_to_internet(config):
    for node_type in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"], "Ray must create the group with its default rules"
        assert "NetworkInterfaces" not in node_type["node_config"]
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        ranges = {item["CidrIp"] for item in rule.get("IpRanges", [])} | {
            item["CidrIpv6"] for item in rule.get("Ipv6Ranges", [])
        }
        if ranges & INTERNET:
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22), f"rule open to the internet: {rule}"
    for command in all_commands(config):
        assert "0.0.0.0" not in command, command
        assert "[::]" not in command, command


def test_ray_default_rules_open_only_ssh(config):
    """The inbound rules Ray 2.60 creates for the group: SSH from anywhere, everything inside the group."""
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    rules = _create_default_inbound_rules(["sg-groupim"], config["provider"]["security_group"]["IpPermissions"])
    open_ports = [
        (rule["FromPort"], rule["ToPort"], rule["IpProtocol"])
        for rule in rules
        if {item["CidrIp"] for item in rule.get("IpRanges", [])} & INTERNET
    ]
    assert open_ports == [(22, 22, "tcp")]
    internal = [rule for rule in rules if rule.get("UserIdGroupPairs")]
    assert internal and internal[0]["UserIdGroupPairs"] == [{"GroupId": "sg-groupim"}]


def test_mlflow_server_on_private_address(config):
    servers = [command for command in config["head_start_ray_commands"] if "mlflow server" in command]
    assert len(servers) == 1
    arguments = shlex.split(servers[0].split("mlflow server", 1)[1].split(">", 1)[0])
    options = dict(zip(arguments[::2], arguments[1::2]))

    # Ray's node IP on EC2 is the instance's private address, because EC2 binds no public
    # address to an instance's network interface.
    assert options["--host"] == "$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')"
    assert options["--backend-store-uri"].startswith("sqlite:///$HOME/")
    assert options["--artifacts-destination"] == "s3://$GROUPIM_BUCKET/mlflow"
    assert not any("mlflow server" in command for command in config.get("worker_start_ray_commands", []))

    dashboard = [command for command in config["head_start_ray_commands"] if "ray start --head" in command]
    assert "--dashboard-host=127.0.0.1" in dashboard[0]


def test_tracking_uri_and_storage_path_on_head(config):
    exports = " ".join(config["head_start_ray_commands"])
    assert "export MLFLOW_TRACKING_URI=http://$(python -c 'import ray.util; print(ray.util.get_node_ip_address())'):5000" in exports
    assert "export GROUPIM_STORAGE_PATH=s3://$GROUPIM_BUCKET/ray-results" in exports


def test_bucket_named_once(config):
    text = CLUSTER_YAML.read_text()
    assert text.count(BUCKET_PLACEHOLDER) == 1
    line = next(line for line in text.splitlines() if BUCKET_PLACEHOLDER in line)
    assert "CHANGE ME" in line
    assert f"--env=GROUPIM_BUCKET={BUCKET_PLACEHOLDER}" in config["docker"]["run_options"]

    s3_uris = re.findall(r"s3://[^\s\"']+", " ".join(all_commands(config)))
    assert s3_uris, "the MLflow artifacts and Tune's storage path belong in the bucket"
    for uri in s3_uris:
        assert uri.startswith("s3://$GROUPIM_BUCKET/"), uri


def test_versions_match_pyproject(config):
    head = config["head_setup_commands"]
    workers = config["worker_setup_commands"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ci_torch = re.search(r"torch==([\w.]+)", (REPO / ".ci" / "run").read_text()).group(1)

    for commands in (head, workers):
        torch_version = pinned_version(commands, "torch")
        assert torch_version == ci_torch
        assert Version(torch_version) in pyproject_requirement("torch").specifier
        ray_version = pinned_version(commands, "ray")
        assert ray_version == ray.__version__, "`ray up` needs the same Ray version locally and on the cluster"
        assert Version(ray_version) in pyproject_requirement("ray").specifier
        mlflow_version = pinned_version(commands, "mlflow")
        assert mlflow_version == mlflow.__version__
        assert Version(mlflow_version) in pyproject_requirement("mlflow").specifier
    assert "download.pytorch.org/whl/cpu" in " ".join(head)
    assert "download.pytorch.org" not in " ".join(workers), "GPU nodes need the CUDA build from PyPI"

    images = [config["docker"]["image"], config["docker"]["worker_image"]]
    for image in images:
        match = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-(cpu|gpu)", image)
        assert match, image
        assert match.group(1) == ray.__version__
        python = Version(f"{match.group(2)}.{match.group(3)}")
        assert python in SpecifierSet(project["requires-python"])
    assert images[1].endswith("-gpu")


def test_project_and_data_on_every_node(config):
    (mount, source), = config["file_mounts"].items()
    assert source == "."
    assert mount == "~/groupim"
    for excluded in ("mlruns/", "mlartifacts/", "mlflow.db", "runs/"):
        assert excluded in config["rsync_exclude"]
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        joined = " ".join(commands)
        assert '-e "$HOME/groupim[search]"' in joined
        assert "load_dataset(None)" in joined
        assert joined.index("torch==") < joined.index("-e "), "torch must be installed before the project"


def test_gpu_experiment_is_default_grid():
    default = load_experiment(REPO / "experiments" / "weeplaces.yaml").to_dict()
    gpu = load_experiment(REPO / "experiments" / "weeplaces-gpu.yaml").to_dict()
    for key in default:
        if key not in ("name", "resources"):
            assert gpu[key] == default[key], key


def test_trials_request_gpu_fraction(config):
    experiment = load_experiment(REPO / "experiments" / "weeplaces-gpu.yaml")
    requested = trainable(experiment)._resources.required_resources
    assert requested == {"CPU": experiment.resources.cpus_per_trial, "GPU": experiment.resources.gpus_per_trial}

    worker = config["available_node_types"]["worker.gpu"]["resources"]
    trials_per_worker = min(worker["CPU"] / requested["CPU"], worker["GPU"] / requested["GPU"])
    assert trials_per_worker >= 4, "at least four trials share one GPU"


# --- The smoke search on a two-node Ray cluster on this machine -----------------------

SEARCH_TIMEOUT_S = 300
GPU_FRACTION = 0.5  # of the one logical GPU that each test node declares


def cluster_smoke_experiment(folder: Path, name: str) -> Path:
    """Write smoke.yaml as experiment `name` with GPU_FRACTION of a GPU per trial; return its path."""
    values = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    values["name"] = name
    values["base"] = str(REPO / "experiments" / values["base"])
    values["resources"]["gpus_per_trial"] = GPU_FRACTION
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def s3_server():
    """The environment variables that reach an S3 API on 127.0.0.1, or None where moto cannot run."""
    if moto_problem() is not None:
        yield None
        return
    with s3_environment() as env:
        yield env


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """A head and a worker node with one CPU and one logical GPU each.

    Ray schedules by the declared GPU count, so trials that request a fraction of a GPU run
    on these nodes without a GPU and train on the CPU.
    """
    cache = tmp_path_factory.mktemp("groupim-cache")
    with LocalRayCluster(extra_env={"GROUPIM_CACHE": str(cache), **(s3_server or {})}) as cluster:
        cluster.start_head(num_cpus=1, num_gpus=1)
        cluster.add_node("worker", num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes(2)
        yield cluster


def run_search(cluster: LocalRayCluster, experiment_file: Path, storage: str, tracking_uri: str, data: Path, *extra: str):
    command = [
        sys.executable, "search/run.py", "--experiment", str(experiment_file), "--address", cluster.address,
        "--storage-path", storage, "--tracking-uri", tracking_uri, "--data", str(data), *extra,
    ]
    result = subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def assert_ran_on_both_nodes(trials: pd.DataFrame) -> None:
    assert len(trials) == 6
    assert trials["node_id"].notna().all()
    assert trials["node_id"].nunique() == 2, "trials ran on both nodes"


def assert_trials_requested_gpu_fraction(experiment_uri: str) -> None:
    analysis = ExperimentAnalysis(experiment_uri)
    assert len(analysis.trials) == 6
    for trial in analysis.trials:
        assert trial.placement_group_factory.required_resources == {"CPU": 1.0, "GPU": GPU_FRACTION}


@pytest.mark.slow
def test_smoke_search_on_two_nodes(two_nodes, mlflow_server, weeplaces_slice, tmp_path):
    experiment_file = cluster_smoke_experiment(tmp_path, "smoke-cluster")
    # Both nodes run on this machine, so a folder here is shared by them like an NFS mount.
    storage = two_nodes.root / "shared-storage"
    run_search(two_nodes, experiment_file, str(storage), mlflow_server.uri, weeplaces_slice)

    experiment_path = storage / "smoke-cluster"
    assert_ran_on_both_nodes(pd.read_csv(experiment_path / TRIALS_CSV))
    assert_trials_requested_gpu_fraction(str(experiment_path))

    checkpoints = sorted(experiment_path.glob("train_trial_*/checkpoint_*"))
    assert len({folder.parent for folder in checkpoints}) == 6, "every trial kept checkpoints"
    for folder in checkpoints:
        model, config, details = load_checkpoint_model(folder)
        assert details["epoch"] >= 1
    best = json.loads((experiment_path / "best.json").read_text())
    assert Path(best["checkpoint"]) in checkpoints

    client = new_client(mlflow_server.uri)
    champion = client.get_model_version_by_alias(registered_model_name("smoke-cluster"), CHAMPION_ALIAS)
    assert champion.tags["trial_id"] == best["trial_id"]


@pytest.mark.slow
def test_smoke_search_on_s3_storage(two_nodes, s3_server, mlflow_server, weeplaces_slice, tmp_path):
    if s3_server is None:
        pytest.skip(moto_problem())
    experiment_file = cluster_smoke_experiment(tmp_path, "smoke-s3")
    storage = f"s3://{BUCKET}/ray-results"
    result = run_search(two_nodes, experiment_file, storage, mlflow_server.uri, weeplaces_slice)
    assert f"{storage}/smoke-s3/trials.csv" in result.stdout

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.items():
            patch.setenv(key, value)
        experiment_path = storage_location(f"{storage}/smoke-s3")
        trials = pd.read_csv(io.StringIO((experiment_path / TRIALS_CSV).read_text()))
        assert_ran_on_both_nodes(trials)
        assert_trials_requested_gpu_fraction(str(experiment_path))

        checkpoints = [folder for trial_dir in experiment_path.glob("train_trial_*") for folder in trial_dir.glob("checkpoint_*")]
        assert len({folder.parent for folder in checkpoints}) == 6, "every trial kept checkpoints"
        for folder in checkpoints:
            model, config, details = load_checkpoint_model(folder)
            assert details["epoch"] >= 1
        best = json.loads((experiment_path / "best.json").read_text())
        assert best["checkpoint"].startswith(f"{storage}/smoke-s3/")
        assert storage_location(best["checkpoint"]) in checkpoints
        assert not (experiment_path / "pretraining").exists(), "pre-trained states stay in each node's cache"

    client = new_client(mlflow_server.uri)
    champion = client.get_model_version_by_alias(registered_model_name("smoke-s3"), CHAMPION_ALIAS)
    assert champion.tags["trial_id"] == best["trial_id"]

    # --resume reads the saved settings and Ray Tune's state from the bucket; every trial has ended.
    resumed = run_search(two_nodes, experiment_file, storage, mlflow_server.uri, weeplaces_slice, "--resume")
    assert "6 trials, " in resumed.stdout
    assert " min since --resume:" in resumed.stdout
