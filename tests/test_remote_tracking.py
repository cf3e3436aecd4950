"""The pipeline against a real remote tracking server as a team runs it (``mlflow server``, its
runs in PostgreSQL, artifacts proxied to an S3 bucket), read back over the REST API with urllib
only, as any client of the server would, and from the database and the bucket themselves.

The server and its two runs (`dvc repro`, then `dvc exp run -n eval-seed-1 -S evaluate.seed=1`)
are the session fixtures ``tracking_server`` and ``filled_server`` (conftest.py,
tests/tracking_server.py), shared with test_ui_browser.py.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.test_pipeline import EVAL_METRICS, EXPERIMENT
from tests.tracking_server import ARTIFACTS_PREFIX
from vaelab import params as params_mod
from vaelab.files import md5_of
from vaelab.history import metrics as history_metrics
from vaelab.plot import FIGURES
from vaelab.tracking import ui
from vaelab.tracking.models import MODEL_TAG
from vaelab.tracking.store import connect

# Under `pytest -n 2 --dist loadgroup` (make test) the tests of the shared tracking server run in
# one worker, which starts it once.
pytestmark = pytest.mark.xdist_group("tracking_server")


def _artifact_files(store, run: dict, folder: str) -> dict[str, int]:
    """{path: size} of the run's artifacts in ``folder``, as the server lists them."""
    listed = store.server.get("artifacts/list", run_id=run["info"]["run_id"], path=folder)
    return {entry["path"]: entry["file_size"] for entry in listed.get("files", [])}


def test_the_experiment_is_created_with_the_servers_artifact_root(filled_server):
    found = filled_server.server.get("experiments/get-by-name", experiment_name=EXPERIMENT)
    experiment = found["experiment"]
    # Not the repository's mlartifacts/: the local-store artifact root is only for sqlite.
    assert experiment["artifact_location"] == f"mlflow-artifacts:/{experiment['experiment_id']}"
    assert experiment["lifecycle_stage"] == "active"


def test_two_finished_runs_with_every_param(filled_server):
    runs = filled_server.runs
    assert [r["info"]["status"] for r in runs] == ["FINISHED", "FINISHED"], runs
    first, second = runs
    assert second["info"]["run_name"] == "eval-seed-1"
    tags = {t["key"]: t["value"] for t in second["data"]["tags"]}
    # Train was skipped for the second run, so record rebuilt it from the DVC outputs.
    assert tags["dvc.exp_name"] == "eval-seed-1"
    assert tags["vaelab.source_run_id"] == first["info"]["run_id"]
    for run, params_file in zip(runs, filled_server.params_files, strict=True):
        expected = {k: str(v) for k, v in params_mod.flatten(params_mod.load(params_file)).items()}
        got = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        assert len(got) == len(expected)
        assert got == expected
    seeds = [{p["key"]: p["value"] for p in r["data"]["params"]}["evaluate.seed"] for r in runs]
    assert seeds == ["0", "1"]


def test_each_run_has_one_value_per_epoch_and_the_eval_metrics(filled_server):
    server = filled_server.server
    for run, params_file in zip(filled_server.runs, filled_server.params_files, strict=True):
        run_id = run["info"]["run_id"]
        epochs = params_mod.load(params_file).train.epochs
        for key in history_metrics("val"):  # the tiny params hold a validation split out
            history = server.get("metrics/get-history", run_id=run_id, metric_key=key)
            steps = sorted(m["step"] for m in history.get("metrics", []))
            assert steps == list(range(1, epochs + 1)), (run_id, key, steps)
        latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        missing = [key for key in EVAL_METRICS if key not in latest]
        assert not missing, missing
        assert latest["eval/test/neg_elbo"] > 0


def test_artifacts_are_objects_in_the_bucket(filled_server):
    s3 = filled_server.server.s3
    for run in filled_server.runs:
        prefix = filled_server.server.artifact_prefix(run)
        figures = _artifact_files(filled_server, run, "figures")
        assert set(figures) == {f"figures/{name}" for name in FIGURES}
        model = _artifact_files(filled_server, run, "model")
        assert list(model) == ["model/vae.pt"]
        objects = s3.keys(prefix)
        for path, size in (figures | model).items():
            assert objects.get(prefix + path) == size > 0, (path, sorted(objects))
    # The latest run's files are the bytes the workspace holds now (`dvc exp run` applied them).
    prefix = filled_server.server.artifact_prefix(filled_server.runs[-1])
    repo = filled_server.repo
    pairs = [("model/vae.pt", repo / "models" / "vae.pt")]
    pairs += [(f"figures/{name}", repo / "reports" / "figures" / name) for name in FIGURES]
    for key, local in pairs:
        assert hashlib.md5(s3.read(prefix + key)).hexdigest() == md5_of(local), key


