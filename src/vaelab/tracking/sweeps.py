"""A sweep's parent run (``make sweep``): started before its experiments are queued, finished by
the comparison that is logged into it, or FAILED when that comparison cannot be made."""

from __future__ import annotations

from vaelab.tracking.parents import NOTE_TAG, end_parent
from vaelab.tracking.store import connect
from vaelab.tracking.tags import KIND_TAG, sweep_parent


def start_sweep(experiment: str, label: str, swept: dict[str, str]) -> str:
    """The parent run of sweep ``label`` (run name = label; params: the swept keys and values):
    every run whose ``mlflow.sweep`` is ``label`` becomes its child (``mlflow.parentRunId``), so
    the UI shows the sweep as one row; ``compare`` finishes it with the report. The existing
    parent of that label, if there is one."""
    from mlflow.entities import Param

    client, experiment_id = connect(experiment)
    found = sweep_parent(client, experiment_id, label)
    if found:
        return found
    tags = {
        KIND_TAG: "sweep",
        "sweep": label,
        NOTE_TAG: f"Sweep over {', '.join(swept)}: its runs are the children.",
    }
    run_id = client.create_run(experiment_id, run_name=label, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(f"sweep.{k}", v) for k, v in swept.items()])
    return run_id


def fail_sweep(experiment: str, label: str, reason: str) -> bool:
    """End sweep ``label``'s parent run as FAILED with ``reason`` as its note (its experiments
    could not be queued or run, or the comparison that would finish it could not be made);
    False when the sweep has no running parent."""
    client, experiment_id = connect(experiment)
    parent = sweep_parent(client, experiment_id, label)
    if parent is None:
        return False
    return end_parent(client, parent, "FAILED", f"The sweep failed: {reason}")
