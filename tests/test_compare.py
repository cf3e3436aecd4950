"""vaelab.compare on a store filled by hand: what varies is found, the table is sorted by the
metric, the figures are written and logged to a comparison run that later comparisons skip."""

from __future__ import annotations

import csv
import shutil
import statistics
from pathlib import Path

import matplotlib
import pytest

from vaelab import compare
from vaelab.errors import VaelabError
from vaelab.tracking.queries import find_runs
from vaelab.tracking.store import connect
from vaelab.tracking.sweeps import fail_sweep, start_sweep

matplotlib.use("Agg")

# latent_dims -> final epoch/test/neg_elbo and IW-NLL; the IW-NLL order differs from the insert
# order.
RUNS = {2: (30.0, 29.0), 5: (25.0, 24.0), 10: (26.0, 24.5)}


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made: MLflow takes about 10 s to make them on
    a busy 2-core machine, a copy of the file well under one."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("migrated") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def private_store(migrated_store, tmp_path, monkeypatch) -> Path:
    """A store of this test's own in ``tmp_path`` (artifacts under ``tmp_path/mlartifacts``)."""
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def store(private_store):
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, Param

    tmp_path = private_store
    client, experiment_id = connect("vaelab")
    scatter = tmp_path / "latent_scatter.png"
    plt.imsave(scatter, [[0.0, 1.0], [1.0, 0.0]])
    for latent, (neg_elbo, nll) in RUNS.items():
        tags = {"dvc.exp_name": f"z{latent}", "git.commit": "abcdef1234", "sweep": "s1"}
        run_id = client.create_run(experiment_id, run_name=f"z{latent}", tags=tags).info.run_id
        params = {"model.latent_dims": str(latent), "train.lr": "0.001", "mlflow.sweep": "s1"}
        metrics = [
            Metric("eval/test_iw/nll", nll, 0, 0),
            Metric("eval/latent/active_units", min(latent, 4), 0, 0),
        ]
        for epoch in (1, 2):
            metrics += [
                Metric("epoch/test/neg_elbo", neg_elbo + 2 - epoch, 0, epoch),
                Metric("epoch/train/neg_elbo", neg_elbo + 3 - epoch, 0, epoch),
                Metric("epoch/train/loss", neg_elbo + 2.5 - epoch, 0, epoch),
                Metric("epoch_seconds", 1.0 + epoch, 0, epoch),
            ]
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()], metrics=metrics)
        client.log_artifact(run_id, str(scatter), "figures")
        client.set_terminated(run_id, "FINISHED")
    unfinished = client.create_run(experiment_id, run_name="still-running").info.run_id
    client.log_batch(unfinished, params=[Param("model.latent_dims", "99")])
    return tmp_path