def test_the_logged_models_are_in_the_bucket_too(filled_server):
    """The MLflow model `record` logs (MLflow 3: a logged model with artifacts of its own,
    mlflow-artifacts:/<experiment>/models/<model id>/artifacts) goes to the bucket as well."""
    s3 = filled_server.server.s3
    for run in filled_server.runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        model_id = tags[MODEL_TAG].removeprefix("models:/")
        prefix = f"{ARTIFACTS_PREFIX}/{filled_server.experiment_id}/models/{model_id}/artifacts/"
        objects = s3.keys(prefix)
        assert prefix + "MLmodel" in objects and prefix + "artifacts/vae.pt" in objects, objects


def test_nothing_is_written_to_the_repositorys_own_store(filled_server):
    repo = filled_server.repo
    for name in ("mlflow.db", "mlflow.db.lock", "mlartifacts", "mlruns"):
        assert not (repo / name).exists(), name


def test_the_runs_are_rows_of_the_postgresql_database(filled_server, postgres):
    """The server's runs, params and per-epoch metrics are in PostgreSQL (read with psql's
    driver, not through MLflow)."""
    ids = [run["info"]["run_id"] for run in filled_server.runs]
    rows = postgres.query("mlflow", "SELECT run_uuid, status FROM runs")
    assert {run_id: "FINISHED" for run_id in ids}.items() <= dict(rows).items()
    for run, params_file in zip(filled_server.runs, filled_server.params_files, strict=True):
        run_id = run["info"]["run_id"]
        (count,) = postgres.query(
            "mlflow", f"SELECT count(*) FROM params WHERE run_uuid = '{run_id}'"
        )[0]
        assert count == len(params_mod.flatten(params_mod.load(params_file)))
        steps = postgres.query(
            "mlflow",
            f"SELECT step FROM metrics WHERE run_uuid = '{run_id}' AND key = 'epoch/val/neg_elbo'"
            " ORDER BY step",
        )
        epochs = params_mod.load(params_file).train.epochs
        assert [step for (step,) in steps] == list(range(1, epochs + 1))


def test_an_experiment_created_meanwhile_by_another_process_is_used(tracking_server, monkeypatch):
    """Two queued experiments starting at once on a fresh server both find no experiment and
    both create it; the loser must use the winner's, not fail (the SQLite lock does not apply)."""
    from mlflow.tracking import MlflowClient

    name = "created-meanwhile"
    created = tracking_server.post("experiments/create", {"name": name})["experiment_id"]
    lookup = MlflowClient.get_experiment_by_name
    calls = []

    def not_there_yet(self, experiment_name):  # the first lookup misses it
        calls.append(experiment_name)
        return None if len(calls) == 1 else lookup(self, experiment_name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", not_there_yet)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    _, experiment_id = connect(name)
    assert experiment_id == created
    assert calls == [name, name]


def test_make_ui_serves_the_local_store_when_the_uri_is_a_server(tmp_path, monkeypatch, capsys):
    """`mlflow ui --backend-store-uri http://...` fails with a traceback; `make ui` serves the
    project's mlflow.db instead and says where the server's runs are."""
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    executed = []

    def exec_instead(path, argv):  # stands in for os.execv
        executed.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(ui.os, "execv", exec_instead)
    with pytest.raises(SystemExit):
        ui.main(["--port", "5998"])
    (argv,) = executed
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "tracking server http://127.0.0.1:5999" in capsys.readouterr().out


def test_make_ui_links_the_experiment_s_runs_in_the_model_training_view(tmp_path, tiny_params):
    """The UI opens in its GenAI view; the link `make ui` prints opens the experiment's runs
    with workflowType=machine_learning (read from the page's address by the UI's bundle)."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    assert ui.ui_link("http://127.0.0.1:5000", uri, "vaelab") == (
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    )
    assert not (tmp_path / "store.db").exists(), "printing a link creates no store"
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(tracking_uri=uri).create_experiment("vaelab")
    assert ui.ui_link("http://127.0.0.1:5000", uri, "vaelab") == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )
