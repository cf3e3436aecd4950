"""make search: the ask-and-tell loop on scripted experiments (tests/search_fakes.py) with real
Optuna studies (pruning on hand-made curves, the shared budget, a search killed and continued,
two processes on one journal file, a failed and a refused trial, Ctrl-C, confirmations), the
numbers of the report against independent computations. The search end to end through DVC and
MLflow, two machines on PostgreSQL, is tests/test_shared_search.py."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from tests import test_compare
from tests.conftest import PROJECT
from tests.search_fakes import FakeRunner, load_search, value_of
from tests.test_replicates import FOUR, welch_by_hand
from vaelab import search, search_report, search_study
from vaelab.search_report import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL = """
params:
  train.lr: {low: 0.0001, high: 0.1, log: true}
  model.latent_dims: {low: 2, high: 10, int: true}
trials: %(trials)d
jobs: %(jobs)d
pruner: none
confirm: %(confirm)s
train.epochs: 4
"""


def small(trials: int = 6, jobs: int = 2, confirm: str = "{top: 0}", name: str = "fake"):
    return load_search(SMALL % {"trials": trials, "jobs": jobs, "confirm": confirm}, name)


def memory_study(spec):
    return search_study.open_study(spec, optuna.storages.InMemoryStorage())


def run_searcher(spec, study, runner, jobs=None, seconds=60.0, **kwargs) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds

    def too_long() -> bool:  # a loop that never ends fails the test instead of hanging it
        if time.monotonic() > deadline:
            raise AssertionError(f"the search has not ended after {seconds} s:\n{lines[-5:]}")
        return False

    searcher = search.Searcher(
        spec, study, runner, jobs or spec.jobs, out=lines.append, poll=0.0,
        stop_requested=too_long, **kwargs,
    )  # fmt: skip
    searcher.run()
    return lines


def by_state(study, kind: str = "trial") -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for t in study.trials:
        if search_study.is_confirmation(t) == (kind == "confirm"):
            label = t.state.name + ("*" if search_study.NOT_COUNTED_ATTR in t.user_attrs else "")
            found.setdefault(label, []).append(t.number)
    return found


# --- pruning -----------------------------------------------------------------------------------

# Hand-made curves (validation -ELBO per epoch) of five trials, run one at a time; the median
# pruner starts after 3 finished trials.
CURVES = {
    "0.001": [10.0, 8.0, 6.0, 5.0],
    "0.002": [12.0, 9.0, 7.0, 6.0],
    "0.003": [11.0, 10.0, 9.0, 8.0],
    "0.004": [10.5, 9.5, 9.0, 8.5],  # above the median from epoch 2
    "0.005": [9.0, 7.0, 5.0, 4.0],  # below it throughout
}
PRUNING = """
params:
  train.lr: {choices: [0.001, 0.002, 0.003, 0.004, 0.005]}
trials: 5
pruner: {name: median, startup_trials: 3}
train.epochs: 4
"""


def median_rule(curve: list[float], finished: list[list[float]]) -> int | None:
    """The median pruner by hand: the first epoch at which the trial's best value so far is
    above the median of the finished trials' values at that epoch."""
    for epoch in range(1, len(curve) + 1):
        median = statistics.median(c[epoch - 1] for c in finished)
        if min(curve[:epoch]) > median:
            return epoch
    return None


def test_a_trial_is_pruned_at_the_epoch_its_curve_crosses_the_median(tmp_path):
    spec = load_search(PRUNING)
    study = memory_study(spec)
    for lr in CURVES:  # in this order
        study.enqueue_trial({"train.lr": float(lr)})

    def outcome(overrides):
        curve = CURVES[overrides["train.lr"]]
        return curve, curve[-1]

    runner = FakeRunner(tmp_path, outcome)
    lines = run_searcher(spec, study, runner)
    finished = [CURVES[lr] for lr in ("0.001", "0.002", "0.003")]
    expected = {lr: median_rule(CURVES[lr], finished) for lr in ("0.004", "0.005")}
    assert expected == {"0.004": 2, "0.005": None}  # the hand-made curves say so
    pruned, kept = study.trials[3], study.trials[4]
    assert pruned.state == TrialState.PRUNED
    assert pruned.user_attrs[search_study.PRUNED_ATTR] == 2
    assert dict(pruned.intermediate_values) == {1: 10.5, 2: 9.5}
    # Seen epoch by epoch, it was stopped in the epoch of the decision, not later.
    assert runner.stopped == {"fake-3": 2}
    assert runner.get("fake-3")["tags"]["vaelab.pruned"] == "2"
    assert kept.state == TrialState.COMPLETE and kept.value == CURVES["0.005"][-1]
    assert dict(kept.intermediate_values) == dict(enumerate(CURVES["0.005"], start=1))
    assert [t.state for t in study.trials[:3]] == [TrialState.COMPLETE] * 3
    assert any(line.startswith("search: trial 3 pruned at epoch 2 (") for line in lines), lines


