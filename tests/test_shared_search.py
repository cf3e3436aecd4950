"""`make search` end to end, as a team runs it (docs/search.md, docs/scale.md): two clones of one
repository run the search command at the same time against one PostgreSQL study storage and one
tracking server (the session's: PostgreSQL runs, S3 artifacts), on fake MNIST through DVC and
MLflow. They make one study and one parent run, run the trial budget between them and no trial
twice; a hopeless trial is pruned at its first epoch and leaves nothing behind. Then, on the same
server, `make register` names the best trial's model champion, which loads without vaelab, and
`make reproduce` of that trial comes out identical.

(Those two use the search's MLflow experiment rather than the one test_remote_tracking.py and
the browser tests fill: a registered version and a reproduction run would change what the UI
shows of that one.)

The two "machines" are two clones on this one; each runs its trials as DVC experiments of its own
workspace, and sees the other only through PostgreSQL and the tracking server. (The search's own
default storage, a journal file, is what tests/test_search.py's processes share.)"""

from __future__ import annotations

import io
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from tests import test_tracking
from tests.conftest import PROJECT
from tests.test_pipeline import _env, make_repo, run, set_param
from tests.tracking_server import TrackingServer, pipeline
from vaelab import search_study
from vaelab.model import load
from vaelab.tracking.reproduction import REPRODUCED_BY_TAG, VERDICT_TAG

# The session's tracking server and PostgreSQL: one worker under `make test` (loadgroup).
pytestmark = pytest.mark.xdist_group("tracking_server")

SEARCH = "shared"
MLFLOW_EXPERIMENT = "vaelab-shared-search"  # not "vaelab": other tests count that one's runs
SEARCH_FILE = """\
params:
  train.lr: {low: 0.000001, high: 0.01, log: true}
  model.latent_dims: {choices: [2, 3]}
trials: 3
jobs: 1
pruner: {name: median, startup_trials: 1}
# Epochs of a few tenths of a second (a wider net), so that "within one epoch" means more than
# the time a look at MLflow takes.
train.epochs: 20
model.hidden: [1024, 1024]
evaluate.iw_samples: 4
"""
# Queued in the study beforehand, so the test knows them: two that finish, then a learning rate
# 1000 times smaller, pruned at its first epoch against the first to finish. (With this net 0.02
# collapses to a constant -ELBO, worse than 0.0001: a test of pruning needs a trial that is
# worse throughout.)
QUEUED = ((0.001, 3), (0.002, 2), (0.000001, 3))


def search(clone: Path, storage: str, server: TrackingServer) -> subprocess.Popen:
    """`make search SEARCH=searches/shared.yaml STORAGE=<storage>`'s command, started; its
    output goes to <clone>.log beside the clone."""
    command = [sys.executable, "-m", "vaelab.search", "--search", f"searches/{SEARCH}.yaml"]
    command += ["--params", "params.yaml", "--pipeline", "dvc.yaml", "--state", ".search"]
    command += ["--report", "reports/search.md", "--figures", "reports/search"]
    command += ["--storage", storage]
    env = _env(clone) | {"MLFLOW_TRACKING_URI": server.url}
    with (clone.parent / f"{clone.name}.log").open("w") as log:
        return subprocess.Popen(command, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)


