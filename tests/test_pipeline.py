"""End to end: `dvc repro` / `dvc exp run` in a temporary copy of the repository on fake MNIST,
then the MLflow store read back with MlflowClient. One test per row of the completeness table:

| case                                               | wanted                                  |
|----------------------------------------------------|-----------------------------------------|
| `dvc repro` with changes                           | the run is complete                     |
| `dvc repro` with nothing changed                   | no new run, no duplicate                |
| only an evaluate or plot param changed             | a complete run for the new config       |
| `dvc exp run` of params seen before (run cache)    | a complete run exists for that exp      |
| a queued 2 x 2 grid, `-j 2`, fresh store           | four complete runs in the root store    |
|                                                    | (tests/test_sweep.py)                   |

Each test starts from a state of its own: a fresh repository, or a private copy of one that has
been through `dvc repro` (``reproduced_copy``), so they pass alone and in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import N_TEST, N_TRAIN, N_VAL, PROJECT, TINY, write_fake_mnist
from vaelab import params as params_mod
from vaelab.history import metrics as history_metrics
from vaelab.plot import FIGURES
from vaelab.tracking.record import COUNTS

EXPERIMENT = "vaelab"

# Under `pytest -n 2 --dist loadgroup` (make test) these tests run in one worker, which builds
# their shared fixtures once.
pytestmark = pytest.mark.xdist_group("reproduced")
EVAL_METRICS = [
    "eval/val/neg_elbo",
    "eval/val_iw/nll",
    "eval/val_latent/probe_accuracy",
    "eval/test/neg_elbo",
    "eval/test/recon",
    "eval/test/kl",
    "eval/train/neg_elbo",
    "eval/train_last_epoch/neg_elbo",
    "eval/test_iw/nll",
    "eval/test_iw/nll_stderr",
    "eval/latent/active_units",
    "eval/latent/probe_accuracy",
    "eval/test_per_digit/0",
]


def _env(repo: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_")) and k != "VIRTUAL_ENV"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= {
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
    }
    return env


def run(repo: Path, *cmd: str, timeout: int = 300) -> str:
    result = subprocess.run(
        cmd, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output}"
    return output


def make_repo(path: Path) -> Path:
    """A git + DVC repository with the project's files, tiny params and committed fake data."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if name.startswith(("tests/", "reports/")) or name == "dvc.lock":
            continue
        if (PROJECT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, path / name)
    raw = yaml.safe_load((path / "params.yaml").read_text())
    for section, values in TINY.items():
        raw[section].update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_fake_mnist(path / "data" / "custom")
    run(path, "git", "init", "-q", "-b", "main")
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-qm", "fake-MNIST copy of vaelab")
    return path