def test_no_pruner_lets_every_trial_finish(tmp_path):
    spec = load_search(PRUNING.replace("{name: median, startup_trials: 3}", "none"))
    study = memory_study(spec)
    for lr in CURVES:
        study.enqueue_trial({"train.lr": float(lr)})
    runner = FakeRunner(tmp_path, lambda o: (CURVES[o["train.lr"]], CURVES[o["train.lr"]][-1]))
    run_searcher(spec, study, runner)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert runner.stopped == {}


# --- the budget --------------------------------------------------------------------------------


def test_every_trial_counts_once_and_the_search_stops_at_its_budget(tmp_path):
    spec = small(trials=6, jobs=2)
    study = memory_study(spec)
    runner = FakeRunner(tmp_path)
    lines = run_searcher(spec, study, runner)
    assert by_state(study) == {"COMPLETE": [0, 1, 2, 3, 4, 5]}
    assert runner.launched == [f"fake-{n}" for n in range(6)]
    for t in study.trials:  # each value is its experiment's, told once
        _, final = value_of(search.Searcher(spec, study, runner, 1).overrides(
            search.Job(t, "", search_study.decode(t.params, spec.space), 0, 0)))  # fmt: skip
        assert t.value == pytest.approx(final)
    best = min(study.trials, key=lambda t: t.value)
    assert f"best {best.value:.4f} (trial {best.number})" in lines[-1]
    # Running it again changes nothing: the study has its trials.
    again = FakeRunner(tmp_path / "again")
    run_searcher(spec, study, again)
    assert again.launched == [] and len(study.trials) == 6


def test_a_trial_asked_after_the_last_place_was_taken_is_withdrawn(tmp_path):
    """Two processes that both saw one place left: the one whose trial comes second withdraws
    it (FAIL, not counted), and never launches it."""
    spec = small(trials=3)
    storage = optuna.storages.InMemoryStorage()
    first, second = (search_study.open_study(spec, storage) for _ in range(2))
    runner = FakeRunner(tmp_path)
    a = search.Searcher(spec, first, runner, 1, out=lambda line: None)
    for _ in range(2):
        trial = first.ask()
        first.tell(trial, 1.0)
    taken = first.ask()  # the last place: process A asked first
    late = second.ask()  # process B asked too, before it could see A's trial
    assert a.search_job(taken) is not None
    b = search.Searcher(spec, second, runner, 1, out=lambda line: None)
    assert b.search_job(late) is None
    assert late.number == 3 and study_trial(second, 3).user_attrs[
        search_study.NOT_COUNTED_ATTR
    ] == ("withdrawn")
    assert [t.number for t in search_study.counted(second.trials)] == [0, 1, 2]


def test_a_trial_two_processes_were_both_given_is_run_by_one(tmp_path):
    """An RDB without row locks (SQLite) can hand one queued trial to two processes. The one
    that finds it already ended by the other skips it and asks again; one that learns so while
    running it stops its experiment and goes on."""
    spec = small(trials=3, jobs=1)
    storage = optuna.storages.InMemoryStorage()
    mine, theirs = search_study.open_study(spec, storage), search_study.open_study(spec, storage)
    taken = theirs.ask()
    theirs.tell(taken, 1.0)  # the other process ran it to its end
    given = iter([optuna.Trial(mine, taken._trial_id)])
    ask = mine.ask
    mine.ask = lambda: next(given, None) or ask()  # the double pop, then Optuna's own
    runner, lines = FakeRunner(tmp_path), []
    searcher = search.Searcher(spec, mine, runner, 1, out=lines.append, poll=0.0)
    job = searcher.next_job()
    assert job.number == 1 and study_trial(mine, 0).value == 1.0
    searcher.launch(job)
    theirs.tell(job.number, state=TrialState.FAIL)  # the other process ended this one too
    searcher.run()
    assert "search: trial 1 was ended by another process; its experiment here is stopped" in lines
    assert runner.stopped == {"fake-1": 1}
    assert len(search_study.counted(mine.trials)) == 3


def study_trial(study, number: int):
    return next(t for t in study.get_trials() if t.number == number)


