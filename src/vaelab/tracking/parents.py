"""Parent runs of commands that run many experiments (``make sweep``, ``make search``): one run
per sweep or search that its experiments' runs are children of (``mlflow.parentRunId``), so the
MLflow UI shows each as one expandable row; found again by a tag, ended with a reason."""

from __future__ import annotations

NOTE_TAG = "mlflow.note.content"  # the run's description in the UI


def find_parents(client, experiment_id: str, kind_tag: str, kind: str, tag: str, label: str):
    """The runs whose ``kind_tag`` is ``kind`` and ``tag`` is ``label``, oldest first."""
    query = f"tags.`{kind_tag}` = '{kind}' and tags.`{tag}` = '{label}'"
    found = client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
    )
    return sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))


def end_parent(client, run_id: str, status: str, note: str, only_running: bool = True) -> bool:
    """End parent run ``run_id`` as ``status`` (FINISHED, FAILED, KILLED) with ``note`` as its
    description; with ``only_running`` a parent that has already ended is left as it is (False)."""
    if only_running and client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, NOTE_TAG, note[:5000])
    client.set_terminated(run_id, status)
    return True
