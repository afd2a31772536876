"""ResumableASHA: rungs rebuilt from the trials' result.json files on resume."""

import json
from pathlib import Path

from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from search.asha import ResumableASHA

METRIC = "val/ndcg@100"


def make_scheduler(kind=ResumableASHA):
    scheduler = kind(time_attr="epoch", max_t=45, grace_period=5, reduction_factor=3)
    scheduler.set_search_properties(metric=METRIC, mode="max")
    return scheduler


def make_trial(storage: Path, trial_id: str, lines: list[str] | None = None, named: bool = True) -> Trial:
    """A real Tune trial whose folder contains result.json with `lines`, if given.

    A trial that has never started (named=False) has no folder name yet.
    """
    folder_name = trial_id if named else None
    context = StorageContext(storage_path=str(storage), experiment_dir_name="exp", trial_dir_name=folder_name)
    trial = Trial("__fake", config={}, trial_id=trial_id, storage=context, stub=True)
    if lines is not None:
        folder = Path(trial.path)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("".join(line + "\n" for line in lines))
    return trial


def result(epoch: int, value: float) -> str:
    return json.dumps({"epoch": epoch, METRIC: value})


def add_restored(scheduler, tmp_path):
    """Add three trials that reported 0.3, 0.4 and 0.5 at epoch 5 before the interruption."""
    for trial_id, value in [("a", 0.3), ("b", 0.4), ("c", 0.5)]:
        scheduler.on_trial_add(None, make_trial(tmp_path, trial_id, [result(1, 0.1), result(5, value)]))


def test_restored_results_set_the_cutoff(tmp_path):
    scheduler = make_scheduler()
    add_restored(scheduler, tmp_path)
    weak, strong = make_trial(tmp_path, "weak"), make_trial(tmp_path, "strong")
    scheduler.on_trial_add(None, weak)
    scheduler.on_trial_add(None, strong)

    # The cutoff is the 2/3 quantile of 0.3, 0.4 and 0.5, about 0.433.
    assert scheduler.on_trial_result(None, weak, {"epoch": 5, METRIC: 0.42}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, strong, {"epoch": 5, METRIC: 0.45}) == TrialScheduler.CONTINUE


def test_plain_asha_forgets_restored_results(tmp_path):
    scheduler = make_scheduler(ASHAScheduler)
    add_restored(scheduler, tmp_path)
    weak = make_trial(tmp_path, "weak")
    scheduler.on_trial_add(None, weak)

    assert scheduler.on_trial_result(None, weak, {"epoch": 5, METRIC: 0.42}) == TrialScheduler.CONTINUE


def test_restarted_trial_passes_its_recorded_rung(tmp_path):
    scheduler = make_scheduler()
    add_restored(scheduler, tmp_path)
    lowest = make_trial(tmp_path, "a")

    # Trial a continues from its checkpoint and reports epoch 5 again, so ASHA keeps its earlier decision.
    assert scheduler.on_trial_result(None, lowest, {"epoch": 5, METRIC: 0.3}) == TrialScheduler.CONTINUE


def test_replay_skips_cut_last_line(tmp_path, caplog):
    scheduler = make_scheduler()
    lines = [result(5, 0.9), result(15, 0.9), result(45, 0.9), '{"epoch": 50, "val/nd']
    scheduler.on_trial_add(None, make_trial(tmp_path, "done", lines))
    late = make_trial(tmp_path, "late")
    scheduler.on_trial_add(None, late)

    assert "line 4: invalid JSON" in caplog.text
    assert scheduler.on_trial_result(None, late, {"epoch": 15, METRIC: 0.5}) == TrialScheduler.STOP


def test_new_trial_has_nothing_to_replay(tmp_path):
    scheduler = make_scheduler()
    unnamed, without_results = make_trial(tmp_path, "new", named=False), make_trial(tmp_path, "empty")
    scheduler.on_trial_add(None, unnamed)
    scheduler.on_trial_add(None, without_results)

    assert scheduler.on_trial_result(None, unnamed, {"epoch": 5, METRIC: 0.01}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, without_results, {"epoch": 5, METRIC: 0.001}) == TrialScheduler.STOP