def test_table_figures_and_comparison_run(store):
    report, figures = store / "reports" / "comparison.md", store / "reports" / "comparison"
    files = compare.compare("vaelab", report, figures, filter_string="tags.sweep = 's1'")
    text = report.read_text()
    assert "Same in every run:" in text and "`train.lr=0.001`" in text
    header = next(line for line in text.splitlines() if line.startswith("| run"))
    assert "model.latent_dims" in header and "train.lr" not in header
    rows = list(csv.DictReader((store / "reports" / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["z5", "z10", "z2"]  # by eval/test_iw/nll, ascending
    assert [float(r["epoch/test/neg_elbo"]) for r in rows] == [25.0, 26.0, 30.0]  # the last epoch
    assert [float(r["epoch_seconds"]) for r in rows] == [2.5, 2.5, 2.5]  # median of 2 and 3
    assert {r["commit"] for r in rows} == {"abcdef1"}
    names = {p.name for p in files}
    assert {
        "comparison_curves.png",
        "comparison_model.latent_dims.png",
        "comparison_latents.png",
    } <= names
    for path in files:
        assert path.stat().st_size > 0
    # Logged to a comparison run, which the next comparison leaves out.
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (logged,) = client.search_runs(
        [client.get_experiment_by_name("vaelab").experiment_id],
        "tags.`vaelab.kind` = 'comparison'",
    )
    assert logged.info.run_name == "comparison" and logged.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "comparison")}
    assert artifacts == {f"comparison/{name}" for name in names}
    again = find_runs("vaelab")
    assert sorted(again["tags.mlflow.runName"]) == ["z10", "z2", "z5"]


def test_run_ids_descending_and_errors(store):
    runs = find_runs("vaelab")
    ids = list(runs["run_id"][:2])
    report = store / "c.md"
    compare.compare(
        "vaelab",
        report,
        store / "f",
        run_ids=ids,
        log=False,
        metric="eval/latent/active_units",
        descending=True,
    )
    rows = list(csv.DictReader(report.with_suffix(".csv").open()))
    assert sorted(r["run_id"] for r in rows) == sorted(ids)
    assert float(rows[0]["eval/latent/active_units"]) >= float(rows[1]["eval/latent/active_units"])
    # A metric outside the table's usual columns ranks too, and is shown.
    compare.compare("vaelab", report, store / "f", metric="epoch/train/loss", log=False)
    rows = list(csv.DictReader(report.with_suffix(".csv").open()))
    assert [r["run"] for r in rows] == ["z5", "z10", "z2"]
    assert [float(r["epoch/train/loss"]) for r in rows] == [25.5, 26.5, 30.5]
    with pytest.raises(
        VaelabError, match="no selected run has the metric 'nll'.*eval/test_iw/nll"
    ):
        compare.compare("vaelab", report, store / "f", metric="nll", log=False)
    with pytest.raises(VaelabError, match="expected 4 FINISHED runs.*found 3"):
        compare.compare("vaelab", report, store / "f", log=False, expect_runs=4)
    with pytest.raises(VaelabError, match="MLflow cannot search with"):
        compare.compare("vaelab", report, store / "f", filter_string="tags.sweep ==", log=False)
    with pytest.raises(VaelabError, match="no FINISHED runs in experiment 'vaelab' matching"):
        compare.compare("vaelab", report, store / "f", filter_string="tags.sweep = 'x'")
    with pytest.raises(VaelabError, match="no MLflow experiment 'other'"):
        compare.compare("other", report, store / "f")


def test_a_sweep_whose_comparison_fails_ends_its_parent_failed(store):
    """`make sweep` passes --sweep: when an experiment of the sweep failed (fewer runs than
    queued), the parent run ends FAILED with the reason as its note instead of staying RUNNING."""
    parent = start_sweep("vaelab", "s1", {"model.latent_dims": "2,5,10,20"})
    args = ["--params", "unused.yaml", "--experiment", "vaelab", "--report", str(store / "c.md")]
    args += ["--figures", str(store / "f"), "--filter", "tags.sweep = 's1'"]
    with pytest.raises(VaelabError, match="expected 4 FINISHED runs"):
        compare.main([*args, "--expect-runs", "4", "--sweep", "s1"])
    client, _ = connect("vaelab")
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert "expected 4 FINISHED runs" in run.data.tags["mlflow.note.content"]
    # A sweep that compares is finished by compare, as before.
    other = start_sweep("vaelab", "s2", {"train.seed": "1,2"})
    compare.main([*args, "--expect-runs", "3", "--sweep", "s2", "--no-log"])
    assert client.get_run(other).info.status == "RUNNING"  # --no-log: nothing to finish it with
    assert fail_sweep("vaelab", "s1", "again") is False  # ended once, not twice


def add_run(client, experiment_id: str, name: str, params: dict, nll: float, **kw) -> str:
    """A hand-made training run: ``params``, ``eval/test_iw/nll`` = ``nll``, one
    ``epoch/test/neg_elbo`` and ``epoch_seconds`` per value of ``epoch_seconds`` (default two),
    tags ``tags``; ended ``status`` (default FINISHED)."""
    from mlflow.entities import Metric, Param

    tags = {"dvc.exp_name": name, **kw.get("tags", {})}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    metrics = [Metric("eval/test_iw/nll", nll, 0, 0)]
    for epoch, seconds in enumerate(kw.get("epoch_seconds", (2.0, 3.0)), start=1):
        metrics += [
            Metric("epoch/test/neg_elbo", nll + 5 - epoch, 0, epoch),
            Metric("epoch_seconds", seconds, 0, epoch),
        ]
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()], metrics=metrics)
    client.set_terminated(run_id, kw.get("status", "FINISHED"))
    return run_id


def test_epoch_seconds_is_each_run_s_median_epoch(private_store):
    """Three and five epochs, each with one slow epoch (a cold cache, a busy machine): the median
    ignores it, a mean would not."""
    client, experiment_id = connect("vaelab")
    seconds = {"z2": (2.0, 31.0, 3.0), "z5": (4.0, 4.5, 60.0, 5.5, 5.0)}
    for latent, (name, times) in zip((2, 5), seconds.items(), strict=True):
        params = {"model.latent_dims": str(latent)}
        add_run(client, experiment_id, name, params, 20.0 + latent, epoch_seconds=times)
    report = private_store / "c.md"
    compare.compare("vaelab", report, private_store / "f", log=False)
    rows = {r["run"]: r for r in csv.DictReader(report.with_suffix(".csv").open())}
    for name, times in seconds.items():
        assert float(rows[name]["epoch_seconds"]) == statistics.median(times), name
        assert statistics.median(times) != statistics.mean(times)  # the test can tell them apart