def test_a_failed_trial_is_recorded_and_the_search_goes_on(tmp_path):
    spec = small(trials=4, jobs=1)
    study = memory_study(spec)
    runner = FakeRunner(tmp_path, fail=("fake-1",))
    lines = run_searcher(spec, study, runner)
    assert by_state(study) == {"COMPLETE": [0, 2, 3], "FAIL": [1]}
    assert "fake failure of fake-1" in study.trials[1].user_attrs[search_study.FAILED_ATTR]
    assert any(line.startswith("search: trial 1 FAILED after ") for line in lines)


def test_a_combination_params_refuses_fails_without_running(tmp_path):
    """conv and three hidden layers each pass the file's checks (with the other key as
    params.yaml has it) but not together: the trial fails before anything is launched, with the
    schema's message, and counts."""
    spec = load_search(
        "params:\n  model.arch: {choices: [mlp, conv]}\n"
        "  model.hidden: {choices: [[64], [64, 64, 64]]}\ntrials: 2\npruner: none\n"
    )
    study = memory_study(spec)
    study.enqueue_trial({"model.arch": "conv", "model.hidden": "[64, 64, 64]"})
    study.enqueue_trial({"model.arch": "mlp", "model.hidden": "[64]"})
    runner = FakeRunner(tmp_path)
    lines = run_searcher(spec, study, runner)
    assert by_state(study) == {"FAIL": [0], "COMPLETE": [1]}
    assert runner.launched == ["fake-1"]
    assert (
        "the conv net takes 1 or 2 channel counts"
        in study.trials[0].user_attrs[search_study.FAILED_ATTR]
    )
    assert lines[0].startswith(
        "search: trial 0 FAILED (model.arch=conv, model.hidden=[64, 64, 64]): 'model.hidden'"
    )


def test_ctrl_c_stops_the_running_trials_and_a_new_run_completes_the_budget(tmp_path):
    spec = small(trials=5, jobs=2)
    study = memory_study(spec)
    runner = FakeRunner(tmp_path)
    looks = []

    def stop_after_a_while() -> bool:
        looks.append(1)
        return len(looks) > 6  # trials 0 and 1 finish after 4 looks; 2 and 3 are running

    searcher = search.Searcher(spec, study, runner, 2, out=lambda line: None, poll=0.0,
                               stop_requested=stop_after_a_while)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        searcher.run()
    searcher.stop_all("interrupted (Ctrl-C or SIGTERM)")
    assert by_state(study) == {"COMPLETE": [0, 1], "FAIL*": [2, 3]}
    assert set(runner.stopped) == {"fake-2", "fake-3"}
    assert runner.get("fake-2")["tags"]["vaelab.interrupted"].startswith("interrupted")
    run_searcher(spec, study, FakeRunner(tmp_path / "resumed"))
    assert by_state(study) == {"COMPLETE": [0, 1, 4, 5, 6], "FAIL*": [2, 3]}
    assert len(search_study.counted(study.trials)) == 5


# --- a search process killed, another continuing ----------------------------------------------


def fake_search(tmp_path: Path, spec_text: str, storage: Path, folder: Path, jobs: int, *extra):
    path = tmp_path / "fake.yaml"
    path.write_text(spec_text)
    command = [sys.executable, "-m", "tests.search_fakes", str(path), str(storage), str(folder)]
    return subprocess.Popen([*command, str(jobs), *extra], cwd=PROJECT, start_new_session=True)


def journal_study(spec, storage: Path):
    return search_study.open_study(spec, search_study.open_storage(str(storage), Path("unused")))


def test_a_killed_search_loses_no_finished_trial_and_counts_none_twice(tmp_path):
    """A search process is killed (SIGKILL: nothing of it runs after) when trial 2's experiment
    has finished but before the search told Optuna, with trial 3 half-way. Continued: trial 2 is
    kept with its experiment's value (not run again), trial 3 is not counted and a new trial
    takes its place; the study ends with its 6 trials."""
    text = SMALL % {"trials": 6, "jobs": 2, "confirm": "{top: 0}"}
    storage, folder = tmp_path / "study.journal", tmp_path / "runs"
    killed = fake_search(tmp_path, text, storage, folder, 2, "--hang", "fake-2")
    deadline = time.monotonic() + 60
    while not (folder / "hung").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "it never got there"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    spec = small(trials=6)
    study = journal_study(spec, storage)
    assert by_state(study) == {"COMPLETE": [0, 1], "RUNNING": [2, 3]}
    runner = FakeRunner(folder)
    lines = run_searcher(spec, study, runner)
    assert by_state(study) == {"COMPLETE": [0, 1, 2, 4, 5, 6], "FAIL*": [3]}
    finished = json.loads((folder / "fake-2.json").read_text())
    assert study.trials[2].value == value_of(finished["overrides"])[1]
    assert "fake-2" not in runner.launched and "fake-3" not in runner.launched
    assert runner.launched == ["fake-4", "fake-5", "fake-6"]
    assert any("trial 2, left running by" in line and "kept" in line for line in lines)
    assert any("trial 3, left running by" in line and "run anew" in line for line in lines)


