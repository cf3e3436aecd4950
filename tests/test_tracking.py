"""record on its own: when it completes, rebuilds or leaves a run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PROJECT
from vaelab import params as params_mod
from vaelab.history import METRICS as HISTORY_METRICS
from vaelab.history import columns as history_columns
from vaelab.model import VAE, load, save
from vaelab.tracking.models import MODEL_TAG
from vaelab.tracking.record import FINGERPRINT_TAG, SOURCE_RUN_TAG, PipelineOutputs, record
from vaelab.tracking.run import EARLIER_TAG, training_run
from vaelab.tracking.sweeps import start_sweep
from vaelab.tracking.tags import changed_params, dataset_inputs


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private SQLite store; DVC variables cleared as outside a DVC run."""
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")


def _outputs(tmp_path, params, checksums, run_id) -> PipelineOutputs:
    folder = tmp_path / "outputs"
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    outputs = PipelineOutputs(
        params_file=folder / "params.yaml",
        run_info=folder / "run.json",
        checksums=folder / "checksums.json",
        history=folder / "history.csv",
        metrics=folder / "metrics.json",
        figures=folder / "figures",
        model=folder / "vae.pt",
    )
    outputs.params_file.write_text("placeholder: the params object is passed directly\n")
    outputs.run_info.write_text(json.dumps({"run_id": run_id}))
    outputs.checksums.write_text(json.dumps(checksums))
    evaluation = {"test": {"neg_elbo": 21.5}, "epochs": 2, "images": {"train": 60, "test": 10}}
    outputs.metrics.write_text(json.dumps(evaluation))
    (outputs.figures / "loss_curve.png").write_bytes(b"png one")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        save(VAE(latent_dims=3, hidden=(8,)), outputs.model)
    return outputs


# Two epochs of every history column, with distinct values (epoch e, column i: e + i / 100).
HISTORY = [
    {"epoch": epoch} | {key: epoch + i / 100 for i, key in enumerate(history_columns("val")[1:])}
    for epoch in (1, 2)
]
PARAMS_FILE = PROJECT / "params.yaml"
# A training file of 100 images and a test file of 20 (IDX: 16 header bytes, 784 per image).
CHECKSUMS = {
    "source": "custom",
    "files": {
        "train-images-idx3-ubyte": {"md5": "0" * 32, "bytes": 16 + 100 * 784},
        "t10k-images-idx3-ubyte": {"md5": "1" * 32, "bytes": 16 + 20 * 784},
    },
}


def _train_run(params) -> str:
    with training_run(params, CHECKSUMS, device="cpu", params_file=PARAMS_FILE) as run:
        for row in HISTORY:
            run.log_epoch(row)
    return run.run_id


def assert_recorded(store, run_id: str, params, outputs: PipelineOutputs) -> None:
    """The completeness table of test_pipeline.py, checked here in the fast tier: status, every
    param, every epoch of every history column, the evaluation metrics, the figures, the model
    and the reports, the fingerprint last."""
    import mlflow

    run = store.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in params_mod.flatten(params).items()}
    for key in HISTORY_METRICS:  # those of the history's layout, and no other
        logged = sorted((m.step, m.value) for m in store.get_metric_history(run_id, key))
        assert logged == [(row["epoch"], row[key]) for row in HISTORY if key in row], key
    assert run.data.metrics["eval/test/neg_elbo"] == 21.5
    # Counts are tags, not metrics.
    assert "eval/epochs" not in run.data.metrics and "eval/images/train" not in run.data.metrics
    assert "epoch/train/images" not in run.data.metrics
    tags = run.data.tags
    assert (tags["eval.epochs"], tags["eval.images.train"], tags["eval.images.test"]) == (
        "2",
        "60",
        "10",
    )
    assert tags["train.images_per_epoch"] == str(int(HISTORY[-1]["epoch/train/images"]))
    contexts = {i.dataset.name: i.tags[0].value for i in run.inputs.dataset_inputs}
    # tiny params hold out the last 60 of the 100 training images.
    assert params.data.validation == 60
    assert contexts == {
        "custom train[0:40]": "training",
        "custom validation[40:100]": "validation",
        "custom test": "test",
    }
    rows = {
        i.dataset.name: json.loads(i.dataset.profile)["num_rows"]
        for i in run.inputs.dataset_inputs
    }
    assert list(rows.values()) == [40, 60, 20]
    figures = {a.path for a in store.list_artifacts(run_id, "figures")}
    assert figures == {f"figures/{p.name}" for p in outputs.figures.iterdir()}
    reports = {a.path for a in store.list_artifacts(run_id, "reports")}
    sent = (outputs.params_file, outputs.metrics, outputs.history, outputs.checksums)
    assert reports == {f"reports/{p.name}" for p in sent}
    model = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="model/vae.pt", tracking_uri=store.tracking_uri
    )
    assert Path(model).read_bytes() == outputs.model.read_bytes()
    assert FINGERPRINT_TAG in run.data.tags
    # The MLflow model: linked to the run, carrying the evaluation metrics, with a signature.
    logged = store.get_logged_model(run.data.tags[MODEL_TAG].removeprefix("models:/"))
    assert logged.source_run_id == run_id
    assert {m.key: m.value for m in logged.metrics}["eval/test/neg_elbo"] == 21.5
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3)
    assert info.signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 784)}}
    ]


