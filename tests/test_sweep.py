"""make sweep's pieces on their own: the grid, its checks before anything is queued, reading
DVC's output, and the progress lines while the queue runs; then a whole 2 x 2 grid through DVC's
queue on a fake-MNIST copy of the repository."""

from __future__ import annotations

import csv
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT
from tests.test_pipeline import assert_complete, client_for, make_repo, run, runs, set_param
from vaelab import sweep
from vaelab.errors import VaelabError


def test_a_grid_is_keys_with_their_values_and_every_combination():
    grid = sweep.parse_grid("model.latent_dims=5,10  train.seed=0,1,2 model.hidden=[200,200],[64]")
    assert grid == {
        "model.latent_dims": ["5", "10"],
        "train.seed": ["0", "1", "2"],
        "model.hidden": ["[200,200]", "[64]"],
    }
    combos = sweep.combinations(grid)
    assert len(combos) == 2 * 3 * 2
    assert combos[0] == {"model.latent_dims": "5", "train.seed": "0", "model.hidden": "[200,200]"}
    assert combos[1] == {"model.latent_dims": "5", "train.seed": "0", "model.hidden": "[64]"}
    assert len({tuple(c.values()) for c in combos}) == 12
    assert sweep.parse_grid("model.latent_dims=2,5,10,20") == {
        "model.latent_dims": ["2", "5", "10", "20"]
    }


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("train.seed", "is not KEY=VALUES"),
        ("=1,2", "is not KEY=VALUES"),
        ("train.seed=", "has an empty value"),
        ("train.seed=1,,2", "has an empty value"),
        ("train.seed=1 train.seed=2", "is given twice"),
        ("mlflow.sweep=a,b", "the sweep's own label"),
        ("", "the grid is empty"),
    ],
)
def test_a_malformed_grid_is_named(grid, message):
    with pytest.raises(VaelabError, match=message):
        sweep.parse_grid(grid)


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((PROJECT / "params.yaml").read_text())
    return path


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("model.latent_dim=5,10", r"unknown key 'model.latent_dim'. Did you mean 'latent_dims'"),
        ("modle.latent_dims=5", r"unknown section 'modle'. Did you mean 'model'"),
        ("train=5", r"'train' is not a params key"),
        (
            "train.seed=0 model.latent_dims=5,1",
            r"latent_dims=1 is refused: .*'model.latent_dims' is 1",
        ),
        ("train.lr=0.1,fast", r"'train.lr' is 'fast'; expected a finite number"),
        ("data.binarize=dynamic", r"'data.binarize' is 'dynamic' but 'loss.likelihood'"),
    ],
)
def test_a_grid_the_params_schema_refuses_stops_before_anything_is_queued(
    params_file, grid, message, monkeypatch
):
    def no_dvc(*args, **kwargs):
        raise AssertionError("nothing may be queued")

    monkeypatch.setattr(sweep, "_dvc", no_dvc)
    with pytest.raises(VaelabError, match=message):
        sweep.main(
            ["--params", str(params_file), "--report", "r.md", "--figures", "f", "--grid", grid]
        )


def test_too_many_combinations_ask_for_a_higher_limit(params_file):
    grid = sweep.parse_grid("train.seed=" + ",".join(str(s) for s in range(9)) + " train.lr=1,2")
    assert sweep.check_grid(params_file, grid, 18) == 18
    with pytest.raises(VaelabError, match=r"18 combinations, more than the 17 .*SWEEP_MAX=18"):
        sweep.check_grid(params_file, grid, 17)


def test_a_broken_params_file_is_its_own_error(params_file):
    raw = yaml.safe_load(params_file.read_text())
    raw["train"]["epochs"] = 0
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(VaelabError, match=r"'train.epochs' is 0") as caught:
        sweep.check_grid(params_file, {"train.seed": ["1"]}, 64)
    assert "combination" not in str(caught.value)


# What DVC 3.67 printed for `dvc exp run --queue -S model.latent_dims=5,10 -S mlflow.sweep=s`.
QUEUED = """\
Queueing with overrides '{'params.yaml': ['model.latent_dims=5', 'mlflow.sweep=s']}'.
Queued experiment 'forky-moms' for future execution.
Queueing with overrides '{'params.yaml': ['model.latent_dims=10', 'mlflow.sweep=s']}'.
Queued experiment 'muzzy-puke' for future execution.
"""
STATUS = """\
Task     Name        Created    Status
dd648c4  forky-moms  09:41 AM   {0}
8e5b6e6  muzzy-puke  Dec 01, 2026   {1}
1111111  old-one     09:00 AM   Success

Worker status: 1 active, 0 idle
"""


