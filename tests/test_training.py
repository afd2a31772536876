"""Three-phase training on a slice of Weeplaces: schedule, callback, determinism, resume, CLI."""

import json
import platform

import pytest
import torch

from groupim.checkpoint import load_checkpoint
from groupim.cli import main
from groupim.config import TrainConfig
from groupim.data import load_dataset
from groupim.metrics import METRICS
from groupim.train import (
    build_model,
    fit,
    is_eval_epoch,
    pretrain_mi,
    pretrain_user,
    reuse_freed_memory,
    train_group,
    validation_group_metrics,
)

SMALL = dict(
    embedding_size=16,
    batch_size=64,
    pretrain_user_epochs=2,
    pretrain_mi_epochs=1,
    epochs=4,
    eval_freq=2,
    num_threads=1,
)


@pytest.fixture(scope="module")
def data(weeplaces_slice):
    return load_dataset(weeplaces_slice)


def small_config(**changes) -> TrainConfig:
    return TrainConfig(**{**SMALL, **changes})


def test_eval_schedule_default_includes_final_epoch():
    config = TrainConfig(eval_freq=5)
    assert [e + 1 for e in range(12) if is_eval_epoch(e, 12, config)] == [5, 10, 12]


def test_eval_schedule_notebook_skips_final_epochs():
    config = TrainConfig(eval_freq=5, eval_final_epoch=False)
    assert [e + 1 for e in range(12) if is_eval_epoch(e, 12, config)] == [1, 6, 11]


@pytest.mark.parametrize("loss_precision", ["fp32", "bf16"])
def test_training_beats_untrained_model(data, loss_precision):
    config = small_config(loss_precision=loss_precision)
    untrained = validation_group_metrics(build_model(config, data.n_items), data, config)
    result = fit(config, data, progress=False)
    trained = result.group.best_metrics
    assert set(METRICS) <= set(trained)
    assert trained["ndcg@100"] > untrained["ndcg@100"] + 0.05
    assert 0.0 <= trained["recall@20"] <= trained["recall@50"] <= 1.0


def test_callback_sees_each_evaluation_and_can_stop(data):
    seen = []

    def stop_after_first(evaluation):
        seen.append((evaluation.epoch, evaluation.metrics["ndcg@100"]))
        return True

    state = fit(small_config(pretrain_user=False, pretrain_mi=False), data, stop_after_first, progress=False).group
    assert [epoch for epoch, _ in seen] == [2]
    assert state.stopped_early
    assert state.best_epoch == 2

    seen.clear()
    fit(small_config(pretrain_user=False, pretrain_mi=False, epochs=5), data, lambda e: seen.append(e.epoch), progress=False)
    assert seen == [2, 4, 5]


def test_same_seed_repeats_cpu_run(data):
    config = small_config(epochs=2)
    first = fit(config, data, progress=False)
    second = fit(config, data, progress=False)
    assert first.group.best_metrics == second.group.best_metrics
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key


def test_resumed_group_training_matches_uninterrupted(data):
    config = small_config(pretrain_user=False, pretrain_mi=False, epochs=4, eval_freq=2)
    uninterrupted = train_group(build_model(config, data.n_items), data, config, progress=False)

    saved = {}

    def interrupt(evaluation):
        saved.update(evaluation.checkpoint())
        return True

    train_group(build_model(config, data.n_items), data, config, interrupt, progress=False)
    assert saved["epoch"] == 2
    resumed = train_group(build_model(config, data.n_items), data, config, resume=saved, progress=False)
    assert [h["ndcg@100"] for h in resumed.history] == [h["ndcg@100"] for h in uninterrupted.history]
    assert resumed.best_metrics == uninterrupted.best_metrics


def test_user_pretraining_keeps_best_epoch(data):
    config = small_config(pretrain_user_epochs=3, eval_freq=1)
    model = build_model(config, data.n_items)
    result = pretrain_user(model, data, config, progress=False)
    scores = [r["val_user_ndcg@100"] for r in result["history"]]
    assert result["val_user_ndcg@100"] == max(scores)
    assert result["best_epoch"] == scores.index(max(scores)) + 1
    assert torch.equal(model.group_predictor, model.encoder.user_predictor)


def test_mi_pretraining_lowers_discriminator_loss(data):
    config = small_config(pretrain_mi_epochs=3)
    model = build_model(config, data.n_items)
    history = pretrain_mi(model, data, config, progress=False)["history"]
    assert history[-1]["loss_mi"] < history[0]["loss_mi"]


@pytest.mark.parametrize("aggregator", ["maxpool", "meanpool"])
def test_notebook_switches_train(data, aggregator):
    config = small_config(
        aggregator=aggregator,
        member_norm="group",
        negatives_exclude_members=False,
        eval_final_epoch=False,
        shuffle=False,
        epochs=2,
    )
    result = fit(config, data, progress=False)
    assert result.group.best_epoch == 1
    assert result.group.best_metrics["ndcg@100"] > 0


