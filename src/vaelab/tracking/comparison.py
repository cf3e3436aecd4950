"""Logging a comparison (``vaelab.compare``): its report and figures into a sweep's parent run, or
into a run of its own named "comparison"."""

from __future__ import annotations

from pathlib import Path

from vaelab.tracking.store import connect
from vaelab.tracking.tags import KIND_TAG


def log_comparison(
    experiment: str, files: list[Path], compared: list[str], parent: str | None = None
) -> str:
    """Log ``files`` under ``comparison/`` and finish the run: into the sweep's parent run when
    the compared runs are one sweep's children (``parent``), else into a new run named
    "comparison"; returns its id."""
    from mlflow.entities import RunTag

    client, experiment_id = connect(experiment)
    tags = {
        "vaelab.compared_runs": ",".join(compared)[:5000],
        "mlflow.note.content": f"{len(compared)} runs compared by python -m vaelab.compare.",
    }
    if parent is not None:
        run_id = parent
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        tags[KIND_TAG] = "comparison"
        run_id = client.create_run(experiment_id, run_name="comparison", tags=tags).info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="comparison")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
