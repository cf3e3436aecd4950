"""A search's side of MLflow (``make search``): its parent run, its trials' and confirmations'
runs found by their DVC experiment's name and made its children, pruned runs marked, the best
so far and the verdict kept on the parent, the report logged into it.

The train stage knows nothing of searches: it logs its run under the DVC experiment's name (tag
``dvc.exp_name``), and the search process finds that run and tags it. So a search file, or the
search code, changes nothing a stage runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from vaelab.errors import VaelabError
from vaelab.tracking.parents import NOTE_TAG, end_parent, find_parents
from vaelab.tracking.queries import find_runs
from vaelab.tracking.store import connect
from vaelab.tracking.tags import KIND_TAG

SEARCH_TAG = "vaelab.search"  # the search's name, on its parent and on every run of it
TRIAL_TAG = "vaelab.trial"  # a trial's run: the Optuna trial number
CONFIRMS_TAG = "vaelab.confirms"  # a confirmation's run: the trial number it repeats
PRUNED_TAG = "vaelab.pruned"  # a pruned trial's run: the epoch the pruner stopped it at
WINNER_TAG = "vaelab.winner"  # on the parent: the confirmed winner's trial number
VERDICT_TAG = "vaelab.verdict"  # on the parent: the confirmation's verdict in words
KIND = "search"
# Runs are found by their experiment's name among runs started since the experiment was
# launched, less this margin (clocks of one machine; a name reused by an older search is older).
FIND_MARGIN_MS = 5_000


class SearchRuns:
    """The MLflow side of search ``name`` in ``experiment``: its parent run once started."""

    def __init__(self, experiment: str, name: str) -> None:
        self.experiment, self.name = experiment, name
        self.client, self.experiment_id = connect(experiment)
        self.parent: str | None = None

    def start_parent(self, params: dict[str, str]) -> tuple[str, bool]:
        """The search's one parent run, RUNNING: the existing one (set RUNNING again when a
        search is continued), or a new one with ``params``; (its id, whether it existed). Two
        processes that create one at the same moment both keep the older and delete theirs."""
        from mlflow.entities import Param

        found = self._parents()
        if found:
            self.parent = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(self.parent, status="RUNNING")
            return self.parent, True
        tags = {
            KIND_TAG: KIND,
            SEARCH_TAG: self.name,
            NOTE_TAG: f"Search '{self.name}': its trials and confirmations are the children.",
        }
        created = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags)
        run_id = created.info.run_id
        self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        oldest = self._parents()[0].info.run_id
        if oldest != run_id:  # another process made one first
            self.client.delete_run(run_id)
        self.parent = oldest
        return oldest, oldest != run_id

    def _parents(self):
        return find_parents(self.client, self.experiment_id, KIND_TAG, KIND, SEARCH_TAG, self.name)

    def find_run(self, exp_name: str, since: float, finished: bool = False):
        """The newest run of DVC experiment ``exp_name`` started after ``since`` (unix time, the
        experiment's launch), FINISHED ones only with ``finished``; None if there is none yet."""
        since_ms = int(since * 1000) - FIND_MARGIN_MS
        query = f"tags.`dvc.exp_name` = '{exp_name}' and attributes.start_time >= {since_ms}"
        if finished:
            query += " and attributes.status = 'FINISHED'"
        found = self.client.search_runs(
            [self.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
        )
        return found[0] if found else None

    def curve(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``key``'s (step, value) pairs so far, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def metrics(self, run_id: str) -> dict[str, float]:
        """The run's metrics, each its last value."""
        return dict(self.client.get_run(run_id).data.metrics)

    def adopt(self, run_id: str, *, trial: int | None = None, confirms: int | None = None):
        """Make the run a child of the parent, tagged with the search and its trial number (or
        the trial number a confirmation repeats)."""
        from mlflow.entities import RunTag

        tags = {"mlflow.parentRunId": self.parent, SEARCH_TAG: self.name}
        if trial is not None:
            tags[TRIAL_TAG] = str(trial)
        if confirms is not None:
            tags[CONFIRMS_TAG] = str(confirms)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str, tags: dict[str, str]) -> None:
        """A stopped trial's run: ``tags`` (why) and ``status`` (KILLED), whatever the stage
        managed to set before it stopped (it marks its own run KILLED when it stops in
        training, but a stop in evaluate leaves the run RUNNING)."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if self.client.get_run(run_id).info.status != status:
            self.client.set_terminated(run_id, status)

    def record_progress(self, counts: dict[str, int], best: dict | None) -> None:
        """The parent's numbers as they stand: the trials per state (metrics, step = trials
        ended), and the best trial's value, number and params (tags ``vaelab.best.*``)."""
        from mlflow.entities import Metric, RunTag

        now, step = int(time.time() * 1000), sum(counts.values())
        metrics = [Metric(f"search/{state}", n, now, step) for state, n in counts.items()]
        tags = []
        if best is not None:
            metrics.append(Metric("search/best_value", best["value"], now, step))
            tags = [RunTag("vaelab.best_trial", str(best["number"]))]
            tags += [RunTag("vaelab.best_value", f"{best['value']:.6g}")]
            tags += [RunTag(f"vaelab.best.{k}", str(v)) for k, v in best["params"].items()]
        self.client.log_batch(self.parent, metrics=metrics, tags=tags)

    def log_report(self, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.parent, str(path), artifact_path="search")

    def set_verdict(self, winner: int | None, verdict: str) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(VERDICT_TAG, verdict[:5000])]
        if winner is not None:
            tags.append(RunTag(WINNER_TAG, str(winner)))
        elif WINNER_TAG in self.client.get_run(self.parent).data.tags:
            self.client.delete_tag(self.parent, WINNER_TAG)  # an earlier verdict's
        self.client.log_batch(self.parent, tags=tags)

    def end(self, status: str, note: str) -> bool:
        """End the parent (FINISHED, or FAILED with the reason); one already ended is left."""
        return end_parent(self.client, self.parent, status, note)

    def confirmation_runs(self):
        """The search's FINISHED confirmation runs (``find_runs``' DataFrame)."""
        runs = find_runs(self.experiment, f"tags.`{SEARCH_TAG}` = '{self.name}'")
        column = f"tags.{CONFIRMS_TAG}"
        if column not in runs.columns:
            return runs.iloc[0:0]
        return runs[runs[column].fillna("") != ""].reset_index(drop=True)


def winner_filter(experiment: str, name: str) -> str:
    """An MLflow filter for the confirmation runs of search ``name``'s confirmed winner (the
    parent's ``vaelab.winner``); refused, with the verdict, when the search named none."""
    client, experiment_id = connect(experiment)
    parents = find_parents(client, experiment_id, KIND_TAG, KIND, SEARCH_TAG, name)
    if not parents:
        raise VaelabError(
            f"no search '{name}' in MLflow experiment '{experiment}'; run make search "
            f"SEARCH=searches/{name}.yaml first (or check the name)."
        )
    tags = parents[0].data.tags
    if WINNER_TAG not in tags:
        said = tags.get(VERDICT_TAG, "its confirmation has not been made yet")
        raise VaelabError(
            f"search '{name}' named no confirmed winner: {said} Register one of its runs with "
            f"--filter instead, e.g. --filter \"tags.`{CONFIRMS_TAG}` = 'N'\"."
        )
    return f"tags.`{SEARCH_TAG}` = '{name}' and tags.`{CONFIRMS_TAG}` = '{tags[WINNER_TAG]}'"