def test_two_processes_on_one_study_share_the_budget_and_the_confirmations(tmp_path):
    """Two search processes on one journal file, 2 experiments each: 8 trials in all, then the
    two best confirmed with 2 seeds: each confirmation run once, by one process or the other."""
    text = SMALL % {"trials": 8, "jobs": 2, "confirm": "{top: 2, seeds: [1, 2]}"}
    storage, folder = tmp_path / "study.journal", tmp_path / "runs"
    processes = [
        fake_search(tmp_path, text, storage, folder, 2, "--sleep", "0.05") for _ in range(2)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0
    study = journal_study(small(trials=8, confirm="{top: 2, seeds: [1, 2]}"), storage)
    counted = search_study.counted(study.trials)
    assert len(counted) == 8 and all(t.state == TrialState.COMPLETE for t in counted)
    owners = {t.user_attrs[search_study.OWNER_ATTR] for t in counted}
    assert len(owners) == 2, "one process ran every trial: the test shows nothing"
    # Every launched experiment is a counted trial's or a confirmation's, each once.
    launched = sorted(p.stem for p in folder.glob("*.json"))
    names = [t.user_attrs[search_study.EXPERIMENT_ATTR] for t in study.trials
             if search_study.EXPERIMENT_ATTR in t.user_attrs]  # fmt: skip
    assert sorted(names) == launched and len(set(names)) == len(names)
    top = sorted(counted, key=lambda t: t.value)[:2]
    confirmed = [
        (t.user_attrs[search_study.CONFIRMS_ATTR], t.user_attrs[search_study.SEED_ATTR])
        for t in study.trials
        if search_study.is_confirmation(t) and t.state == TrialState.COMPLETE
    ]
    assert sorted(confirmed) == sorted((t.number, s) for t in top for s in (1, 2))
    # Anything beyond: withdrawn (not counted), never launched.
    for t in study.trials:
        if t.user_attrs.get(search_study.NOT_COUNTED_ATTR) == "withdrawn":
            assert search_study.EXPERIMENT_ATTR not in t.user_attrs


# --- confirmation ------------------------------------------------------------------------------


def test_the_best_configurations_are_confirmed_over_the_seeds(tmp_path):
    spec = small(trials=5, jobs=2, confirm="{top: 2, seeds: [3, 4]}")
    study = memory_study(spec)
    runner = FakeRunner(tmp_path)
    run_searcher(spec, study, runner)
    trials = [t for t in study.trials if not search_study.is_confirmation(t)]
    top = sorted(trials, key=lambda t: t.value)[:2]
    confirms = [t for t in study.trials if search_study.is_confirmation(t)]
    assert len(confirms) == 4 and all(t.state == TrialState.COMPLETE for t in confirms)
    for t in confirms:
        repeated = study.trials[t.user_attrs[search_study.CONFIRMS_ATTR]]
        assert repeated in top and t.params == repeated.params
        seed = t.user_attrs[search_study.SEED_ATTR]
        name = f"fake-{repeated.number}-s{seed}"
        assert runner.get(name)["overrides"]["train.seed"] == str(seed)
        assert t.value == pytest.approx(repeated.value + 0.1 * seed)  # value_of: +0.1 a seed
    assert len(search_study.counted(study.trials)) == 5


def test_confirmations_interrupted_by_ctrl_c_are_run_when_the_search_continues(tmp_path):
    spec = small(trials=3, jobs=2, confirm="{top: 2, seeds: [1, 2]}")
    study = memory_study(spec)
    runner = FakeRunner(tmp_path)
    lines: list[str] = []

    def stop_in_the_confirmations() -> bool:
        return any(" confirmation of trial " in line and "finished" in line for line in lines)

    searcher = search.Searcher(spec, study, runner, 2, out=lines.append, poll=0.0,
                               stop_requested=stop_in_the_confirmations)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        searcher.run()
    searcher.stop_all("interrupted (Ctrl-C or SIGTERM)")
    assert by_state(study, "confirm") == {"COMPLETE": [3, 4], "FAIL*": [5, 6]}
    run_searcher(spec, study, FakeRunner(tmp_path / "resumed"))
    done = sorted(
        (t.user_attrs[search_study.CONFIRMS_ATTR], t.user_attrs[search_study.SEED_ATTR])
        for t in study.trials
        if search_study.is_confirmation(t) and t.state == TrialState.COMPLETE
    )
    top = sorted(search_study.counted(study.trials), key=lambda t: t.value)[:2]
    assert done == sorted((t.number, seed) for t in top for seed in (1, 2))


def test_a_configuration_tried_twice_is_confirmed_once():
    records = [
        TrialRecord(0, "COMPLETE", {"a": 1}, 5.0),
        TrialRecord(1, "COMPLETE", {"a": 2}, 3.0),
        TrialRecord(2, "COMPLETE", {"a": 2}, 4.0),
        TrialRecord(3, "PRUNED", {"a": 3}, None),
        TrialRecord(4, "COMPLETE", {"a": 4}, 4.5),
    ]
    top = search_report.top_configurations(records, "minimize", 3)
    assert [r.number for r in top] == [1, 4, 0]
    # Maximized, a=2 is its better trial there, 2 (4.0), after 0 (5.0) and 4 (4.5).
    assert [r.number for r in search_report.top_configurations(records, "maximize", 3)] == [
        0,
        4,
        2,
    ]


def confirmation(values: dict[str, list[float]], test_offset: float = 100.0) -> pd.DataFrame:
    rows = [
        {
            "config": f"trial {key}",
            "run_id": f"{key}-{i}",
            "seed": str(i),
            "eval/val_iw/nll": v,
            "eval/test_iw/nll": v + test_offset + i,
        }  # fmt: skip
        for key, runs in values.items()
        for i, v in enumerate(runs)
    ]
    return pd.DataFrame(rows)


def test_a_winner_is_named_only_beyond_the_seed_noise_with_its_test_number_once():
    values = {"7": [10.0, 10.2, 10.1], "3": [11.0, 11.3, 11.1], "9": [12.0, 12.4, 12.2]}
    p, _ = welch_by_hand(values["7"], values["3"])
    assert p < 0.05
    table = confirmation(values)
    grouped, verdict = search_report.decide(table, "eval/val_iw/nll", "minimize")
    assert verdict.winner == 7 and verdict.tied == (7,)
    assert f"p = {p:.2g}" in verdict.text and "beats the runner-up trial 3" in verdict.text
    tests = [v + 100.0 + i for i, v in enumerate(values["7"])]
    mean, sd, n, metric = verdict.test
    assert (mean, sd, n, metric) == (
        pytest.approx(statistics.mean(tests)), pytest.approx(statistics.stdev(tests)), 3,
        "eval/test_iw/nll",
    )  # fmt: skip
    sentence = search_report.test_sentence(verdict)
    assert f"{statistics.mean(tests):.4f}" in sentence and "unbiased estimate" in sentence
    assert list(grouped["config"]) == ["trial 7", "trial 3", "trial 9"]


def test_within_the_noise_no_winner_and_the_ties_are_named():
    """test_replicates' four configurations: A is best, B within its noise (p = 0.097), C and
    D beyond it (p = 0.019, 0.0055): no winner; A and B are tied."""
    values = {str(n): FOUR[k] for n, k in zip((1, 2, 3, 4), "ABCD", strict=True)}
    calls = {k: welch_by_hand(FOUR["A"], FOUR[k])[0] for k in "BCD"}
    assert calls["B"] >= 0.05 > calls["C"] and calls["D"] < 0.05
    _, verdict = search_report.decide(confirmation(values), "eval/val_iw/nll", "minimize")
    assert verdict.winner is None and verdict.test is None
    assert verdict.tied == (1, 2)
    assert f"p = {calls['B']:.2g} >= 0.05" in verdict.text
    assert verdict.text.endswith("Within the noise of each other: trial 1, trial 2.")
    assert "No test-set number is reported" in search_report.test_sentence(verdict)


def test_a_maximized_metric_ranks_the_highest_first():
    values = {"1": [0.80, 0.81, 0.79], "2": [0.90, 0.91, 0.92]}
    table = confirmation(values).rename(
        columns={
            "eval/val_iw/nll": "eval/val_latent/probe_accuracy",
            "eval/test_iw/nll": "eval/latent/probe_accuracy",
        }  # fmt: skip
    )
    _, verdict = search_report.decide(table, "eval/val_latent/probe_accuracy", "maximize")
    assert verdict.winner == 2 and verdict.test[3] == "eval/latent/probe_accuracy"


def test_confirmation_runs_become_the_per_run_table():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "tags.vaelab.confirms": ["4", "4"],
            "params.train.seed": ["1", "2"],
            "params.train.lr": ["0.001", "0.001"],
            "metrics.epoch/val/neg_elbo": [20.0, 21.0],
            "metrics.eval/test/neg_elbo": [20.5, 21.5],
        }
    )
    table = search_report.confirmation_table(runs, "epoch/val/neg_elbo", ["train.lr"])
    assert list(table["config"]) == ["trial 4", "trial 4"]
    assert list(table["eval/test/neg_elbo"]) == [20.5, 21.5]  # the per-epoch metric's twin
    assert list(table["train.lr"]) == ["0.001", "0.001"]


