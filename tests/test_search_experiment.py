"""Loading search experiments from YAML: the shipped files and every kind of invalid input."""

from pathlib import Path

import pytest
import yaml

from search.experiment import ExperimentError, load_experiment, load_experiment_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO_ROOT / "experiments"
DEFAULT_YAML = EXPERIMENTS / "default.yaml"


def minimal_experiment(**changes):
    """A valid experiment mapping; `changes` replace top-level keys (None removes one)."""
    values = {
        "name": "tiny",
        "base": str(DEFAULT_YAML),
        "storage_path": "runs/search",
        "train": {"eval_freq": 1},
        "search": {"algorithm": "grid", "axes": {"aggregator": {"grid": ["maxpool", "meanpool"]}}},
        "scheduler": {"grace_period": 1, "reduction_factor": 2, "max_epochs": 4},
    }
    for key, value in changes.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    return values


def write_yaml(folder: Path, values) -> Path:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_weeplaces_grid_is_published_space():
    experiment = load_experiment(EXPERIMENTS / "weeplaces.yaml")

    axes = {axis.name: axis for axis in experiment.axes}
    assert experiment.algorithm == "grid"
    assert axes["embedding_size"].values == (32, 64, 128)
    assert axes["lambda_mi"].values == tuple(2.0**k for k in range(-4, 7))
    assert axes["aggregator"].values == ("maxpool", "meanpool", "attention")
    assert experiment.num_trials == 99
    assert experiment.scheduler.rungs() == [5, 15, 45]
    assert experiment.train.epochs == 45


def test_weeplaces_takes_other_settings_from_default_yaml():
    experiment = load_experiment(EXPERIMENTS / "weeplaces.yaml")
    defaults = yaml.safe_load(DEFAULT_YAML.read_text())

    for name, value in defaults.items():
        if name not in ("epochs", "num_threads", "loss_precision"):
            assert getattr(experiment.train, name) == value, name
    assert experiment.train.num_threads == experiment.resources.torch_threads
    assert experiment.train.loss_precision == "bf16"


def test_tpe_file_samples_lr_and_dropout():
    experiment = load_experiment(EXPERIMENTS / "weeplaces-tpe.yaml")

    kinds = {axis.name: axis.kind for axis in experiment.axes}
    assert experiment.algorithm == "tpe"
    assert set(kinds) == {"embedding_size", "lambda_mi", "aggregator", "lr", "dropout"}
    assert "grid" not in kinds.values()
    assert experiment.num_trials == experiment.num_samples > 1


def test_smoke_file_is_small():
    experiment = load_experiment(EXPERIMENTS / "smoke.yaml")

    assert 2 <= experiment.num_trials <= 8
    assert experiment.scheduler.max_epochs <= 5
    assert experiment.scheduler.grace_period < experiment.scheduler.max_epochs


def test_command_line_overrides(tmp_path):
    experiment = load_experiment(
        EXPERIMENTS / "weeplaces.yaml", data=tmp_path / "data", storage_path=tmp_path / "runs", num_samples=2
    )

    assert experiment.data == tmp_path / "data"
    assert experiment.path == tmp_path / "runs" / "weeplaces"
    assert experiment.num_trials == 198


def test_name_defaults_to_file_stem(tmp_path):
    path = write_yaml(tmp_path, minimal_experiment(name=None))

    assert load_experiment(path).name == "experiment"


def test_to_dict_round_trip(tmp_path):
    experiment = load_experiment(EXPERIMENTS / "weeplaces-tpe.yaml", storage_path=tmp_path)

    again = load_experiment_dict(experiment.to_dict())

    assert again.to_dict() == experiment.to_dict()
    assert again.train == experiment.train
    assert again.axes == experiment.axes


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"schedular": {}}, "schedular"),
        ({"train": {"eval_freq": 1, "lamda_mi": 2.0}}, "lamda_mi"),
        ({"train": {"eval_freq": 1, "aggregator": "sumpool"}}, "aggregator"),
        ({"train": {"eval_freq": 1, "epochs": 10}}, "train.epochs"),
        ({"train": {"eval_freq": 1, "num_threads": 4}}, "train.num_threads"),
        ({"scheduler": {"grace_period": 1, "max_epochs": 4}}, "scheduler.reduction_factor"),
        ({"scheduler": {"grace_period": 5, "reduction_factor": 2, "max_epochs": 4}}, "scheduler.grace_period"),
        ({"scheduler": {"grace_period": 1, "reduction_factor": 1, "max_epochs": 4}}, "scheduler.reduction_factor"),
        ({"resources": {"cpus_per_trial": 0}}, "resources.cpus_per_trial"),
        ({"resources": {"gpus_per_trial": 1.5}}, "resources.gpus_per_trial"),
        ({"resources": {"cpu": 1}}, "resources.cpu"),
        ({"max_failures": -1}, "max_failures"),
        ({"checkpoints_to_keep": 0}, "checkpoints_to_keep"),
        ({"name": "a/b"}, "name"),
        ({"base": "missing.yaml"}, "missing.yaml"),
    ],
)
def test_invalid_setting_is_named(tmp_path, changes, named):
    path = write_yaml(tmp_path, minimal_experiment(**changes))

    with pytest.raises(ExperimentError, match=named.replace(".", r"\.")):
        load_experiment(path)


