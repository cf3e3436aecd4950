"""``make ui``: the MLflow UI on the project's store, and the link that opens it on the runs.

python -m vaelab.tracking.ui --port 5000 --experiment vaelab
"""

from __future__ import annotations

import argparse
import os
import sys

from vaelab.tracking.store import (
    DEFAULT_STORE,
    project_root,
    quiet_mlflow,
    sqlite_path,
    tracking_uri,
)


def ui_link(base: str, uri: str, experiment: str) -> str:
    """The UI page of ``experiment``'s runs in MLflow's "Model training" view (the UI opens in
    its GenAI view otherwise; it reads ``workflowType`` from the address of the page)."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    found = None
    if sqlite_path(uri) is None or sqlite_path(uri).exists():  # never create a store here
        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    page = f"#/experiments/{found.experiment_id}/runs" if found else "#/experiments"
    return f"{base}/{page}?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> None:
    """``make ui``: serve the project's store with ``mlflow ui`` on 127.0.0.1."""

    parser = argparse.ArgumentParser(description="MLflow UI on the project's tracking store")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--experiment", default="vaelab", help="the page the link opens")
    args = parser.parse_args(argv)
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        # `mlflow ui` serves a store and fails on a server's http URI; a server has its own UI.
        print(
            f"MLFLOW_TRACKING_URI is the tracking server {uri}: open it in a browser for its "
            "runs. Serving this project's local store here.",
            flush=True,
        )
        uri = f"sqlite:///{project_root() / DEFAULT_STORE}"
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port}", flush=True)
    print(f"open: {ui_link(f'http://{args.host}:{args.port}', uri, args.experiment)}", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
