"""vaelab.compare on a store filled by hand: what varies is found, the table is sorted by the
metric, the figures are written and logged to a comparison run that later comparisons skip."""

from __future__ import annotations

import csv

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


@pytest.fixture
def store(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, Param

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
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