@pytest.mark.parametrize(
    ("search", "named"),
    [
        ({"axes": {"aggregator": {"grid": ["maxpool", "sumpool"]}}}, "sumpool"),
        ({"axes": {"embedding": {"grid": [16]}}}, "search.axes.embedding"),
        ({"axes": {"epochs": {"grid": [2, 4]}}}, "search.axes.epochs"),
        ({"axes": {"dropout": {"grid": [0.1, 1.5]}}}, "dropout"),
        ({"axes": {"dropout": {"grid": [0.1, 0.1]}}}, "repeats"),
        ({"axes": {"dropout": {"grid": []}}}, "search.axes.dropout.grid"),
        ({"axes": {"dropout": [0.1, 0.2]}}, "search.axes.dropout"),
        ({"axes": {"lr": {"uniform": [0.001, 0.01]}}}, "search.axes.lr"),
        ({"algorithm": "tpe", "axes": {"lr": {"grid": [0.001, 0.01]}}}, "search.axes.lr"),
        ({"algorithm": "tpe", "axes": {"lr": {"loguniform": ["1e-4", 0.01]}}}, "1.0e-4"),
        ({"algorithm": "tpe", "axes": {"lr": {"loguniform": [0.0, 0.01]}}}, "log scale"),
        ({"algorithm": "tpe", "axes": {"lr": {"uniform": [0.01, 0.001]}}}, "not below"),
        ({"algorithm": "tpe", "axes": {"dropout": {"quniform": [0.0, 0.5]}}}, "3 numbers"),
        ({"algorithm": "tpe", "axes": {"batch_size": {"randint": [0, 256]}}}, "batch_size"),
        ({"algorithm": "random", "axes": {"lr": {"grid": [0.01]}}}, "search.algorithm"),
        ({"axes": {}}, "search.axes"),
        ({"axes": {"lr": {"grid": [0.01]}}, "num_samples": 0}, "search.num_samples"),
        ({"axes": {"lr": {"grid": [0.01]}}, "samples": 2}, "search.samples"),
        ({"axes": {"lr": {"grid": [0.01]}}, "largest_first": ["dropout"]}, "'dropout' is not an axis"),
        ({"axes": {"aggregator": {"grid": ["maxpool"]}}, "largest_first": ["aggregator"]}, "not numbers"),
        ({"axes": {"lr": {"grid": [0.01]}}, "largest_first": [1]}, "search.largest_first"),
        ({"axes": {"lr": {"grid": [0.01]}}, "largest_first": ["lr", "lr"]}, "twice"),
        ({"algorithm": "tpe", "axes": {"lr": {"uniform": [0.001, 0.01]}}, "largest_first": ["lr"]}, "orders a grid"),
    ],
)
def test_invalid_axis_is_named(tmp_path, search, named):
    path = write_yaml(tmp_path, minimal_experiment(search=search))

    with pytest.raises(ExperimentError, match=named.replace(".", r"\.")):
        load_experiment(path)


def test_word_number_has_no_exponent_hint(tmp_path):
    path = write_yaml(tmp_path, minimal_experiment(resources={"cpus_per_trial": "two"}))

    with pytest.raises(ExperimentError, match=r"resources\.cpus_per_trial .*'two'; expected a number$"):
        load_experiment(path)


def test_rung_without_evaluation_is_rejected(tmp_path):
    values = minimal_experiment(
        train={"eval_freq": 5},
        scheduler={"grace_period": 3, "reduction_factor": 3, "max_epochs": 27},
    )

    with pytest.raises(ExperimentError, match=r"rungs \[3, 9\]"):
        load_experiment(write_yaml(tmp_path, values))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ExperimentError, match="not found"):
        load_experiment(tmp_path / "nothing.yaml")


def test_grid_points_cover_grid_once_in_shuffled_order():
    from search.tuner import grid_points

    experiment = load_experiment(EXPERIMENTS / "weeplaces.yaml")

    points = grid_points(experiment)
    keys = [tuple(point.values()) for point in points]

    assert len(points) == 99
    assert len(set(keys)) == 99
    assert keys != sorted(keys)
    assert grid_points(experiment) == points  # the order depends only on search.seed


def test_grid_points_largest_first():
    from search.tuner import grid_points

    ordered = load_experiment(EXPERIMENTS / "weeplaces.yaml")
    shuffled = load_experiment_dict({**ordered.to_dict(), "search": {**ordered.to_dict()["search"], "largest_first": []}})

    points = grid_points(ordered)
    sizes = [point["embedding_size"] for point in points]

    assert ordered.largest_first == ("embedding_size",)
    assert sizes == [128] * 33 + [64] * 33 + [32] * 11 * 3
    # Within one size the shuffled order stays: the sort is stable.
    for size in (128, 64, 32):
        assert [p for p in points if p["embedding_size"] == size] == [
            p for p in grid_points(shuffled) if p["embedding_size"] == size
        ]
    assert [p["embedding_size"] for p in grid_points(shuffled)] != sizes


def test_grid_points_repeat_grid_per_sample():
    from search.tuner import grid_points

    experiment = load_experiment(EXPERIMENTS / "smoke.yaml", num_samples=2)

    keys = [tuple(point.values()) for point in grid_points(experiment)]

    assert len(keys) == 12
    assert all(keys.count(key) == 2 for key in keys)