def clones(root: Path) -> tuple[Path, Path]:
    """Clone a, which commits the search file and pushes to a bare "origin", and clone b of it."""
    origin = root / "origin.git"
    run(root, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    a = make_repo(root / "a")
    set_param(a, "mlflow", "experiment", MLFLOW_EXPERIMENT)
    (a / "searches" / f"{SEARCH}.yaml").write_text(SEARCH_FILE)
    run(a, "git", "add", "-A")
    run(a, "git", "commit", "-qm", "a search shared by two machines")
    run(a, "git", "remote", "add", "origin", str(origin))
    run(a, "git", "push", "-q", "origin", "main")
    run(root, "git", "clone", "-q", str(origin), str(root / "b"))
    return a, root / "b"


def runs_of(server: TrackingServer) -> list[tuple[dict, dict]]:
    """(run, its tags) of every run in the search's MLflow experiment, from the REST API."""
    experiment = server.get("experiments/get-by-name", experiment_name=MLFLOW_EXPERIMENT)
    found = server.post(
        "runs/search", {"experiment_ids": [experiment["experiment"]["experiment_id"]]}
    )["runs"]
    return [(r, {t["key"]: t["value"] for t in r["data"]["tags"]}) for r in found]


@dataclass(frozen=True)
class Searched:
    """The two clones after their search, the study's storage URL and each clone's output."""

    a: Path
    b: Path
    storage: str
    logs: dict[str, str]  # clone name -> the search command's output


@pytest.fixture(scope="module")
def searched(tracking_server: TrackingServer, postgres, tmp_path_factory) -> Searched:
    """Two clones that ran the search at once: the trials queued in a PostgreSQL study first,
    then both commands started together and waited for. Read it, never change it."""
    root = tmp_path_factory.mktemp("shared-search")
    a, b = clones(root)
    storage = postgres.create_database("optuna_shared")
    study = optuna.create_study(study_name=SEARCH, storage=storage)
    for lr, latent in QUEUED:
        study.enqueue_trial({"train.lr": lr, "model.latent_dims": latent})

    processes = {clone: search(clone, storage, tracking_server) for clone in (a, b)}
    try:
        for process in processes.values():
            process.wait(timeout=900)
    finally:
        for process in processes.values():
            process.kill()
    logs = {c.name: (root / f"{c.name}.log").read_text() for c in processes}
    for clone, process in processes.items():
        assert process.returncode == 0, f"clone {clone.name}:\n{logs[clone.name]}"
    return Searched(a, b, storage, logs)


def test_two_machines_share_one_study_one_parent_and_the_budget_and_prune(
    searched: Searched, tracking_server: TrackingServer
):
    a, b, storage, logs = searched.a, searched.b, searched.storage, searched.logs
    # One study in the storage, its budget run once: 2 COMPLETE, the third PRUNED at epoch 1.
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [SEARCH]
    study = optuna.load_study(study_name=SEARCH, storage=storage)
    counted = search_study.counted(study.trials)
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED], logs
    assert counted[2].user_attrs[search_study.PRUNED_ATTR] == 1
    assert "search: trial 2 pruned at epoch 1 (" in logs["a"] + logs["b"], logs
    owners = {t.user_attrs[search_study.OWNER_ATTR] for t in counted}
    assert len(owners) == 2, f"one machine ran every trial: the test shows nothing\n{logs}"
    numbers = {t.number for t in counted}
    for t in study.trials:  # a trial asked after the budget was taken is never launched
        if t.number not in numbers:
            assert search_study.EXPERIMENT_ATTR not in t.user_attrs, t.user_attrs

    # DVC: the two finished trials are experiments, each of one clone only; nothing is left of
    # the pruned one in either clone (experiments, refs, temporary copies, queue, workspace).
    listed = {c: set(run(c, "dvc", "exp", "list", "--name-only").split()) for c in (a, b)}
    assert not listed[a] & listed[b] and listed[a] | listed[b] == {f"{SEARCH}-0", f"{SEARCH}-1"}
    trained = set()
    for clone in (a, b):
        refs = run(clone, "git", "for-each-ref", "--format=%(refname)", "refs/exps")
        assert f"{SEARCH}-2" not in refs and "celery" not in refs
        copies = clone / ".dvc" / "tmp" / "exps" / "standalone"
        if copies.exists():
            assert [p.name for p in copies.iterdir() if p.name.startswith("tmp")] == []
        assert "No experiment tasks in the queue" in run(clone, "dvc", "queue", "status")
        assert run(clone, "git", "status", "--porcelain", "--untracked-files=no") == ""
        assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["epochs"] == 2
        # DVC's run cache: the train stage of each finished trial, none of the pruned one.
        for entry in (clone / ".dvc" / "cache" / "runs").glob("*/*/*"):
            stage = yaml.safe_load(entry.read_text())
            if "vaelab.train" in stage["cmd"]:
                trained.add(stage["params"]["params.yaml"]["train"]["lr"])
    assert trained == {0.001, 0.002}

    # MLflow: one parent run on the server, FINISHED, naming the best trial; the trials its
    # children, the finished ones FINISHED with the study's values, the pruned one KILLED
    # within an epoch of what the search had seen; no other run.
    found = runs_of(tracking_server)
    parents = [(r, tags) for r, tags in found if tags.get("vaelab.kind") == "search"]
    assert len(parents) == 1, [tags.get("vaelab.kind") for _, tags in found]
    ((parent, parent_tags),) = parents
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == SEARCH
    best = min(counted[:2], key=lambda t: t.value)
    assert parent_tags["vaelab.best_trial"] == str(best.number)
    children = {
        int(tags["vaelab.trial"]): (r, tags)
        for r, tags in found
        if tags.get("mlflow.parentRunId") == parent["info"]["run_id"]
    }
    assert sorted(children) == [0, 1, 2] and len(found) == 4
    for number in (0, 1):
        child, tags = children[number]
        assert child["info"]["status"] == "FINISHED"
        assert child["info"]["run_name"] == tags["dvc.exp_name"] == f"{SEARCH}-{number}"
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert metrics["eval/val_iw/nll"] == counted[number].value
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert float(params["train.lr"]) == counted[number].params["train.lr"]
    stopped, tags = children[2]
    assert stopped["info"]["status"] == "KILLED" and tags["vaelab.pruned"] == "1"
    history = tracking_server.get(
        "metrics/get-history", run_id=stopped["info"]["run_id"], metric_key="epoch/val/neg_elbo"
    )
    seen = int(tags["vaelab.pruned_seen"])
    assert max(m["step"] for m in history["metrics"]) <= seen + 1 < 20

    # The report of each clone (the last to finish has every trial), also in the parent run.
    reports = [(c / "reports" / "search.md").read_text() for c in (a, b)]
    assert any("3 trials (2 complete, 1 pruned, 0 failed)" in r for r in reports), reports
    line = f"Best trial: {best.number}, eval/val_iw/nll = {best.value:.4f}"
    assert all(line in r for r in reports if "3 trials" in r)
    listed = tracking_server.get("artifacts/list", run_id=parent["info"]["run_id"], path="search")
    logged = {entry["path"] for entry in listed.get("files", [])}
    assert {"search/search.md", "search/running_best.png", "search/pruned_curves.png"} <= logged