def test_record_completes_then_is_idempotent_then_sees_new_figures(store, tmp_path, tiny_params):
    run_id = _train_run(tiny_params)
    outputs = _outputs(tmp_path, tiny_params, CHECKSUMS, run_id)
    outputs.history.write_text("epoch\n1\n")
    assert record(tiny_params, outputs, HISTORY) == run_id
    assert_recorded(store, run_id, tiny_params, outputs)
    assert record(tiny_params, outputs, HISTORY) == run_id  # nothing changed
    # A re-drawn figure (plot code changed, same params) is a new result: a new, complete run.
    (outputs.figures / "loss_curve.png").write_bytes(b"png two")
    rebuilt = record(tiny_params, outputs, HISTORY)
    assert rebuilt != run_id
    assert store.get_run(rebuilt).data.tags[SOURCE_RUN_TAG] == run_id
    assert_recorded(store, rebuilt, tiny_params, outputs)


def test_a_failed_upload_leaves_no_fingerprint_and_the_next_record_finishes(
    store, tmp_path, tiny_params, monkeypatch
):
    run_id = _train_run(tiny_params)
    outputs = _outputs(tmp_path, tiny_params, CHECKSUMS, run_id)
    outputs.history.write_text("epoch\n1\n")
    from mlflow.tracking import MlflowClient

    original = MlflowClient.log_artifact

    def broken(self, *args, **kwargs):
        raise OSError("artifact store full")

    monkeypatch.setattr(MlflowClient, "log_artifact", broken)
    with pytest.raises(OSError):
        record(tiny_params, outputs, HISTORY)
    assert FINGERPRINT_TAG not in store.get_run(run_id).data.tags
    monkeypatch.setattr(MlflowClient, "log_artifact", original)
    assert record(tiny_params, outputs, HISTORY) == run_id
    assert_recorded(store, run_id, tiny_params, outputs)


def test_a_superseded_train_run_does_not_stay_running(store, tmp_path, tiny_params):
    import dataclasses

    run_id = _train_run(tiny_params)
    outputs = _outputs(tmp_path, tiny_params, CHECKSUMS, run_id)
    outputs.history.write_text("epoch\n1\n")
    # evaluate failed, then the user changed an evaluate param: the params no longer match.
    changed = dataclasses.replace(
        tiny_params, evaluate=dataclasses.replace(tiny_params.evaluate, seed=9)
    )
    rebuilt = record(changed, outputs, HISTORY)
    assert rebuilt != run_id
    old = store.get_run(run_id)
    assert old.info.status == "KILLED" and old.data.tags["vaelab.superseded_by"] == rebuilt
    assert store.get_run(rebuilt).data.params["evaluate.seed"] == "9"
    assert_recorded(store, rebuilt, changed, outputs)


def test_a_restarted_group_without_a_checkpoint_tags_its_new_run(store, tiny_params):
    """torchrun restarted the processes before epoch 1's checkpoint: nothing to resume, a new
    run, but it still says the processes were restarted (twice here); a first start says not."""
    for restarts, tag in ((2, "2"), (0, None)):
        with training_run(
            tiny_params, CHECKSUMS, device="cpu", params_file=PARAMS_FILE, restarts=restarts
        ) as run:
            pass
        assert store.get_run(run.run_id).data.tags.get("vaelab.restarts") == tag