# --- what the report and the progress lines say ------------------------------------------------


def test_the_running_best_and_the_best_trial():
    records = [
        TrialRecord(0, "COMPLETE", {}, 5.0),
        TrialRecord(1, "PRUNED", {}, None),
        TrialRecord(2, "COMPLETE", {}, 6.0),
        TrialRecord(3, "COMPLETE", {}, 4.0),
        TrialRecord(4, "FAIL", {}, None),
        TrialRecord(5, "COMPLETE", {}, 4.0),
    ]
    assert search_report.running_best(records, "minimize") == [(0, 5.0), (2, 5.0), (3, 4.0),
                                                              (5, 4.0)]  # fmt: skip
    assert search_report.running_best(records, "maximize") == [(0, 5.0), (2, 6.0), (3, 6.0),
                                                              (5, 6.0)]  # fmt: skip
    assert search_report.best_trial(records, "minimize").number == 3  # the first of equals
    assert search_report.best_trial(records, "maximize").number == 2


def test_the_time_left_from_the_trials_that_ended():
    # Ended: 100 s and 200 s (complete) and a 30 s pruned one: mean 110 s, complete mean 150 s.
    # Left: 4 to start (440 s), one running for 50 s (60 s left), one past the mean (0 s),
    # 3 confirmations at 150 s (450 s): 950 s over 2 workers.
    left = search_report.estimate_left([100, 200, 30], [100, 200], [50, 500], 4, 3, 2)
    assert left == pytest.approx(950 / 2)
    assert search_report.estimate_left([], [], [10], 5, 0, 1) is None