def set_param(repo: Path, section: str, key: str, value) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def client_for(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs(repo: Path):
    client = client_for(repo)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def assert_complete(repo: Path, run_, params_file: Path) -> None:
    """Every param, one value per epoch per metric, the eval metrics, figures and model."""
    client = client_for(repo)
    assert run_.info.status == "FINISHED"
    expected = {k: str(v) for k, v in params_mod.flatten(params_mod.load(params_file)).items()}
    assert run_.data.params == expected
    epochs = int(expected["train.epochs"])
    split = "val" if int(expected["data.validation"]) else "test"
    for key in history_metrics(split):
        history = client.get_metric_history(run_.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
    for key in EVAL_METRICS:
        assert key in run_.data.metrics, key
    figures = {Path(a.path).name for a in client.list_artifacts(run_.info.run_id, "figures")}
    assert figures == set(FIGURES)
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "model")] == ["model/vae.pt"]
    reports = {Path(a.path).name for a in client.list_artifacts(run_.info.run_id, "reports")}
    assert {"params.yaml", "metrics.json", "train_history.csv", "checksums.json"} <= reports
    tags = run_.data.tags
    head = run(repo, "git", "rev-parse", "HEAD").strip()
    assert tags["git.commit"] == (tags["dvc.baseline_rev"] or head)
    manifest = yaml.safe_load((repo / "data" / "custom" / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert tags[f"data.md5.{name}"] == entry["md5"]
    assert tags["device"] == "cpu" and tags["torch.version"]
    # Counts are tags, never metrics; the data are the run's dataset inputs; MLflow's own
    # source tags fill the UI's Source column.
    assert (
        not set(COUNTS) & set(run_.data.metrics) and "epoch/train/images" not in run_.data.metrics
    )
    assert tags["eval.images.train"] == tags["train.images_per_epoch"] == str(N_TRAIN)
    assert tags["eval.images.test"] == str(N_TEST)
    assert tags["eval.images.val"] == str(N_VAL)
    # Named after the source and split (and the binarisation, where there is one).
    contexts = {
        i.dataset.name.split(" (")[0]: {t.key: t.value for t in i.tags}
        for i in run_.inputs.dataset_inputs
    }
    assert {name: tags_["mlflow.data.context"] for name, tags_ in contexts.items()} == {
        f"custom train[0:{N_TRAIN}]": "training",
        f"custom validation[{N_TRAIN}:{N_TRAIN + N_VAL}]": "validation",
        "custom test": "test",
    }
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"].startswith("src/")
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] and tags["mlflow.user"]
    # Artifacts live in the repository's mlartifacts/, not in a temporary copy.
    local = Path(run_.info.artifact_uri.removeprefix("file://"))
    assert local.is_relative_to(repo / "mlartifacts"), run_.info.artifact_uri
    assert (local / "figures" / "latent_grid.png").stat().st_size > 0


def move_store(db: Path, old: Path, new: Path) -> None:
    """Point every path under ``old`` in the SQLite store ``db`` to ``new``: MLflow keeps
    artifact locations as absolute paths, so a copied repository would still log into the
    original's mlartifacts/."""
    with contextlib.closing(sqlite3.connect(db)) as store:
        tables = [
            row[0] for row in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        for table in tables:
            for column in store.execute(f"PRAGMA table_info('{table}')").fetchall():
                name, kind = column[1], column[2].upper()
                if kind.startswith(("VARCHAR", "TEXT")):
                    store.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?)',
                        (str(old), str(new)),
                    )
        store.commit()


def test_repro_with_changes_gives_one_complete_run(reproduced):
    repo = reproduced
    (only,) = runs(repo)
    assert_complete(repo, only, repo / "params.yaml")
    assert only.data.tags["git.dirty"] == "false"
    for name in FIGURES:
        assert (repo / "reports" / "figures" / name).stat().st_size > 0
    # The explorer page fetches nothing (tests/test_explorer*.py check it further).
    explorer = (repo / "reports" / "figures" / "latent_explorer.html").read_text()
    assert "http://" not in explorer and "https://" not in explorer
    assert (repo / "reports" / "metrics.json").is_file()
    assert len((repo / "reports" / "train_history.csv").read_text().splitlines()) == 1 + 2