def trial_runs(server: TrackingServer) -> dict[int, tuple[dict, dict]]:
    """{trial number: (run, tags)} of the search's FINISHED trials on the server."""
    return {
        int(tags["vaelab.trial"]): (r, tags)
        for r, tags in runs_of(server)
        if "vaelab.trial" in tags and r["info"]["status"] == "FINISHED"
    }


def weights_of(server: TrackingServer, run: dict) -> bytes:
    """The run's model/vae.pt as the bucket holds it."""
    return server.s3.read(server.artifact_prefix(run) + "model/vae.pt")


def bare_venv(folder: Path) -> Path:
    """A new venv, without pip and without vaelab; returns its python. It finds the packages of
    this environment (mlflow, torch, numpy: installing them again would take minutes) through a
    path in a .pth file, and Python runs no .pth file of a folder added that way, so the
    editable install of vaelab (a .pth file there) is not seen."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (site,) = (folder / "lib").glob("python*/site-packages")
    (site / "packages_of_the_test_environment.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    return folder / "bin" / "python"


def test_make_register_names_the_best_trial_champion_and_it_loads_without_vaelab(
    searched: Searched, tracking_server: TrackingServer, tmp_path
):
    """`make register` against the server, then `models:/vaelab-vae@champion` loaded in a bare
    venv where vaelab cannot be imported, with only MLFLOW_TRACKING_URI set (no S3 endpoint or
    credentials: the model comes through the server's proxy)."""
    server, repo = tracking_server, searched.a
    done = pipeline(
        repo, server, sys.executable, "-m", "vaelab.register", "--params", "params.yaml"
    )
    assert "models:/vaelab-vae@champion -> version" in done, done
    alias = server.get("registered-models/alias", name="vaelab-vae", alias="champion")
    champion = alias["model_version"]["run_id"]
    # Independently of vaelab's ranking: the finished trial with the lowest value in the study.
    trials = trial_runs(server)
    study = optuna.load_study(study_name=SEARCH, storage=searched.storage)
    best = min((t for t in study.trials if t.number in trials), key=lambda t: t.value)
    champion_run, _ = trials[best.number]
    assert champion == champion_run["info"]["run_id"]

    env = {k: v for k, v in _env(repo).items() if not k.startswith("AWS_")}
    env["MLFLOW_TRACKING_URI"] = server.url
    script = test_tracking.LOAD_WITHOUT_VAELAB  # it also checks that vaelab is not importable
    python = bare_venv(tmp_path / "bare")
    loaded = subprocess.run(
        [str(python), "-c", script, "models:/vaelab-vae@champion", "5", str(PROJECT / "src")],
        env=env,
        cwd=repo,
        capture_output=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr.decode()[-3000:]
    predicted = np.load(io.BytesIO(loaded.stdout))
    (tmp_path / "vae.pt").write_bytes(weights_of(server, champion_run))
    pixels = np.random.default_rng(0).random((5, 784), dtype=np.float32)
    with torch.inference_mode():
        model = load(tmp_path / "vae.pt")
        expected = model.encode(torch.from_numpy(pixels).view(-1, 1, 28, 28))[0]
    assert predicted.shape == (5, best.params["model.latent_dims"])
    np.testing.assert_allclose(predicted, expected.numpy(), atol=1e-5, rtol=0)


def test_make_reproduce_of_a_trial_on_the_server_comes_out_identical(
    searched: Searched, tracking_server: TrackingServer, tmp_path
):
    """`make reproduce RUN=<id>` of a finished trial, in the clone that ran it (its DVC
    experiment is there): a clone trains it again and logs the reproduction to the server;
    checked here from the bucket and the REST API."""
    server = tracking_server
    number, (original, tags) = min(trial_runs(server).items())
    ran_it = next(c for c in (searched.a, searched.b) if tags["dvc.exp_name"] in
                  run(c, "dvc", "exp", "list", "--name-only").split())  # fmt: skip
    run_id = original["info"]["run_id"]
    env = _env(ran_it) | {"MLFLOW_TRACKING_URI": server.url, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "vaelab.reproduce", "--params", "params.yaml", run_id],
        cwd=ran_it, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reproduce: identical:" in done.stdout, done.stdout
    assert list(tmp_path.glob("vaelab-reproduce-*")) == []  # the clone is gone
    after = server.get("runs/get", run_id=run_id)["run"]
    after_tags = {t["key"]: t["value"] for t in after["data"]["tags"]}
    assert after_tags[VERDICT_TAG] == "identical"
    again = server.get("runs/get", run_id=after_tags[REPRODUCED_BY_TAG])["run"]
    assert again["info"]["status"] == "FINISHED"
    # Identical, seen independently: the same weights bytes in the bucket, every metric that is
    # a result (not a timing) equal at every step.
    assert weights_of(server, original) == weights_of(server, again)
    timings = {"epoch_seconds", "images_per_second"}  # how long, not what was learnt
    keys = {m["key"] for m in original["data"]["metrics"]} - timings
    assert {"eval/val_iw/nll", "epoch/val/neg_elbo"} <= keys
    for key in sorted(keys):
        histories = [
            sorted(
                (m["step"], m["value"])
                for m in server.get("metrics/get-history", run_id=r, metric_key=key)["metrics"]
            )
            for r in (run_id, again["info"]["run_id"])
        ]
        assert histories[0] == histories[1] != [], (number, key)