def test_the_progress_line_counts_and_the_best(tmp_path):
    spec = small(trials=4, jobs=1)
    study = memory_study(spec)
    runner = FakeRunner(tmp_path)
    lines = run_searcher(spec, study, runner)
    started = [line for line in lines if " started " in line]
    finished = [line for line in lines if " finished: " in line]
    assert len(started) == 4 and len(finished) == 4
    assert (
        started[0].startswith("search: trial 0 started (train.lr=") and "as fake-0" in started[0]
    )
    values = [t.value for t in study.trials]
    for number, line in enumerate(finished):
        best = min(values[: number + 1])
        assert f"{number + 1} of 4 done, best {best:.4f} (trial {values.index(best)})" in line
        assert ("(new best)" in line) == (values[number] == best)
    assert "about" in finished[0] and " left]" in finished[0]


# --- the study ---------------------------------------------------------------------------------


def test_trials_are_seeded_by_their_number_so_processes_draw_different_starts():
    spec = small()
    storage = optuna.storages.InMemoryStorage()
    a, b = search_study.open_study(spec, storage), search_study.open_study(spec, storage)
    first = search_study.suggest(a.ask(), spec.space)  # process A's trial 0
    second = search_study.suggest(b.ask(), spec.space)  # process B's trial 1, its own sampler
    assert first != second
    again = search_study.open_study(spec, optuna.storages.InMemoryStorage())
    assert search_study.suggest(again.ask(), spec.space) == first  # reproducible from the seed
    seeded = SMALL.replace("pruner: none", "pruner: none\nseed: 1")
    seeded_spec = load_search(seeded % {"trials": 6, "jobs": 2, "confirm": "{top: 0}"})
    other = search_study.open_study(seeded_spec, optuna.storages.InMemoryStorage())
    assert search_study.suggest(other.ask(), spec.space) != first


def test_a_study_begun_with_another_definition_is_refused():
    storage = optuna.storages.InMemoryStorage()
    search_study.open_study(small(trials=4), storage)
    search_study.open_study(small(trials=9, jobs=1, confirm="{top: 2, seeds: [1, 2]}"), storage)
    changed = load_search((SMALL % {"trials": 4, "jobs": 2, "confirm": "{top: 0}"}).replace(
        "high: 10", "high: 12"))  # fmt: skip
    with pytest.raises(search.VaelabError, match=r"begun with another space .*name a new search"):
        search_study.open_study(changed, storage)