def test_dvc_plots_show_renders_the_pngs(reproduced, tmp_path):
    """Every PNG figure is a plot; latent_explorer.html beside them is not read as one."""
    output = run(reproduced, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert "failed" not in output.lower(), output
    rendered = {p.name for p in (tmp_path / "plots" / "static").iterdir()}
    pngs = [name for name in FIGURES if name.endswith(".png")]
    assert rendered == {f"workspace_reports_figures_{name}" for name in pngs}


def test_repro_with_nothing_changed_adds_no_run(reproduced_copy):
    repo = reproduced_copy
    before = [r.info.run_id for r in runs(repo)]
    output = run(repo, "dvc", "repro")
    assert "already holds this result" in output
    assert [r.info.run_id for r in runs(repo)] == before


def test_only_an_evaluate_param_changed_gives_a_new_complete_run(reproduced_copy):
    repo = reproduced_copy
    (first,) = runs(repo)
    set_param(repo, "evaluate", "seed", 7)
    output = run(repo, "dvc", "repro")
    assert "Stage 'train' didn't change" in output
    first_again, second = runs(repo)
    assert first_again.info.run_id == first.info.run_id
    assert second.data.params["evaluate.seed"] == "7"
    assert second.data.tags["vaelab.source_run_id"] == first.info.run_id
    assert second.data.tags["git.dirty"] == "true"  # params.yaml edited, not committed
    assert_complete(repo, second, repo / "params.yaml")


def test_exp_run_of_params_seen_before_gives_a_complete_run_named_after_it(reproduced_copy):
    repo = reproduced_copy
    (first, *_) = runs(repo)
    run(repo, "dvc", "exp", "run", "-S", "train.seed=5")  # trains a new model ...
    count = len(runs(repo))
    output = run(
        repo,
        "dvc",
        "exp",
        "run",
        "-n",
        "seen-before",
        "-S",
        "train.seed=0",
        "-S",
        "evaluate.seed=0",
    )  # ... and back: train comes from DVC's run cache
    assert "Stage 'train' is cached" in output
    new = runs(repo)[count:]
    assert [r.info.run_name for r in new] == ["seen-before"]
    assert new[0].data.tags["dvc.exp_name"] == "seen-before"
    assert new[0].data.tags["vaelab.source_run_id"] == first.info.run_id
    assert_complete(repo, new[0], repo / "params.yaml")


def test_a_preset_runs_as_a_named_experiment(reproduced_copy):
    """The burda-iwae preset for 2 epochs through `dvc exp run`: list values, strings, ints and
    floats through DVC's -S and back; the Bernoulli path end to end with dynamic binarisation;
    k = 5 IWAE training with the paper's schedule and initialisation; a complete MLflow run with
    the per-epoch learning rate."""
    repo = reproduced_copy
    count = len(runs(repo))
    output = run(
        repo,
        sys.executable,
        "-m",
        "vaelab.presets",
        "--dir",
        "presets",
        "--params",
        "params.yaml",
        "burda-iwae",
        "-S",
        "train.epochs=2",
        "-S",
        "evaluate.iw_samples=10",
    )
    assert "-S 'model.hidden=[200,200]'" in output
    (new,) = runs(repo)[count:]
    assert new.info.run_name == "burda-iwae"
    assert_complete(repo, new, repo / "params.yaml")
    keys = (
        "model.hidden",
        "model.activation",
        "model.latent_dims",
        "model.output_bias",
        "loss.objective",
        "loss.samples",
        "train.batch_size",
        "train.epochs",
        "train.lr_schedule",
        "train.adam_betas",
        "data.source",
        "data.binarize",
        "train.device",
        "evaluate.iw_samples",
    )
    assert {k: new.data.params[k] for k in keys} == {
        "model.hidden": "[200, 200]",
        "model.activation": "tanh",
        "model.latent_dims": "50",
        "model.output_bias": "data_mean",
        "loss.objective": "iwae",
        "loss.samples": "5",
        "train.batch_size": "20",
        "train.epochs": "2",
        "train.lr_schedule": "burda",
        "train.adam_betas": "[0.99, 0.999]",
        "data.source": "custom",
        "data.binarize": "dynamic",
        "train.device": "cpu",  # kept from params.yaml
        "evaluate.iw_samples": "10",
    }
    client = client_for(repo)
    lr = [m.value for m in client.get_metric_history(new.info.run_id, "epoch/train/lr")]
    assert sorted(lr, reverse=True) == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7)])
    loss, neg_elbo = (
        sorted(client.get_metric_history(new.info.run_id, key), key=lambda m: m.step)
        for key in ("epoch/train/loss", "epoch/train/neg_elbo")
    )
    # The IWAE bound is above the ELBO: its loss below the negative ELBO, epoch by epoch.
    assert all(a.value < b.value for a, b in zip(loss, neg_elbo, strict=True))
    # Bernoulli NLL of binary images: positive nats, the IW bound below the negative ELBO.
    assert 0 < new.data.metrics["eval/test_iw/nll"] <= new.data.metrics["eval/test_iw/neg_elbo"]
    saved = torch.load(repo / "models" / "vae.pt", weights_only=True)["config"]
    assert saved == {"latent_dims": 50, "hidden": [200, 200], "arch": "mlp", "activation": "tanh"}