def test_cli_train_then_evaluate_reproduces_metrics(weeplaces_slice, tmp_path, capsys):
    output = tmp_path / "run"
    sets = [f"{key}={value}" for key, value in SMALL.items()]
    code = main(["train", "--data", str(weeplaces_slice), "--output", str(output), "--no-progress", "--set", *sets])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    for split in ("val", "test"):
        assert set(metrics[split]) == {"ndcg@20", "ndcg@50", "ndcg@100", "recall@20", "recall@50"}

    payload = torch.load(output / "model.pt", weights_only=True)
    assert payload["config"]["embedding_size"] == 16
    model, config, _ = load_checkpoint(output / "model.pt")
    assert config.embedding_size == 16

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(output / "model.pt"), "--data", str(weeplaces_slice), "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx(metrics["test"])

    # A second run into the same folder stops before training and leaves the first run's files.
    before = {name: (output / name).read_bytes() for name in ("model.pt", "metrics.json", "history.json")}
    argv = ["train", "--data", str(weeplaces_slice), "--output", str(output), "--no-progress", "--set", *sets]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.pt, metrics.json, history.json of an earlier run" in err
    assert "--overwrite" in err
    assert {name: (output / name).read_bytes() for name in before} == before


def test_cli_reports_bad_override(weeplaces_slice, tmp_path, capsys):
    code = main(["train", "--data", str(weeplaces_slice), "--output", str(tmp_path), "--set", "aggregator=sum"])
    assert code == 2
    assert "aggregator" in capsys.readouterr().err


def test_recommend_returns_k_distinct_items(data):
    from groupim.recommend import recommend

    config = small_config(pretrain_user=False, pretrain_mi=False, epochs=1)
    model = fit(config, data, progress=False).model
    result = recommend(model, data.member_items, [[0, 1, 2], [5]], k=10)
    assert len(result) == 2
    assert len(set(result[0].items)) == 10
    assert result[0].scores == sorted(result[0].scores, reverse=True)


def test_recommend_rejects_unknown_user_and_large_k(data):
    from groupim.recommend import UnknownUserError, recommend

    model = build_model(small_config(), data.n_items)
    with pytest.raises(UnknownUserError, match=str(data.n_users + 5)):
        recommend(model, data.member_items, [[0, data.n_users + 5]], k=5)
    with pytest.raises(ValueError, match="k="):
        recommend(model, data.member_items, [[0]], k=data.n_items + 1)


def test_cli_recommend_json(weeplaces_slice, tmp_path, capsys):
    output = tmp_path / "run"
    sets = [f"{key}={value}" for key, value in {**SMALL, "epochs": 1, "pretrain_user": False}.items()]
    assert main(["train", "--data", str(weeplaces_slice), "--output", str(output), "--no-progress", "--set", *sets]) == 0
    capsys.readouterr()
    argv = ["recommend", "--checkpoint", str(output / "model.pt"), "--data", str(weeplaces_slice)]
    assert main([*argv, "--users", "1,2,3", "--k", "7", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["users"] == [1, 2, 3]
    assert len(set(printed["items"])) == 7

    assert main([*argv, "--users", "1,x", "--k", "7"]) == 2
    assert "--users" in capsys.readouterr().err


def test_core_package_imports_neither_ray_nor_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, groupim.cli, groupim.train, groupim.data, groupim.recommend, groupim.dense;"
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_rejects_bad_files_cleanly(weeplaces_slice, tmp_path, capsys):
    text_file = tmp_path / "notes.pt"
    text_file.write_text("hello")
    assert main(["evaluate", "--checkpoint", str(text_file), "--data", str(weeplaces_slice)]) == 2
    error = capsys.readouterr().err
    assert "not a readable GroupIM checkpoint" in error
    assert "weights_only" not in error

    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(weeplaces_slice)]) == 2
    assert "search/report.py" in capsys.readouterr().err

    assert main(["train", "--data", str(weeplaces_slice), "--output", str(text_file)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_repeated_set_adds_up(weeplaces_slice, tmp_path):
    output = tmp_path / "run"
    sets = [f"{key}={value}" for key, value in {**SMALL, "epochs": 1, "pretrain_user": False}.items()]
    argv = ["train", "--data", str(weeplaces_slice), "--output", str(output), "--no-progress"]
    assert main([*argv, "--set", *sets[:3], "--set", *sets[3:]]) == 0
    payload = torch.load(output / "model.pt", weights_only=True)
    assert payload["config"]["embedding_size"] == 16
    assert payload["config"]["epochs"] == 1


def test_diverged_loss_raises():
    from groupim.train import TrainingDiverged, check_loss

    assert check_loss(1.5, "group training", 0) == 1.5
    with pytest.raises(TrainingDiverged, match="epoch 3"):
        check_loss(float("nan"), "group training", 2)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is a glibc function")
def test_reuse_freed_memory_on_glibc():
    # mallopt returns 1 for each setting glibc accepts; a second call is harmless.
    assert reuse_freed_memory() is True
    assert reuse_freed_memory() is True


def test_cli_train_interrupted(weeplaces_slice, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("groupim.cli.fit", interrupted)
    output = tmp_path / "run"

    assert main(["train", "--data", str(weeplaces_slice), "--output", str(output), "--no-progress"]) == 130
    assert "interrupted: groupim train stopped before it finished" in capsys.readouterr().err
    assert not any(output.iterdir())
