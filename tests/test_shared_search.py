"""A search shared by two machines (docs/search.md, docs/scale.md), as a team runs it: two clones
of one repository run `make search` at the same time against one PostgreSQL study storage and
one tracking server (the session's: PostgreSQL runs, S3 artifacts). They make one study and one
parent run, run the trial budget between them and no trial twice.

The two "machines" are two clones on this one; each runs its trials as DVC experiments of its
own workspace, and sees the other only through PostgreSQL and the tracking server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.test_pipeline import _env, make_repo, run, set_param
from tests.tracking_server import TrackingServer
from vaelab import search_study

# The session's tracking server and PostgreSQL: one worker under `make test` (loadgroup).
pytestmark = pytest.mark.xdist_group("tracking_server")

SEARCH = "shared"
TRIALS = 3
MLFLOW_EXPERIMENT = "vaelab-shared-search"  # not "vaelab": other tests count that one's runs
SEARCH_FILE = f"""\
params:
  train.lr: {{low: 0.0005, high: 0.005, log: true}}
  model.latent_dims: {{choices: [2, 3]}}
trials: {TRIALS}
jobs: 1
pruner: none
confirm: {{top: 0}}
train.epochs: 1
evaluate.iw_samples: 4
"""


def search(clone: Path, storage: str, server: TrackingServer) -> subprocess.Popen:
    """`make search SEARCH=searches/shared.yaml STORAGE=<storage>`'s command, started."""
    command = [sys.executable, "-m", "vaelab.search", "--search", f"searches/{SEARCH}.yaml"]
    command += ["--params", "params.yaml", "--pipeline", "dvc.yaml", "--state", ".search"]
    command += ["--report", "reports/search.md", "--figures", "reports/search"]
    command += ["--storage", storage]
    env = _env(clone) | {"MLFLOW_TRACKING_URI": server.url}
    log = (clone.parent / f"{clone.name}.log").open("w")
    return subprocess.Popen(
        command, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def test_two_machines_share_one_study_one_parent_and_the_budget(
    tracking_server: TrackingServer, postgres, tmp_path
):
    origin = tmp_path / "origin.git"
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    a = make_repo(tmp_path / "a")
    set_param(a, "mlflow", "experiment", MLFLOW_EXPERIMENT)
    (a / "searches" / f"{SEARCH}.yaml").write_text(SEARCH_FILE)
    run(a, "git", "add", "-A")
    run(a, "git", "commit", "-qm", "a search shared by two machines")
    run(a, "git", "remote", "add", "origin", str(origin))
    run(a, "git", "push", "-q", "origin", "main")
    b = tmp_path / "b"
    run(tmp_path, "git", "clone", "-q", str(origin), str(b))
    storage = postgres.create_database("optuna_shared")

    processes = {clone.name: search(clone, storage, tracking_server) for clone in (a, b)}
    try:
        for process in processes.values():
            process.wait(timeout=900)
    finally:
        for process in processes.values():
            process.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in processes}
    for name, process in processes.items():
        assert process.returncode == 0, f"clone {name}:\n{logs[name]}"

    # One study in the storage, its budget run once: every counted trial COMPLETE.
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [SEARCH]
    study = optuna.load_study(study_name=SEARCH, storage=storage)
    counted = search_study.counted(study.trials)
    assert len(counted) == TRIALS and all(t.state == TrialState.COMPLETE for t in counted)
    owners = {t.user_attrs[search_study.OWNER_ATTR] for t in counted}
    assert len(owners) == 2, f"one machine ran every trial: the test shows nothing\n{logs}"
    # Each trial's experiment ran in one clone only: the clones' DVC experiments are disjoint
    # and together the counted trials' (none launched for a withdrawn trial).
    names = {t.user_attrs[search_study.EXPERIMENT_ATTR] for t in counted}
    assert names == {f"{SEARCH}-{t.number}" for t in counted}
    listed = {c: set(run(c, "dvc", "exp", "list", "--name-only").split()) for c in (a, b)}
    assert listed[a] and listed[b] and not listed[a] & listed[b], listed
    assert listed[a] | listed[b] == names
    numbers = {t.number for t in counted}
    for t in study.trials:
        if t.number not in numbers:
            assert search_study.EXPERIMENT_ATTR not in t.user_attrs, t.user_attrs

    # One parent run on the server, FINISHED, with the trials as its FINISHED children.
    experiment = tracking_server.get("experiments/get-by-name", experiment_name=MLFLOW_EXPERIMENT)
    found = tracking_server.post(
        "runs/search", {"experiment_ids": [experiment["experiment"]["experiment_id"]]}
    )["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in found]
    parents = [r for r, t in zip(found, tags, strict=True) if t.get("vaelab.kind") == "search"]
    assert len(parents) == 1, [t.get("vaelab.kind") for t in tags]
    (parent,) = parents
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == SEARCH
    children = {
        int(t["vaelab.trial"]): r
        for r, t in zip(found, tags, strict=True)
        if t.get("mlflow.parentRunId") == parent["info"]["run_id"]
    }
    assert sorted(children) == sorted(t.number for t in counted)
    assert len(found) == 1 + TRIALS  # nothing else: no trial logged twice
    for t in counted:
        child = children[t.number]
        assert child["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert metrics["eval/val_iw/nll"] == t.value