# Code the train stage must not depend on: the registry, the UI link, comparisons, sweeps, and
# what only `record` runs. An edit to any of them must leave train (and a checkpoint) alone.
NOT_TRAINING_CODE = {
    "record": (
        "src/vaelab/record.py",
        "src/vaelab/serving.py",
        "src/vaelab/tracking/models.py",
        "src/vaelab/tracking/record.py",
    ),
    None: (  # commands, not stages: no stage runs them
        "src/vaelab/compare.py",
        "src/vaelab/register.py",
        "src/vaelab/replicates.py",
        "src/vaelab/reproduce.py",
        "src/vaelab/sweep.py",
        "src/vaelab/tracking/comparison.py",
        "src/vaelab/tracking/queries.py",
        "src/vaelab/tracking/registry.py",
        "src/vaelab/tracking/reproduction.py",
        "src/vaelab/tracking/sweeps.py",
        "src/vaelab/tracking/ui.py",
    ),
}


def test_an_edit_re_runs_only_the_stages_whose_code_it_changes(
    reproduced_copy, tiny_params, monkeypatch
):
    """After `dvc repro`, DVC itself is asked (`dvc status`) which stages an edit invalidates:
    one to registry, UI, comparison, sweep or record-only code leaves train up to date and a
    training checkpoint's code fingerprint unchanged; one to the training loop invalidates both;
    one to the explorer page's JavaScript invalidates plot and not train."""
    from vaelab import imports
    from vaelab.checkpoints import training_config

    repo = reproduced_copy
    monkeypatch.setattr(imports, "SOURCE", repo / "src" / "vaelab")  # fingerprint the copy

    def status_after_editing(name: str) -> tuple[dict, dict]:
        """(dvc status --json, the checkpoint's config) with ``name`` edited; then undone."""
        path = repo / name
        original = path.read_bytes()
        comment = b"\n// edited\n" if path.suffix == ".js" else b"\n# edited\n"
        path.write_bytes(original + comment)
        try:
            status = json.loads(run(repo, "dvc", "status", "--json"))
            return status, training_config(tiny_params, torch.device("cpu"))
        finally:
            path.write_bytes(original)

    untouched = training_config(tiny_params, torch.device("cpu"))
    assert json.loads(run(repo, "dvc", "status", "--json")).keys() <= {"record"}
    for stage, names in NOT_TRAINING_CODE.items():
        for name in names:
            status, fingerprint = status_after_editing(name)
            assert "train" not in status, (name, status)
            assert fingerprint == untouched, name
            changed = {s for s in status if s != "record"}  # record always runs
            assert changed == set(), (name, status)
            if stage == "record":  # ["always changed", {"changed deps": {...}}]
                deps = [e["changed deps"] for e in status["record"] if isinstance(e, dict)]
                assert deps == [{name: "modified"}], (name, status)

    status, fingerprint = status_after_editing("src/vaelab/training.py")
    assert status["train"] == [{"changed deps": {"src/vaelab/training.py": "modified"}}]
    assert fingerprint != untouched
    status, fingerprint = status_after_editing("src/vaelab/explorer/explorer.js")
    assert "train" not in status and fingerprint == untouched
    assert status["plot"] == [{"changed deps": {"src/vaelab/explorer/explorer.js": "modified"}}]
