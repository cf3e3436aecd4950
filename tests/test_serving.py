"""A recorded run's MLflow model served by MLflow's own scoring server (`mlflow models serve
--env-manager local`) answers /invocations with the latent means vaelab computes; logging it
prints no MLflow warning about the model's `predict`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import test_tracking
from tests.services import free_port
from vaelab.model import load

SERVE_TIMEOUT_S = 180
store = test_tracking.store  # the private SQLite store fixture


def test_mlflow_models_serve_answers_with_the_latent_means(store, tmp_path, tiny_params):
    outputs, uri = test_tracking.recorded_model(store, tmp_path, tiny_params)
    pixels = np.random.default_rng(1).random((3, 784), dtype=np.float32)
    mlflow = Path(sys.executable).parent / "mlflow"
    # The scoring server execs uvicorn from PATH, as in any environment with mlflow installed.
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(3):  # a port found free may be taken before the server binds it
        port = free_port()
        server = subprocess.Popen(
            [
                str(mlflow),
                "models",
                "serve",
                "-m",
                uri,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            answer = _invoke(server, port, {"inputs": pixels.tolist()})
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            log = server.communicate(timeout=30)[0].decode(errors="replace")
        if answer is not None or "address already in use" not in log.lower():
            break
    assert answer is not None, log[-3000:]
    with torch.inference_mode():
        expected = load(outputs.model).encode(torch.from_numpy(pixels).view(-1, 1, 28, 28))[0]
    np.testing.assert_allclose(np.array(answer["predictions"]), expected.numpy(), atol=1e-5)


# What `record` does with the model (vaelab.tracking.models.log_model), in a fresh Python, so that
# vaelab.serving is imported there: MLflow 3 checks `predict`'s type hints when the PythonModel
# subclass is defined (PythonModel.__init_subclass__), not when it is logged, and once per
# process. argv: a folder for the weights; the store is MLFLOW_TRACKING_URI.
LOG_A_TINY_MODEL = """
import sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from vaelab.model import VAE, save
from vaelab.tracking.models import log_model
weights = Path(sys.argv[1]) / "vae.pt"
save(VAE(latent_dims=2, hidden=(8,)), weights)
client = MlflowClient()
run_id = client.create_run(client.create_experiment("vaelab")).info.run_id
log_model(client, run_id, weights)
"""


def test_logging_the_model_warns_about_no_type_hints(tmp_path):
    """MLflow 3.17 warns "Add type hints to the `predict` method ..." (mlflow/pyfunc/utils/
    data_validation.py) for a `predict` whose input has no type hint; every `make repro` printed
    it. Warnings are all shown here (-W always), MLflow's log lines too (on stderr)."""
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", LOG_A_TINY_MODEL, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "record: MLflow model models:/" in done.stdout  # the model was logged
    assert "type hint" not in (done.stdout + done.stderr).lower(), done.stderr[-3000:]


def _invoke(server: subprocess.Popen, port: int, payload: dict) -> dict | None:
    """POST /invocations once the server answers; None if it exits first."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return None
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except OSError:  # not listening yet
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer in {SERVE_TIMEOUT_S} s")