@pytest.fixture
def sweeps(private_store):
    """Two sweeps in one store, each a parent run (start_sweep) with its children: s1 with three
    FINISHED runs (latent_dims 2, 5, 10), s2 with two FINISHED runs and a FAILED one."""
    client, experiment_id = connect("vaelab")
    made = {}
    for label, latents, failed in (("s1", (2, 5, 10), ()), ("s2", (3, 4, 6), (6,))):
        parent = start_sweep("vaelab", label, {"model.latent_dims": ",".join(map(str, latents))})
        children = []
        for latent in latents:
            tags = {"sweep": label, "mlflow.parentRunId": parent}
            params = {"model.latent_dims": str(latent), "mlflow.sweep": label}
            status = "FAILED" if latent in failed else "FINISHED"
            name, nll = f"{label}-z{latent}", 20.0 + latent
            children.append(
                add_run(client, experiment_id, name, params, nll, tags=tags, status=status)
            )
        made[label] = (parent, children)
    return client, made


def _logged_report(client, run_id: str, folder: Path) -> str | None:
    """The comparison.md logged into ``run_id``, or None when it has none."""
    import mlflow

    logged = {a.path for a in client.list_artifacts(run_id, "comparison")}
    if "comparison/comparison.md" not in logged:
        return None
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="comparison/comparison.md", dst_path=str(folder)
    )
    return Path(local).read_text()


def _comparison_runs(client) -> list:
    experiment_id = client.get_experiment_by_name("vaelab").experiment_id
    return client.search_runs([experiment_id], "tags.`vaelab.kind` = 'comparison'")


def _compare(store: Path, *options: str) -> None:
    args = ["--params", "unused.yaml", "--experiment", "vaelab"]
    args += ["--report", str(store / "reports" / "comparison.md"), "--figures", str(store / "f")]
    compare.main([*args, *options])


def test_all_of_a_sweep_s_runs_are_compared_into_its_parent_which_finishes(sweeps, private_store):
    client, made = sweeps
    parent, children = made["s1"]
    _compare(private_store, "--filter", "tags.sweep = 's1'")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert sorted(run.data.tags["vaelab.compared_runs"].split(",")) == sorted(children)
    assert "3 runs" in _logged_report(client, parent, private_store / "d")
    assert _comparison_runs(client) == []  # no run of its own


def test_a_partial_comparison_leaves_the_sweep_s_report_alone(sweeps, private_store, capsys):
    """Some of a sweep's runs, by --run-ids or by a --filter narrower than the sweep: the report
    goes into a run of its own, and the sweep's parent keeps its full report and its status."""
    client, made = sweeps
    parent, children = made["s1"]
    _compare(private_store, "--filter", "tags.sweep = 's1'")
    full = _logged_report(client, parent, private_store / "full")
    assert "3 runs" in full
    narrower = "tags.sweep = 's1' and params.`model.latent_dims` != '2'"
    for options in (["--run-ids", *children[:2]], ["--filter", narrower]):
        capsys.readouterr()
        _compare(private_store, *options)
        again = _logged_report(client, parent, private_store / options[0].strip("-"))
        assert again == full, f"compare {options} replaced the sweep's full report"
        assert client.get_run(parent).info.status == "FINISHED"
        assert "of its own, not the sweep's parent: 2 of sweep 's1''s 3 runs" in (
            capsys.readouterr().out
        )
    partial = _comparison_runs(client)
    assert len(partial) == 2
    for run in partial:
        assert len(run.data.tags["vaelab.compared_runs"].split(",")) == 2
        assert "2 runs" in _logged_report(client, run.info.run_id, private_store / run.info.run_id)


def test_a_sweep_with_a_failed_run_is_not_finished_by_a_comparison_of_the_others(
    sweeps, private_store
):
    """s2's FAILED child is one of its runs too: comparing the two FINISHED ones covers only
    part of the sweep, so the parent is neither given the report nor marked FINISHED."""
    client, made = sweeps
    parent, _ = made["s2"]
    _compare(private_store, "--filter", "tags.sweep = 's2'")
    assert client.get_run(parent).info.status == "RUNNING"
    assert _logged_report(client, parent, private_store / "d") is None
    (own,) = _comparison_runs(client)
    assert own.info.status == "FINISHED"


def test_a_failed_sweep_parent_stays_failed_with_its_reason(sweeps, private_store):
    client, made = sweeps
    parent, _ = made["s1"]
    assert fail_sweep("vaelab", "s1", "interrupted (KeyboardInterrupt)")
    _compare(private_store, "--filter", "tags.sweep = 's1'")
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.note.content"] == (
        "The sweep failed: interrupted (KeyboardInterrupt)"
    )
    assert _logged_report(client, parent, private_store / "d") is None
    assert len(_comparison_runs(client)) == 1


def test_runs_of_two_sweeps_are_compared_into_a_run_of_their_own(sweeps, private_store):
    """Every FINISHED run of the store: three of s1's and two of s2's. Neither parent gets the
    report, nor is finished by it."""
    client, made = sweeps
    _compare(private_store)
    for label, (parent, _) in made.items():
        assert client.get_run(parent).info.status == "RUNNING", label
        assert _logged_report(client, parent, private_store / label) is None, label
    (own,) = _comparison_runs(client)
    assert len(own.data.tags["vaelab.compared_runs"].split(",")) == 5
