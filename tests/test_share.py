"""Sharing a result across machines (docs/scale.md#share-results), offline, as a team does it: a
bare git repository stands for the team's git server, a DVC remote on the session's S3 bucket
(dvc-s3, the endpoint in the repository's .dvc/config, each clone's credentials in its own
.dvc/config.local), and the session's tracking server (PostgreSQL, S3 artifacts).

Clone A runs `dvc exp run -n shared-exp` and `dvc exp push origin shared-exp`; another clone gets
it with `dvc exp pull origin shared-exp`, `dvc exp apply shared-exp` and `dvc pull`. Then
`dvc repro` there does not train again, and `record` makes one complete run in that clone's own
MLflow store, or finds A's run on a tracking server both use (no duplicate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.services import S3_CREDENTIALS
from tests.test_pipeline import assert_complete, client_for, make_repo, run, set_param
from tests.tracking_server import TrackingServer, pipeline

# Under `pytest -n 2 --dist loadgroup` (make test) these tests run in one worker, which builds
# their shared fixtures once.
pytestmark = pytest.mark.xdist_group("tracking_server")

EXP_NAME = "shared-exp"
# Not "vaelab": test_remote_tracking.py and test_ui_browser.py count the runs of that experiment
# on the same session server.
MLFLOW_EXPERIMENT = "vaelab-share"
DVC_PREFIX = "dvc"  # the DVC remote: s3://<bucket>/dvc (the tracking server's artifacts: mlflow/)


@dataclass(frozen=True)
class Pushed:
    a: Path  # clone A, its workspace holding the experiment's result
    origin: Path  # the bare git repository both clones use


@pytest.fixture(scope="module")
def pushed(tracking_server: TrackingServer, tmp_path_factory) -> Pushed:
    """Clone A after `dvc exp run -n shared-exp -S train.seed=3`, logged to the tracking server,
    and `dvc exp push`: the experiment's git ref is in a bare repository ("origin"), its outputs
    in the S3 DVC remote. Read it, never change it."""
    root = tmp_path_factory.mktemp("share")
    origin = root / "origin.git"
    s3 = tracking_server.s3
    run(root, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    a = make_repo(root / "a")
    set_param(a, "mlflow", "experiment", MLFLOW_EXPERIMENT)
    run(a, "dvc", "remote", "add", "-d", "store", f"s3://{s3.bucket}/{DVC_PREFIX}")
    run(a, "dvc", "remote", "modify", "store", "endpointurl", s3.endpoint)
    s3_credentials(a)
    run(a, "git", "commit", "-qam", "DVC remote; MLflow experiment of this test")
    run(a, "git", "remote", "add", "origin", str(origin))
    run(a, "git", "push", "-q", "origin", "main")
    pipeline(a, tracking_server, "dvc", "exp", "run", "-n", EXP_NAME, "-S", "train.seed=3")
    # Also pushes the experiment's cached outputs to the default DVC remote (--no-cache would
    # not): no `dvc push` is needed, and no --rev / -A for an experiment of HEAD named here.
    output = run(a, "dvc", "exp", "push", "origin", EXP_NAME)
    assert f"Pushed experiment {EXP_NAME}" in output
    return Pushed(a, origin)


def s3_credentials(clone: Path) -> None:
    """The clone's S3 credentials, in .dvc/config.local (never committed), as each team member
    keeps their own."""
    for option in ("access_key_id", "secret_access_key"):
        value = S3_CREDENTIALS[f"AWS_{option.upper()}"]
        run(clone, "dvc", "remote", "modify", "--local", "store", option, value)


def get_experiment(origin: Path, clone: Path) -> Path:
    """A fresh clone of ``origin`` with the pushed experiment applied and its outputs in place."""
    run(origin.parent, "git", "clone", "-q", str(origin), str(clone))
    s3_credentials(clone)
    run(clone, "dvc", "exp", "pull", "origin", EXP_NAME)  # also fetches the outputs' cache
    run(clone, "dvc", "exp", "apply", EXP_NAME)  # params.yaml, dvc.lock, outputs of the exp
    run(clone, "dvc", "pull")  # here "Everything is up to date"; needed after --no-cache
    return clone


def test_the_pushed_outputs_are_objects_in_the_bucket(pushed, tracking_server: TrackingServer):
    """What `dvc exp push` sent: every output of the experiment (dvc.lock's md5s) is an object
    of the DVC remote's folder in the bucket (DVC 3's layout: files/md5/<2>/<rest>)."""
    lock = yaml.safe_load((pushed.a / "dvc.lock").read_text())
    pipeline_file = yaml.safe_load((pushed.a / "dvc.yaml").read_text())
    in_git = {  # outputs declared cache: false (reports/metrics.json) travel by git instead
        path
        for stage in pipeline_file["stages"].values()
        for entry in stage.get("metrics", []) + stage.get("outs", [])
        if isinstance(entry, dict)
        for path, options in entry.items()
        if options.get("cache") is False
    }
    md5s = {
        out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] not in in_git
    }
    assert len(md5s) >= 4, lock
    stored = tracking_server.s3.keys(f"{DVC_PREFIX}/files/md5/")
    names = {key.removeprefix(f"{DVC_PREFIX}/files/md5/").replace("/", "") for key in stored}
    assert md5s <= names, sorted(md5s - names)


def train_run_id(repo: Path) -> str:
    return json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"]


def test_a_pulled_experiment_is_not_retrained_and_gets_a_run_in_the_clones_store(pushed, tmp_path):
    a = pushed.a
    b = get_experiment(pushed.origin, tmp_path / "b")
    assert (b / "params.yaml").read_text() == (a / "params.yaml").read_text()

    output = run(b, "dvc", "repro")
    assert "Stage 'train' didn't change" in output, output
    assert "Running stage 'train'" not in output
    assert (b / "models" / "vae.pt").read_bytes() == (a / "models" / "vae.pt").read_bytes()

    client = client_for(b)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    (only,) = client.search_runs([experiment.experiment_id])
    # Rebuilt from the pulled outputs: A's train run is in another store.
    assert only.data.tags["vaelab.source_run_id"] == train_run_id(a)
    assert only.data.params["train.seed"] == "3"
    assert_complete(b, only, a / "params.yaml")  # every param equal to the experiment's


def test_a_shared_tracking_server_keeps_one_run_for_the_experiment(
    pushed, tracking_server: TrackingServer, tmp_path
):
    a = pushed.a
    b = get_experiment(pushed.origin, tmp_path / "b")

    output = pipeline(b, tracking_server, "dvc", "repro")
    assert "Running stage 'train'" not in output
    assert "already holds this result" in output, output

    experiment = tracking_server.get("experiments/get-by-name", experiment_name=MLFLOW_EXPERIMENT)
    found = tracking_server.post(
        "runs/search", {"experiment_ids": [experiment["experiment"]["experiment_id"]]}
    )
    (only,) = found["runs"]
    # A's train run, completed by A's record: FINISHED and fingerprinted (the tag set last).
    assert only["info"]["run_id"] == train_run_id(a)
    assert only["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in only["data"]["tags"]}
    assert tags["dvc.exp_name"] == EXP_NAME and tags["vaelab.fingerprint"]
    assert not (b / "mlflow.db").exists()
