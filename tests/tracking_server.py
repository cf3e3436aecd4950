"""A real ``mlflow server`` as a team runs it (docs/scale.md): runs in PostgreSQL, artifacts
proxied to an S3 bucket (tests/services.py starts both), and the real pipeline run against it;
shared by test_remote_tracking.py, test_share.py, test_ui_browser.py and the search tests.
Without PostgreSQL installed the server keeps its runs in SQLite instead (the tests that are
about PostgreSQL skip, saying so).

The fixtures that use these live in conftest.py with session scope, so a test session pays for
one server start and one fill (`dvc repro` + one `dvc exp run`): 14 + 36 + 17 s on 2 cores busy
with another training.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import S3, S3_CREDENTIALS, free_port, stop_group
from tests.test_pipeline import EXPERIMENT, _env, make_repo

START_TIMEOUT_S = 180  # ~15 s idle, ~35 s seen with two trainings running beside it


ARTIFACTS_PREFIX = "mlflow"  # the server's artifacts: s3://<bucket>/mlflow/...


@dataclass(frozen=True)
class TrackingServer:
    url: str  # http://127.0.0.1:<port>
    folder: Path  # holds server.log (and mlflow.db when the runs are in SQLite)
    backend: str  # --backend-store-uri: postgresql://... or sqlite:///...
    s3: S3  # --artifacts-destination is s3://<bucket>/ARTIFACTS_PREFIX

    @property
    def artifacts(self) -> str:
        return f"s3://{self.s3.bucket}/{ARTIFACTS_PREFIX}"

    def artifact_prefix(self, run: dict) -> str:
        """The bucket's key prefix of a run's (a REST run object) proxied artifacts:
        mlflow-artifacts:/<x> is <--artifacts-destination>/<x>, s3://<bucket>/mlflow/<x>."""
        uri = run["info"]["artifact_uri"]
        assert uri.startswith("mlflow-artifacts:/"), uri  # proxied through the server
        return f"{ARTIFACTS_PREFIX}/{uri.removeprefix('mlflow-artifacts:/').lstrip('/')}/"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def get(self, endpoint: str, **query: str) -> dict:
        """GET /api/2.0/mlflow/<endpoint>?<query> -> the JSON answer."""
        address = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(address, timeout=30) as answer:
            return json.load(answer)

    def post(self, endpoint: str, payload: dict) -> dict:
        """POST /api/2.0/mlflow/<endpoint> with a JSON body -> the JSON answer."""
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)


PORT_TRIES = 3  # a port found free can be taken by another process before the server binds it


def _start(folder: Path, port: int, backend: str, s3: S3) -> subprocess.Popen | None:
    """Start ``mlflow server`` on ``port`` and wait until it answers; None when the port was
    taken in the meantime (the server exits saying so)."""
    server = TrackingServer(f"http://127.0.0.1:{port}", folder, backend, s3)
    mlflow = Path(sys.executable).parent / "mlflow"
    # One worker: the default four take longer to start on 2 cores and tests need no more.
    command = [
        str(mlflow),
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        server.artifacts,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No job runner: it starts eight more Python processes (huey consumers for GenAI jobs such
    # as judges and trace roll-ups) that cost CPU here and ~6 s to stop; runs do not use them.
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # The server alone writes to the bucket (the clients upload through it): it alone gets the
    # endpoint and the credentials, as a team's server would.
    env |= {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint} | S3_CREDENTIALS
    with server.log.open("wb") as log:
        # Its own session: the server forks workers, and the whole group is stopped at the end.
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not answer in {START_TIMEOUT_S} s:\n"
                    f"{server.log.read_text()[-5000:]}"
                )
            if process.poll() is not None:
                output = server.log.read_text()
                if "address already in use" in output.lower():
                    return None
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{output[-5000:]}")
            try:
                server.get("experiments/search", max_results="1")
            except (OSError, ValueError):  # refused, reset, 5xx while starting
                time.sleep(0.5)
                continue
            # Something answered; it is ours once our server says it listens on the port (a
            # process that took the port first could answer while ours is still starting).
            ours = f"running on http://127.0.0.1:{port}" in server.log.read_text().lower()
            if ours and process.poll() is None:
                return process
            time.sleep(0.5)
    except BaseException:
        stop_group(process)
        raise


@contextlib.contextmanager
def running_server(folder: Path, backend: str, s3: S3) -> Iterator[TrackingServer]:
    """``mlflow server`` on a free port of 127.0.0.1 with its runs in ``backend`` and its
    artifacts in ``s3``'s bucket, answering REST calls; stopped on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(PORT_TRIES):
        port = free_port()
        process = _start(folder, port, backend, s3)
        if process is not None:
            break
    else:
        pytest.fail(f"no free port for mlflow server after {PORT_TRIES} tries")
    try:
        yield TrackingServer(f"http://127.0.0.1:{port}", folder, backend, s3)
    finally:
        stop_group(process)


@dataclass(frozen=True)
class FilledStore:
    """The server after the pipeline ran twice against it."""

    server: TrackingServer
    repo: Path
    experiment_id: str
    runs: list[dict]  # the REST run objects, oldest first
    params_files: list[Path]  # params.yaml as each run saw it, same order


def pipeline(repo: Path, server: TrackingServer, *cmd: str) -> str:
    """Run a command in ``repo`` with the test environment pointed at the server."""
    env = _env(repo) | {"MLFLOW_TRACKING_URI": server.url}
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output}\n{server.log.read_text()}"
    return output


def fill(server: TrackingServer, folder: Path) -> FilledStore:
    """`dvc repro`, then `dvc exp run -n eval-seed-1 -S evaluate.seed=1`, in a fresh repository.

    The first run is the train run that ``record`` completes; the second reuses the model (train
    is skipped), so ``record`` rebuilds a run from the DVC outputs: both ways a run gets to the
    server, and a second training would cost ~20 s more."""
    repo = make_repo(folder / "repo")
    snapshots = folder / "params"
    snapshots.mkdir()
    params_files = []
    commands = {
        "repro": ["dvc", "repro"],
        "eval-seed-1": ["dvc", "exp", "run", "-n", "eval-seed-1", "-S", "evaluate.seed=1"],
    }
    for name, cmd in commands.items():
        pipeline(repo, server, *cmd)
        # `dvc exp run` applies its result to the workspace, so params.yaml is that run's now.
        params_files.append(Path(shutil.copy2(repo / "params.yaml", snapshots / f"{name}.yaml")))
    experiment = server.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    found = server.post(
        "runs/search",
        {
            "experiment_ids": [experiment["experiment_id"]],
            "order_by": ["attributes.start_time ASC"],
        },
    )
    return FilledStore(
        server, repo, experiment["experiment_id"], found.get("runs", []), params_files
    )