def test_a_password_in_the_storage_url_is_not_shown():
    url = "postgresql://vaelab:s3cret@db.example:5432/optuna"
    assert (
        search_study.shown_storage(url, Path("x"))
        == "postgresql://vaelab:***@db.example:5432/optuna"
    )
    assert search_study.shown_storage("", Path(".search/a.journal")) == ".search/a.journal"


# --- end to end --------------------------------------------------------------------------------


def test_a_confirmation_queued_twice_runs_once(tmp_path):
    """Two processes that finished the trials together both queue the confirmations: the copy
    asked second is withdrawn, not run."""
    spec = small(trials=2, jobs=1, confirm="{top: 2, seeds: [1, 2]}")
    study = memory_study(spec)
    runner = FakeRunner(tmp_path)
    searcher = search.Searcher(spec, study, runner, 1, out=lambda line: None)
    attrs = {
        search_study.KIND_ATTR: "confirm",
        search_study.CONFIRMS_ATTR: 0,
        search_study.SEED_ATTR: 1,
    }
    for _ in range(2):
        study.enqueue_trial({"train.lr": 0.001, "model.latent_dims": 4}, user_attrs=attrs)
    first, second = study.ask(), study.ask()
    assert searcher.confirmation_job(first).name == "fake-0-s1"
    assert searcher.confirmation_job(second) is None
    assert (
        study_trial(study, second.number).user_attrs[search_study.NOT_COUNTED_ATTR] == "withdrawn"
    )


# --- stopping an experiment and what DVC leaves ------------------------------------------------


def test_an_experiment_that_ignores_sigint_is_terminated_and_its_copy_removed(tmp_path):
    from vaelab import experiments

    copy = tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    other = copy.with_name("tmpother")
    for folder, name in ((copy, "s-1"), (other, "s-2")):
        (folder / "models").mkdir(parents=True)
        info = tmp_path / ".dvc" / "tmp" / "exps" / "run" / folder.name / f"{folder.name}.run"
        info.parent.mkdir(parents=True)
        info.write_text(json.dumps({"name": name, "root_dir": str(folder), "status": 2}))
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGINT, "
         "signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"],
        start_new_session=True, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert stubborn.stdout.readline() == b"ready\n"
    started = time.monotonic()
    code = experiments.stop_group(stubborn.pid, stubborn.wait, 0.5, tmp_path, "s-1")
    assert code == -signal.SIGTERM and time.monotonic() - started < 5
    assert not copy.exists() and other.exists()  # only the killed experiment's copy