def test_a_run_resumed_elsewhere_is_tagged_where_it_finished(store, tmp_path, tiny_params):
    """Epoch 1 on 2 CPU processes, then (a node lost for good, train.nproc: 1) resumed in the
    same run on one process of another device: the run's environment tags, the run info beside
    the model, and the run `record` rebuilds (MLflow params are immutable, and train.nproc
    changed) all say where training finished, which is what a reproduction runs on and compares
    (vaelab.reproduce). Where the earlier epochs ran is kept beside them."""
    import dataclasses

    def nproc(n: int):
        return dataclasses.replace(
            tiny_params, train=dataclasses.replace(tiny_params.train, nproc=n)
        )

    with training_run(
        nproc(2), CHECKSUMS, device="cpu", params_file=PARAMS_FILE, world_size=2
    ) as first:
        first.log_epoch(HISTORY[0])
    assert store.get_run(first.run_id).data.tags["world_size"] == "2"
    with training_run(
        nproc(1),
        CHECKSUMS,
        device="cuda:0",
        params_file=PARAMS_FILE,
        resume_run_id=first.run_id,
        history=HISTORY[:1],
        world_size=1,
    ) as resumed:
        resumed.log_epoch(HISTORY[1])
    assert resumed.run_id == first.run_id
    earlier = "until epoch 1: device=cpu, world_size=2"
    tags = store.get_run(first.run_id).data.tags
    assert (tags["device"], tags["world_size"]) == ("cuda:0", "1")
    assert tags.get(EARLIER_TAG) == earlier
    info = resumed.info(tiny_params.mlflow.experiment)
    assert (info["tags"]["device"], info["tags"]["world_size"]) == ("cuda:0", "1")
    assert info["tags"].get(EARLIER_TAG) == earlier
    outputs = _outputs(tmp_path, tiny_params, CHECKSUMS, first.run_id)
    outputs.history.write_text("epoch\n1\n2\n")
    outputs.run_info.write_text(json.dumps(info))
    rebuilt = record(nproc(1), outputs, HISTORY)
    assert rebuilt != first.run_id
    tags = store.get_run(rebuilt).data.tags
    assert (tags["device"], tags["world_size"]) == ("cuda:0", "1")
    assert tags.get(EARLIER_TAG) == earlier


def test_record_takes_where_training_ran_from_the_run_info_beside_the_model(
    store, tmp_path, tiny_params
):
    """The run info is written with the model by the attempt that finished training; a train run
    tagged otherwise (resumed elsewhere before its tags followed) does not override it. The stop
    tags come with it."""
    import dataclasses

    run_id = _train_run(tiny_params)
    store.set_tag(run_id, "world_size", "2")  # a stale tag of an earlier attempt
    outputs = _outputs(tmp_path, tiny_params, CHECKSUMS, run_id)
    outputs.history.write_text("epoch\n1\n")
    tags = {"device": "cpu", "world_size": "1", "torch.threads": "3"}
    # Why training ended and which weights were kept travel the same way.
    tags |= {"vaelab.stopped": "train.epochs (2) reached", "vaelab.kept": "best"}
    outputs.run_info.write_text(json.dumps({"run_id": run_id, "tags": tags}))
    changed = dataclasses.replace(
        tiny_params, evaluate=dataclasses.replace(tiny_params.evaluate, seed=9)
    )
    rebuilt = store.get_run(record(changed, outputs, HISTORY)).data.tags
    assert {k: rebuilt[k] for k in tags} == tags


def test_training_run_is_failed_with_the_reason(store, tiny_params):
    with (
        pytest.raises(RuntimeError),
        training_run(tiny_params, CHECKSUMS, device="cpu", params_file=PARAMS_FILE) as run,
    ):
        raise RuntimeError("loss exploded")
    failed = store.get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["vaelab.error"] == "RuntimeError: loss exploded"


def test_changed_params_against_the_committed_file(tmp_path, monkeypatch, tiny_params):
    import subprocess

    import yaml

    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "base"]):
        subprocess.run([*git, *cmd], cwd=repo, check=True)
    base = params_mod.load(repo / "params.yaml")
    assert changed_params(base, repo / "params.yaml", "HEAD") == ""
    assert changed_params(tiny_params, repo / "params.yaml", "HEAD") == (
        "data.source=custom, data.validation=60, model.hidden=[64], train.epochs=2, "
        "train.batch_size=32, train.device=cpu, evaluate.iw_samples=8, plot.line_count=4, "
        "plot.grid_size=4, plot.recon_count=4"
    )
    assert changed_params(base, repo / "params.yaml", "no-such-rev") is None
    assert changed_params(base, tmp_path / "elsewhere.yaml", "HEAD") is None


# Loads the model in a Python where `import vaelab` fails (the project's src/ is taken off the
# path first, and that is checked): what a user without vaelab installed gets. argv: URI, N.
LOAD_WITHOUT_VAELAB = """
import sys
sys.path = [p for p in sys.path if not p.startswith(sys.argv[3])]
try:
    import vaelab
    raise SystemExit("vaelab is importable here: " + vaelab.__file__)
except ImportError:
    pass
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
pixels = np.random.default_rng(0).random((int(sys.argv[2]), 784), dtype=np.float32)
np.save(sys.stdout.buffer, model.predict(pixels))
import vaelab
assert not vaelab.__file__.startswith(sys.argv[3]), vaelab.__file__
"""


def recorded_model(store, tmp_path, params) -> tuple[PipelineOutputs, str]:
    """A complete run recorded from fake outputs with a real tiny model: (outputs, model URI)."""
    run_id = _train_run(params)
    outputs = _outputs(tmp_path, params, CHECKSUMS, run_id)
    outputs.history.write_text("epoch\n1\n")
    record(params, outputs, HISTORY)
    return outputs, store.get_run(run_id).data.tags[MODEL_TAG]


