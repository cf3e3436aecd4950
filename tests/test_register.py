"""vaelab.register on a private store filled by record: the best run's model becomes a
version of the registered model with the alias on it; the alias moves only for a better run;
what cannot be registered is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import test_tracking
from tests.test_tracking import CHECKSUMS, HISTORY, PARAMS_FILE, _outputs, _train_run
from vaelab import register
from vaelab.errors import VaelabError
from vaelab.tracking.models import MODEL_TAG
from vaelab.tracking.record import FINGERPRINT_TAG, PipelineOutputs, record
from vaelab.tracking.registry import register_best
from vaelab.tracking.store import connect

store = test_tracking.store  # the fixture: a private SQLite store, DVC variables cleared

URI = "models:/vaelab-vae@champion"


def _result(tmp_path, params, nll: float, val_nll: float | None = None) -> PipelineOutputs:
    """A trained run and the pipeline's outputs for it, with test IW-NLL ``nll`` (and validation
    IW-NLL ``val_nll``: none given, the run has no validation numbers), not yet recorded."""
    outputs = _outputs(tmp_path, params, CHECKSUMS, _train_run(params))
    outputs.history.write_text("epoch\n1\n")
    evaluation = json.loads(outputs.metrics.read_text())
    evaluation |= {"test_iw": {"nll": nll}}
    if val_nll is not None:
        evaluation |= {"val_iw": {"nll": val_nll}}
    outputs.metrics.write_text(json.dumps(evaluation))
    return outputs


def _record(tmp_path, params, nll: float, val_nll: float | None = None) -> str:
    """A complete run (recorded, with its MLflow model) whose IW-NLL is ``nll`` (``val_nll`` on
    the validation split); its id."""
    return record(params, _result(tmp_path, params, nll, val_nll), HISTORY)


def _register(capsys, *args: str) -> str:
    register.main(["--params", str(PARAMS_FILE), *args])
    return capsys.readouterr().out


def _versions(store) -> list[str]:
    return sorted(str(v.version) for v in store.search_model_versions("name = 'vaelab-vae'"))


def _champion(store):
    return store.get_model_version_by_alias("vaelab-vae", "champion")


def test_the_alias_follows_the_best_run_and_only_moves_for_a_better_one(
    store, tmp_path, tiny_params, capsys, monkeypatch
):
    worse, better = _record(tmp_path, tiny_params, 90.0), _record(tmp_path, tiny_params, 85.0)
    out = _register(capsys)
    assert f"{URI} -> version 1, a new version (run {better}, eval/test_iw/nll = 85)" in out
    assert _champion(store).run_id == better
    model_uri = store.get_run(better).data.tags[MODEL_TAG]
    assert _champion(store).source == model_uri  # the run's logged model

    # Nothing better since: no new version.
    assert f"{URI} is already version 1 (run {better}" in _register(capsys)
    assert _versions(store) == ["1"]

    best = _record(tmp_path, tiny_params, 80.0)
    out = _register(capsys)
    assert f"{URI} -> version 2, a new version (run {best}" in out and "was version 1" in out
    assert _champion(store).run_id == best
    assert _versions(store) == ["1", "2"]

    # Higher is better: the worst run gets a version. Back to lower is better: a version holding
    # the best run's model exists, and the alias returns to it rather than to a duplicate.
    assert f"-> version 3, a new version (run {worse}" in _register(capsys, "--descending")
    out = _register(capsys)
    assert f"{URI} -> version 2, an existing version of this model (run {best}" in out
    assert _versions(store) == ["1", "2", "3"]

    # What another process does: load the alias, predict latent means (latent_dims 3).
    import mlflow

    monkeypatch.setattr(sys, "path", list(sys.path))  # load_model prepends the model's code
    mlflow.set_tracking_uri(store.tracking_uri)
    model = mlflow.pyfunc.load_model(URI)
    assert f"models:/{model.metadata.model_id}" == _champion(store).source
    means = model.predict(np.random.default_rng(0).random((4, 784), dtype=np.float32))
    assert means.shape == (4, 3) and means.dtype == np.float32


def test_the_champion_follows_validation_where_the_test_set_says_otherwise(
    store, tmp_path, tiny_params, capsys
):
    """Two runs whose validation and test numbers rank them in opposite orders: the champion is
    the better on validation, its test number printed as reported only. A run without a
    validation split, whatever its test number, comes after the runs that have one."""
    on_val = _record(tmp_path, tiny_params, nll=90.0, val_nll=80.0)
    _record(tmp_path, tiny_params, nll=70.0, val_nll=85.0)  # better on test, worse on val
    _record(tmp_path, tiny_params, nll=60.0)  # no validation split, the best test number
    out = _register(capsys)
    assert f"(run {on_val}, eval/val_iw/nll = 80; eval/test_iw/nll = 90, reported, not used" in out
    assert _champion(store).run_id == on_val


def test_nothing_to_register_is_an_error_that_names_the_problem(store):
    from mlflow.entities import Metric

    with pytest.raises(VaelabError, match="no MLflow experiment 'vaelab'"):
        register_best("vaelab")
    client, experiment_id = connect("vaelab")
    client.create_run(experiment_id)  # RUNNING: not a finished run
    with pytest.raises(VaelabError, match="no FINISHED training run in experiment 'vaelab'"):
        register_best("vaelab")

    # A finished run with another metric and, as recorded before runs got a model, no model tag.
    run_id = client.create_run(experiment_id).info.run_id
    client.log_batch(run_id, metrics=[Metric("eval/test/neg_elbo", 90.0, 0, 0)])
    client.set_terminated(run_id, "FINISHED")
    with pytest.raises(VaelabError) as error:
        register_best("vaelab")
    assert str(error.value) == (
        "no FINISHED run has the metric 'eval/val_iw/nll' (nor its test-set twin "
        "'eval/test_iw/nll'); choose --metric from: "
        "eval/test/neg_elbo."
    )
    with pytest.raises(VaelabError, match=rf"best run {run_id} .* has no logged MLflow model"):
        register_best("vaelab", metric="eval/test/neg_elbo")


def test_a_run_without_a_model_is_refused_until_recorded_again(store, tmp_path, tiny_params):
    outputs = _result(tmp_path, tiny_params, 85.0)
    run_id = record(tiny_params, outputs, HISTORY)
    # As recorded before runs got a model: no model tag, a fingerprint of the older standard.
    store.delete_tag(run_id, MODEL_TAG)
    store.set_tag(run_id, FINGERPRINT_TAG, "0" * 64)
    with pytest.raises(VaelabError) as error:
        register_best("vaelab")
    message = str(error.value)
    assert "Run `dvc repro`" in message and "to record it again with its model" in message
    # The filter the message suggests leaves such runs out.
    hint = message[message.index('--filter "') + 10 : message.rindex('"')]
    with pytest.raises(VaelabError, match="no FINISHED training run .* matching"):
        register_best("vaelab", filter_string=hint)
    # record does not take that run for this result any more: it rebuilds one with a model,
    # which register prefers to the older run it ties with.
    again = record(tiny_params, outputs, HISTORY)
    assert again != run_id and MODEL_TAG in store.get_run(again).data.tags
    done = register_best("vaelab")
    assert (done.run_id, done.version, done.new_version) == (again, "1", True)
    # A name or alias MLflow refuses is an error naming the option; no version is added.
    with pytest.raises(VaelabError, match="cannot register .*'latest'.*Choose another --name"):
        register_best("vaelab", alias="latest")
    assert _versions(store) == ["1"]


def test_the_command_fails_with_one_line_and_exit_status_2(store, tmp_path):
    connect("vaelab")  # an empty experiment
    env = os.environ | {"MLFLOW_TRACKING_URI": store.tracking_uri}
    done = subprocess.run(
        [sys.executable, "-m", "vaelab.register", "--params", str(PARAMS_FILE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: no FINISHED training run in experiment 'vaelab' to register; run `make repro` "
        "(or `dvc repro`) first, or change --filter."
    ]