def test_an_experiment_that_stops_on_sigint_keeps_its_copy_to_dvc(tmp_path):
    from vaelab import experiments

    polite = subprocess.Popen(  # 'ready' inside the try: a SIGINT before it would kill it
        [sys.executable, "-c", "import time\ntry:\n print('ready', flush=True)\n time.sleep(60)\n"
         "except KeyboardInterrupt:\n raise SystemExit(2)"],
        start_new_session=True, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert polite.stdout.readline() == b"ready\n"
    assert experiments.stop_group(polite.pid, polite.wait, 30, tmp_path, "x") == 2


# --- the MLflow side ---------------------------------------------------------------------------

# A private store copied from one migrated SQLite file: test_compare's fixtures, found by pytest
# under these names.
migrated_store = test_compare.migrated_store
private_store = test_compare.private_store


def test_two_processes_starting_the_search_keep_one_parent(private_store):
    from vaelab.tracking.searches import SearchRuns

    first = SearchRuns("vaelab", "s")
    parent, existed = first.start_parent({"search.seed": "0"})
    assert not existed
    late = SearchRuns("vaelab", "s")
    looks = []

    def none_yet():  # it looked before the first one's parent existed
        looks.append(1)
        return [] if len(looks) == 1 else SearchRuns._parents(late)

    late._parents = none_yet
    assert late.start_parent({"search.seed": "0"}) == (parent, True)
    client = first.client
    kept = client.search_runs([first.experiment_id], "tags.`vaelab.kind` = 'search'")
    assert [r.info.run_id for r in kept] == [parent]
    client.set_terminated(parent, "FAILED")  # an earlier run of the search stopped
    assert SearchRuns("vaelab", "s").start_parent({}) == (parent, True)
    assert client.get_run(parent).info.status == "RUNNING"


def test_register_takes_a_search_s_confirmed_winner_only(private_store, monkeypatch):
    from vaelab import register
    from vaelab.tracking.searches import SearchRuns

    runs = SearchRuns("vaelab", "s")
    runs.start_parent({})
    params = Path("params.yaml")
    params.write_text((PROJECT / "params.yaml").read_text())
    with pytest.raises(search.VaelabError, match=r"'nothing' in MLflow experiment 'vaelab'"):
        register.main(["--params", str(params), "--search", "nothing"])
    runs.set_verdict(None, "No winner: trial 1 and trial 4 are within the noise.")
    with pytest.raises(search.VaelabError, match=r"named no confirmed winner: No winner: trial 1"):
        register.main(["--params", str(params), "--search", "s"])
    seen = {}
    monkeypatch.setattr(register, "register_best", lambda *a, **k: seen.update(k) or 1 / 0)
    runs.set_verdict(4, "Winner: trial 4.")
    with pytest.raises(ZeroDivisionError):
        register.main(["--params", str(params), "--search", "s", "--filter", "tags.x = 'y'"])
    assert seen["filter_string"] == (
        "tags.`vaelab.search` = 's' and tags.`vaelab.confirms` = '4' and tags.x = 'y'"
    )


def test_the_report_says_what_was_tried_and_what_the_confirmation_found(tmp_path):
    records = [
        TrialRecord(0, "COMPLETE", {"train.lr": 0.001}, 10.5, {1: 12.0, 2: 10.5}, 60.0),
        TrialRecord(1, "PRUNED", {"train.lr": 0.1}, None, {1: 30.0}, 20.0, pruned_epoch=1),
        TrialRecord(2, "FAIL", {"train.lr": 0.5}, None, reason="diverged"),
        TrialRecord(3, "COMPLETE", {"train.lr": 0.002}, 10.1, {1: 11.0, 2: 10.1}, 61.0),
        TrialRecord(4, "FAIL", {"train.lr": 0.003}, None, counted=False),
    ]
    values = {"3": [10.0, 10.2, 10.1], "0": [11.0, 11.3, 11.1]}
    grouped, verdict = search_report.decide(confirmation(values), "eval/val_iw/nll", "minimize")
    text = search_report.markdown(
        "s", records, metric="eval/val_iw/nll", direction="minimize", keys=["train.lr"],
        storage="x.journal", grouped=grouped, verdict=verdict, importances={},
        figures=[], report_dir=tmp_path,
    )  # fmt: skip
    assert "4 trials (2 complete, 1 pruned, 1 failed)" in text
    assert "Best trial: 3, eval/val_iw/nll = 10.1000 (`train.lr=0.002`)." in text
    assert verdict.text in text and search_report.test_sentence(verdict) in text
    assert "(a trial's params, run with each confirmation seed)" in text
    assert "| 1 | PRUNED at epoch 1 | 0.1 |  | 1 | 20 s |" in text
    assert "| 4 | FAIL (not counted) | 0.003 |" in text
    figures = search_report.plot_figures(
        records, metric="eval/val_iw/nll", curve="epoch/val/neg_elbo", direction="minimize",
        space={"train.lr": search_file_range()}, importances={"train.lr": 1.0},
        folder=tmp_path / "figures",
    )  # fmt: skip
    names = [p.name for p in figures]
    assert names == ["running_best.png", "importances.png", "param_train.lr.png",
                     "pruned_curves.png"]  # fmt: skip
    assert all(p.stat().st_size > 0 for p in figures)


def search_file_range():
    from vaelab.search_file import Range

    return Range(0.001, 0.5, log=True)


def test_an_experiment_left_running_by_a_dead_search_is_found_and_stopped(tmp_path):
    """A search process SIGKILLed leaves its `dvc exp run` running (its own process group). On
    this machine the next search finds it by its process group's command line, which must name
    the experiment (a reused pid does not), and stops it with SIGINT."""
    from vaelab import experiments

    script = "import time\ntry:\n print('ready', flush=True)\n time.sleep(60)\nexcept " \
        "KeyboardInterrupt:\n raise SystemExit(2)"  # fmt: skip
    orphan = subprocess.Popen(
        [sys.executable, "-c", script, "exp", "run", "--temp", "-n", "s-3"],
        start_new_session=True, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert orphan.stdout.readline() == b"ready\n"
    assert experiments.group_runs(orphan.pid, "s-3")
    assert not experiments.group_runs(orphan.pid, "s-4")
    # Its parent, the dead search, is gone and init reaps it; here this test is its parent.
    reaper = threading.Thread(target=orphan.wait)
    reaper.start()
    runner = search.DvcRunner(None, tmp_path, 1)
    started = time.monotonic()
    assert runner.stop_orphan(orphan.pid, "s-3")
    reaper.join()
    assert orphan.returncode == 2 and time.monotonic() - started < 10
    assert not experiments.group_runs(orphan.pid, "s-3")