def test_dvc_s_output_is_read_into_names_params_and_statuses():
    assert sweep.parse_queued(QUEUED) == [
        sweep.Queued("forky-moms", {"model.latent_dims": "5"}),
        sweep.Queued("muzzy-puke", {"model.latent_dims": "10"}),
    ]
    assert sweep.parse_queue_status(STATUS.format("Running", "Queued")) == {
        "forky-moms": "Running",
        "muzzy-puke": "Queued",
        "old-one": "Success",
    }


def test_a_line_when_an_experiment_starts_finishes_or_fails_with_its_time():
    queued = sweep.parse_queued(QUEUED)
    progress = sweep.Progress(queued, started=0.0)

    def look(first: str, second: str, now: float) -> list[str]:
        return progress.update(sweep.parse_queue_status(STATUS.format(first, second)), now)

    assert look("Queued", "Queued", 5.0) == []
    assert look("Running", "Queued", 10.0) == ["sweep: started forky-moms (model.latent_dims=5)"]
    assert progress.counts() == "1 running, 1 queued, 0 ended"
    assert look("Running", "Queued", 15.0) == []
    assert look("Success", "Running", 135.0) == [
        "sweep: finished forky-moms (model.latent_dims=5) in 2 min 05 s",
        "sweep: started muzzy-puke (model.latent_dims=10)",
    ]
    assert not progress.done
    assert look("Success", "Failed", 147.0) == [
        "sweep: FAILED muzzy-puke (model.latent_dims=10) in 12 s (Failed); its log: "
        "dvc queue logs muzzy-puke"
    ]
    assert progress.done and progress.counts() == "0 running, 0 queued, 2 ended"


def test_an_experiment_that_ran_between_two_looks_is_reported_once():
    progress = sweep.Progress(sweep.parse_queued(QUEUED), started=0.0)
    lines = progress.update({"forky-moms": "Success", "muzzy-puke": "Queued"}, 4.0)
    assert lines == ["sweep: finished forky-moms (model.latent_dims=5) within 4 s"]
    assert progress.update({"forky-moms": "Success", "muzzy-puke": "Queued"}, 8.0) == []


class FakeStart:
    """`dvc queue start` as Popen sees it: running for ``polls`` looks, then exited ``code``."""

    def __init__(self, code: int, polls: int = 0) -> None:
        self.code, self.polls = code, polls

    def poll(self) -> int | None:
        self.polls -= 1
        return self.code if self.polls < 0 else None

    def wait(self) -> int:
        return self.code


def fake_queue(monkeypatch, start: FakeStart, printed: str, statuses: list[str]):
    """Popen gives ``start`` (its messages ``printed``), each `dvc queue status` the next of
    ``statuses`` (the last one again when they run out), and a sweep still watching 20 looks
    after they ran out fails the test instead of hanging it."""
    looks = []

    def popen(command, stdout, **kwargs):
        assert command[:3] == ["dvc", "queue", "start"], command
        stdout.write(printed)
        return start

    def dvc(*args, env=None):
        assert args == ("queue", "status"), args
        looks.append(args)
        if len(looks) > len(statuses) + 20:
            raise AssertionError(f"still watching after {len(looks) - 1} looks: it never stops")
        return statuses[min(len(looks), len(statuses)) - 1]

    monkeypatch.setattr(sweep.subprocess, "Popen", popen)
    monkeypatch.setattr(sweep, "_dvc", dvc)
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.0)
    return looks


def status(first: str, second: str, active: int, extra: str = "") -> str:
    """`dvc queue status` as DVC 3.67.1 prints it (seen in a scratch repository)."""
    return (
        "Task     Name        Created    Status\n"
        f"dd648c4  forky-moms  09:41 AM   {first}\n"
        f"8e5b6e6  muzzy-puke  09:41 AM   {second}\n{extra}"
        f"\nWorker status: {active} active, 0 idle\n"
    )