def test_the_logged_model_predicts_latent_means_without_vaelab(store, tmp_path, tiny_params):
    outputs, uri = recorded_model(store, tmp_path, tiny_params)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_VAELAB, uri, "5", str(PROJECT / "src")],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    import io

    predicted = np.load(io.BytesIO(done.stdout))
    pixels = np.random.default_rng(0).random((5, 784), dtype=np.float32)
    with torch.inference_mode():
        expected = load(outputs.model).encode(torch.from_numpy(pixels).view(-1, 1, 28, 28))[0]
    assert predicted.shape == (5, 3)
    np.testing.assert_allclose(predicted, expected.numpy(), atol=1e-5, rtol=0)


def test_dataset_digests_follow_the_bytes_and_names_the_binarisation():
    files = {
        name: {"md5": f"{i}" * 32, "bytes": 16 + 784 * 5}
        for i, name in enumerate(
            (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        )
    }
    checksums = {"source": "mnist", "files": files}

    def by_name(checksums, binarize="none"):
        return {i.dataset.name: i.dataset for i in dataset_inputs(checksums, binarize)}

    first, again = by_name(checksums), by_name(json.loads(json.dumps(checksums)))
    assert set(first) == {"mnist train", "mnist test"}
    assert {n: d.digest for n, d in first.items()} == {n: d.digest for n, d in again.items()}
    assert first["mnist train"].digest != first["mnist test"].digest
    assert json.loads(first["mnist train"].profile) == {"num_rows": 5}
    changed = json.loads(json.dumps(checksums))
    changed["files"]["t10k-labels-idx1-ubyte"]["md5"] = "f" * 32
    other = by_name(changed)
    assert other["mnist test"].digest != first["mnist test"].digest  # other bytes, other digest
    assert other["mnist train"].digest == first["mnist train"].digest
    assert set(by_name(checksums, "dynamic")) == {
        "mnist train (dynamic binarisation)",
        "mnist test (binarised, fixed seed)",
    }


def test_a_sweep_s_runs_are_children_of_its_parent_run(store, tmp_path, tiny_params):
    """With mlflow.sweep set to a label whose parent run was started (make sweep does it first),
    the train run and a run rebuilt by record both carry the parent's id as mlflow.parentRunId;
    a run of another label, or of none, carries none."""
    import dataclasses

    def with_sweep(label: str):
        return dataclasses.replace(
            tiny_params, mlflow=dataclasses.replace(tiny_params.mlflow, sweep=label)
        )

    experiment = tiny_params.mlflow.experiment
    parent = start_sweep(experiment, "dims-1", {"model.latent_dims": "2,3"})
    other = start_sweep(experiment, "dims-2", {"model.latent_dims": "4,5"})
    assert parent != other
    assert store.get_run(parent).data.tags["mlflow.runName"] == "dims-1"

    child = _train_run(with_sweep("dims-1"))
    assert store.get_run(child).data.tags["mlflow.parentRunId"] == parent
    outputs = _outputs(tmp_path, tiny_params, CHECKSUMS, child)
    outputs.history.write_text("epoch\n1\n")
    # An evaluate param changed: record rebuilds a new run, which must stay in the sweep.
    changed = dataclasses.replace(
        with_sweep("dims-1"), evaluate=dataclasses.replace(tiny_params.evaluate, seed=9)
    )
    rebuilt = record(changed, outputs, HISTORY)
    assert rebuilt != child
    assert store.get_run(rebuilt).data.tags["mlflow.parentRunId"] == parent

    assert store.get_run(_train_run(with_sweep("dims-2"))).data.tags["mlflow.parentRunId"] == other
    assert "mlflow.parentRunId" not in store.get_run(_train_run(tiny_params)).data.tags


class DatasetRace:
    """A client whose first log_inputs fails as MLflow's server did when two runs inserted the
    same data set at once on PostgreSQL."""

    def __init__(self, message: str):
        self.message, self.calls = message, []

    def log_inputs(self, run_id, datasets):
        from mlflow.exceptions import MlflowException

        self.calls.append((run_id, datasets))
        if len(self.calls) == 1:
            raise MlflowException(self.message)


def test_a_data_set_another_run_created_meanwhile_is_logged_again():
    from vaelab.tracking.run import log_datasets

    race = DatasetRace(
        "BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique "
        'constraint "dataset_pk"'
    )
    log_datasets(race, "r1", ["d"])
    assert race.calls == [("r1", ["d"]), ("r1", ["d"])]
    other = DatasetRace("RESOURCE_DOES_NOT_EXIST: run r1")
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST"):
        log_datasets(other, "r1", ["d"])
    assert len(other.calls) == 1
