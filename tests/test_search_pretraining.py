"""The shared pre-training store: keys, exactly one computation under concurrency, exact reuse."""

import itertools
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from groupim.config import TrainConfig
from groupim.data import load_dataset, write_slice
from search.experiment import load_experiment
from search.pretraining import MI_PHASE, USER_PHASE, PretrainingStore, phase_key
from search.trainable import pretrained_model

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKSUM = "0" * 64
COMPUTE_SECONDS = 1.0


def test_weeplaces_grid_needs_three_user_and_nine_mi_states():
    experiment = load_experiment(REPO_ROOT / "experiments" / "weeplaces.yaml")
    grid = itertools.product(*(axis.values for axis in experiment.axes))
    names = [axis.name for axis in experiment.axes]
    configs = [experiment.trial_config(dict(zip(names, values))) for values in grid]

    user_keys = {phase_key(USER_PHASE, config, CHECKSUM).name for config in configs}
    mi_keys = {phase_key(MI_PHASE, config, CHECKSUM).name for config in configs}

    assert len(configs) == 99
    assert len(user_keys) == 3
    assert len(mi_keys) == 9


@pytest.mark.parametrize(
    ("change", "user_changes", "mi_changes"),
    [
        ({"lambda_mi": 8.0}, False, False),
        ({"epochs": 99}, False, False),
        ({"aggregator": "maxpool"}, False, True),
        ({"lr": 0.05}, False, True),
        ({"negatives_per_group": 3}, False, True),
        ({"dropout": 0.1}, True, True),
        ({"pretrain_user_epochs": 3}, True, True),
        ({"seed": 7}, True, True),
    ],
)
def test_key_follows_settings_the_phase_reads(change, user_changes, mi_changes):
    config = TrainConfig()
    changed = config.replace(**change)

    for phase, expected in ((USER_PHASE, user_changes), (MI_PHASE, mi_changes)):
        differs = phase_key(phase, config, CHECKSUM).name != phase_key(phase, changed, CHECKSUM).name
        assert differs == expected, phase


def test_key_includes_data_checksum():
    config = TrainConfig()

    assert phase_key(USER_PHASE, config, "a" * 64).name != phase_key(USER_PHASE, config, "b" * 64).name


def _compute_or_load(folder, count_file, start, results, crash):
    """Child process: wait for `start`, then get the state, counting each computation."""
    key = phase_key(USER_PHASE, TrainConfig(), CHECKSUM)

    def compute():
        with open(count_file, "a") as count:
            count.write(f"{os.getpid()}\n")
        if crash:
            os._exit(3)  # dies holding the lock
        time.sleep(COMPUTE_SECONDS)
        return {"weight": torch.full((3,), 7.0)}, {"computed_by": os.getpid()}

    start.wait()
    stored = PretrainingStore(folder).get_or_compute(key, compute)
    results.put((stored.reused, stored.state["weight"].tolist(), stored.info["computed_by"]))


def test_concurrent_trials_compute_once(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    count_file = tmp_path / "computations.txt"
    workers = [
        context.Process(target=_compute_or_load, args=(tmp_path / "store", count_file, start, results, False))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)

    assert len(count_file.read_text().splitlines()) == 1
    assert sorted(reused for reused, _, _ in outcomes) == [False, True, True, True]
    assert all(weight == [7.0, 7.0, 7.0] for _, weight, _ in outcomes)
    assert len({computed_by for _, _, computed_by in outcomes}) == 1


def test_crashed_computation_releases_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    count_file = tmp_path / "computations.txt"
    crashing = context.Process(target=_compute_or_load, args=(tmp_path / "store", count_file, start, results, True))
    start.set()
    crashing.start()
    crashing.join(timeout=60)

    _compute_or_load(tmp_path / "store", count_file, start, results, crash=False)
    reused, weight, _ = results.get(timeout=5)

    assert crashing.exitcode == 3
    assert len(count_file.read_text().splitlines()) == 2
    assert reused is False
    assert weight == [7.0, 7.0, 7.0]


def test_store_rejects_file_of_other_settings(tmp_path):
    store = PretrainingStore(tmp_path)
    key = phase_key(USER_PHASE, TrainConfig(), CHECKSUM)
    store.get_or_compute(key, lambda: ({"weight": torch.zeros(2)}, {}))
    other = phase_key(USER_PHASE, TrainConfig(seed=5), CHECKSUM)
    store.state_path(key).rename(store.state_path(other))

    with pytest.raises(RuntimeError, match="delete the file"):
        store.get_or_compute(other, lambda: ({"weight": torch.ones(2)}, {}))


@pytest.fixture(scope="module")
def tiny_data(weeplaces_dir, tmp_path_factory):
    folder = write_slice(weeplaces_dir, tmp_path_factory.mktemp("slice") / "weeplaces", (60, 20, 20))
    return load_dataset(folder)


def test_reused_user_state_equals_own_pretraining(tiny_data, tmp_path):
    torch.set_num_threads(1)
    config = TrainConfig(
        embedding_size=8, pretrain_user_epochs=2, pretrain_mi_epochs=1, eval_freq=1, epochs=1, num_threads=1
    )
    shared = PretrainingStore(tmp_path / "shared")
    pretrained_model(config.replace(aggregator="maxpool"), tiny_data, shared)

    reusing, summary = pretrained_model(config.replace(aggregator="attention"), tiny_data, shared)
    alone, alone_summary = pretrained_model(
        config.replace(aggregator="attention"), tiny_data, PretrainingStore(tmp_path / "alone")
    )

    assert summary["pretrain_user_reused"] is True
    assert summary["pretrain_mi_reused"] is False
    assert alone_summary["pretrain_user_reused"] is False
    expected = alone.state_dict()
    for name, tensor in reusing.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_reused_mi_state_equals_own_pretraining(tiny_data, tmp_path):
    torch.set_num_threads(1)
    config = TrainConfig(embedding_size=8, pretrain_user_epochs=1, pretrain_mi_epochs=2, eval_freq=1, num_threads=1)
    shared = PretrainingStore(tmp_path / "shared")
    pretrained_model(config.replace(lambda_mi=0.5), tiny_data, shared)

    reusing, summary = pretrained_model(config.replace(lambda_mi=4.0), tiny_data, shared)
    alone, _ = pretrained_model(config.replace(lambda_mi=4.0), tiny_data, PretrainingStore(tmp_path / "alone"))

    assert summary["pretrain_mi_reused"] is True
    expected = alone.state_dict()
    for name, tensor in reusing.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