def test_a_queue_start_that_fails_stops_the_sweep_and_ends_its_parent_failed(
    tmp_path, monkeypatch
):
    """`dvc queue start` exits 2 at once: the experiments stay Queued, and the sweep used to
    watch them forever. It stops at the first look, with what the start printed."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sweep, "queue", lambda grid, label: sweep.parse_queued(QUEUED))
    printed = "ERROR: unexpected error - redis broker unreachable\n"
    looks = fake_queue(monkeypatch, FakeStart(2), printed, [status("Queued", "Queued", 0)])
    args = ["--params", str(PROJECT / "params.yaml"), "--grid", "train.seed=1,2", "--label", "s"]
    args += ["--report", str(tmp_path / "c.md"), "--figures", str(tmp_path / "c")]
    with pytest.raises(VaelabError, match=r"dvc queue start failed \(exit 2\).*\n.*broker"):
        sweep.main(args)
    assert len(looks) <= 1  # seen while watching, not after every experiment had ended
    client = MlflowClient(uri)
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert parent.info.status == "FAILED"
    assert "redis broker unreachable" in parent.data.tags["mlflow.note.content"]


def test_workers_that_never_take_the_queue_up_stop_the_sweep_after_the_bound(monkeypatch):
    """`dvc queue start` exits 0 at once (DVC 3.67 detaches its workers) but no worker ever
    runs an experiment: after PICKUP_SECONDS the sweep stops, naming the commands that say why."""
    monkeypatch.setattr(sweep, "PICKUP_SECONDS", 0.05)
    printed = "Started '0' new experiments task queue worker.\n"
    fake_queue(monkeypatch, FakeStart(0), printed, [status("Queued", "Queued", 0)])
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.01)  # 20 looks outlast the bound
    with pytest.raises(VaelabError) as stopped:
        sweep.run_queue(sweep.parse_queued(QUEUED), 2)
    message = str(stopped.value)
    assert "2 experiments of the sweep have stayed queued" in message
    assert "Worker status: 0 active, 0 idle" in message
    assert "dvc queue status" in message and "dvc queue logs NAME" in message
    assert message.endswith(printed.strip())


@pytest.mark.parametrize(
    "scenario",
    ["a start that returns at once", "a busy worker on an older experiment", "a long run"],
)
def test_a_queue_that_moves_is_watched_to_its_end_however_long_it_takes(monkeypatch, scenario):
    """What must not stop a sweep, each for longer than the bound: DVC's start returning at once
    with its workers detached while the experiments are still queued (the case commit ed9d4e7
    found), a worker busy with an experiment queued before the sweep, an experiment running."""
    monkeypatch.setattr(sweep, "PICKUP_SECONDS", 0.2)
    older = "1111111  old-one     09:00 AM   Running\n"
    waiting = {  # 20 looks of 0.02 s at least: 0.4 s, twice the bound
        "a start that returns at once": [status("Queued", "Queued", 0)],
        "a busy worker on an older experiment": [status("Queued", "Queued", 1, older)] * 20,
        "a long run": [status("Running", "Queued", 1)] * 20,
    }[scenario]
    statuses = [*waiting, status("Running", "Running", 2), status("Success", "Success", 0)]
    looks = fake_queue(monkeypatch, FakeStart(0), "Started '2' new workers.\n", statuses)
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.02)
    sweep.run_queue(sweep.parse_queued(QUEUED), 2)
    assert len(looks) == len(statuses)


def test_a_real_queue_without_workers_stops_the_sweep(tmp_path, monkeypatch):
    """DVC 3.67.1 itself, in a scratch repository with a one-line stage: two experiments queued,
    `dvc queue start -j 0` (it starts no worker and exits 0), its `dvc queue status` read."""
    env = {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("x: 1\n")
    stage = {"cmd": "cp params.yaml out.txt", "params": ["x"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": stage}}))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, check=True)
    subprocess.run(["git", "commit", "-qm", "scratch"], check=True)
    queued = sweep.parse_queued(sweep._dvc("exp", "run", "--queue", "-S", "x=2,3"))
    assert len(queued) == 2
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.2)
    monkeypatch.setattr(sweep, "PICKUP_SECONDS", 1.0)
    with pytest.raises(VaelabError, match=r"2 experiments .* \(Worker status: 0 active, 0 idle\)"):
        sweep.run_queue(queued, 0)


def test_no_workers_at_all_is_refused_before_anything_is_queued(params_file, monkeypatch):
    monkeypatch.setattr(sweep, "start_sweep", lambda *a: pytest.fail("nothing may start"))
    args = ["--params", str(params_file), "--report", "r.md", "--figures", "f"]
    with pytest.raises(VaelabError, match="--jobs is 0; run at least 1"):
        sweep.main([*args, "--grid", "train.seed=1,2", "--jobs", "0"])


def test_a_sweep_that_cannot_queue_ends_its_parent_failed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def no_queue(grid, label):
        raise VaelabError("dvc exp run --queue failed: no scm")

    monkeypatch.setattr(sweep, "queue", no_queue)
    args = ["--params", str(PROJECT / "params.yaml"), "--grid", "train.seed=1,2", "--label", "s"]
    args += ["--report", str(tmp_path / "c.md"), "--figures", str(tmp_path / "c")]
    with pytest.raises(VaelabError, match="no scm"):
        sweep.main(args)
    client = MlflowClient(uri)
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert parent.info.run_name == "s" and parent.info.status == "FAILED"
    assert "no scm" in parent.data.tags["mlflow.note.content"]


def test_a_queued_grid_is_a_parent_run_with_a_child_per_combination_grouped_by_config(tmp_path):
    """`python -m vaelab.sweep` as make sweep runs it on a 2 x 2 grid (latent_dims x seed, one
    epoch): the parent run, DVC's grid syntax (one queued experiment per combination), a line as
    each starts and finishes, two configuration ids, then the comparison into the parent with
    the per-configuration means and standard deviations (checked against the runs' own
    metrics)."""
    repo = make_repo(tmp_path / "queue")
    set_param(repo, "train", "epochs", 1)
    run(repo, "git", "commit", "-qam", "one epoch")
    sweep = [sys.executable, "-m", "vaelab.sweep", "--params", "params.yaml", "--label", "grid"]
    sweep += ["--report", "reports/comparison.md", "--figures", "reports/comparison"]
    grid = "model.latent_dims=3,4 train.seed=1,2"
    output = run(repo, *sweep, "--grid", grid, "--jobs", "2", timeout=900)
    parent, *done = runs(repo)
    assert (parent.info.run_name, parent.data.params) == (
        "grid",
        {"sweep.model.latent_dims": "3,4", "sweep.train.seed": "1,2"},
    )
    assert len(done) == 4
    for r in done:  # as each experiment started and ended, a line with its name and params
        what = f"model.latent_dims={r.data.params['model.latent_dims']}, "
        what += f"train.seed={r.data.params['train.seed']}"
        assert f"sweep: started {r.info.run_name} ({what})" in output, output
        assert re.search(rf"sweep: finished {r.info.run_name} \({what}\) (in|within) ", output)
    # The sweep is one expandable row in the UI: all runs are the parent's children.
    assert [r.data.tags["mlflow.parentRunId"] for r in done] == [parent.info.run_id] * 4
    assert sorted(r.data.tags["params.changed"] for r in done) == [
        f"model.latent_dims={z}, train.seed={s}, mlflow.sweep=grid" for z in (3, 4) for s in (1, 2)
    ]
    by_latent = {}
    for r in done:
        assert r.data.tags["dvc.exp_name"] == r.info.run_name and r.data.tags["sweep"] == "grid"
        by_latent.setdefault(r.data.params["model.latent_dims"], []).append(r)
    configs = {z: {r.data.tags["vaelab.config"] for r in rs} for z, rs in by_latent.items()}
    assert all(len(ids) == 1 for ids in configs.values()) and configs["3"] != configs["4"]
    last = done[-1]
    run(repo, "dvc", "exp", "apply", last.info.run_name)
    assert_complete(repo, last, repo / "params.yaml")
    # The comparison: per configuration, n = 2, the mean and sample sd of its two runs.
    rows = list(csv.DictReader((repo / "reports" / "comparison_by_config.csv").open()))
    assert sorted(r["model.latent_dims"] for r in rows) == ["3", "4"]
    for row in rows:
        pair = by_latent[row["model.latent_dims"]]
        assert row["runs"] == "2" and row["config"] == pair[0].data.tags["vaelab.config"]
        for metric in ("eval/val_iw/nll", "eval/test_iw/nll", "epoch/val/neg_elbo"):
            values = [r.data.metrics[metric] for r in pair]
            assert float(row[f"{metric} mean"]) == pytest.approx(statistics.mean(values))
            assert float(row[f"{metric} sd"]) == pytest.approx(statistics.stdev(values))
    table = (repo / "reports" / "comparison.md").read_text()
    assert "## By configuration" in table and "Welch's t-test" in table
    # The report went into the sweep's parent, which is now finished; no sibling run was made.
    parent = client_for(repo).get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    logged = {a.path for a in client_for(repo).list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/comparison_by_config.csv"} <= logged
    assert len(runs(repo)) == 5
    assert (repo / "reports" / "comparison" / "comparison_curves.png").stat().st_size > 0
