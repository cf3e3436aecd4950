"""Logging a comparison (``vaelab.compare``): its report and figures into a sweep's parent run, or
into a run of its own named "comparison"."""

from __future__ import annotations

from pathlib import Path

from vaelab.tracking.store import connect
from vaelab.tracking.tags import KIND_TAG

PARENT_TAG = "mlflow.parentRunId"


def children(client, experiment_id: str, parent: str) -> set[str]:
    """The ids of every run nested under ``parent``, whatever its status."""
    found, token = set(), None
    while True:
        page = client.search_runs(
            [experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'", page_token=token
        )
        found |= {run.info.run_id for run in page}
        token = page.token
        if not token:
            return found


def report_parent(
    client, experiment_id: str, parents: list[str | None], compared: list[str]
) -> tuple[str | None, str]:
    """The sweep parent run the report of ``compared`` (whose parent runs are ``parents``) goes
    into, or None and why not ("" when the runs are not one sweep's). The report goes into the
    parent only when it covers every one of its children, in any status: a comparison of some of
    them would replace the sweep's full report. A parent that ended FAILED or KILLED keeps its
    status and its note saying why; a later comparison gets a run of its own."""
    distinct = set(parents)
    if len(distinct) != 1 or None in distinct:
        return None, ""
    parent = distinct.pop()
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(parent)
    except MlflowException:  # a parent id that names no run: not a sweep's
        return None, ""
    if run.data.tags.get(KIND_TAG) != "sweep":
        return None, ""
    label = run.data.tags.get("sweep") or run.info.run_name
    if run.info.status not in ("RUNNING", "FINISHED"):
        return None, f"sweep '{label}' ended {run.info.status}; its parent run is left as it is"
    # Exactly its children: none left out, and none of another sweep's (also when the runs' own
    # parent tags would say otherwise).
    found = children(client, experiment_id, parent)
    if found != set(compared):
        return None, (
            f"{len(found & set(compared))} of sweep '{label}''s {len(found)} runs; its parent "
            "run keeps the report of them all"
        )
    return parent, ""


def log_comparison(
    experiment: str, files: list[Path], compared: list[str], parents: list[str | None]
) -> tuple[str, str]:
    """Log ``files`` under ``comparison/`` and finish the run: into the sweep's parent run when
    ``compared`` are all of one sweep's children (``parents``: each one's parent run, None
    without), else into a new run named "comparison". Returns its id and, when the runs were one
    sweep's but the report did not go into its parent, why not ("" otherwise)."""
    from mlflow.entities import RunTag

    client, experiment_id = connect(experiment)
    parent, why = report_parent(client, experiment_id, parents, compared)
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
    return run_id, why
