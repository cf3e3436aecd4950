"""The MLflow side of ``vaelab.reproduce``: finding the run to re-create, checking that it
recorded what that takes, comparing the new run with it, and saying so on both runs."""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vaelab.errors import VaelabError
from vaelab.history import METRICS as HISTORY_METRICS
from vaelab.tracking.queries import download_artifact
from vaelab.tracking.source import DIFF_ARTIFACT, UNCOMMITTED_TAG
from vaelab.tracking.store import check_reachable, quiet_mlflow, tracking_uri
from vaelab.tracking.tags import KIND_TAG, REPRODUCES_TAG, TRAINING_TAGS

REPRODUCED_BY_TAG = "vaelab.reproduced_by"  # on the original: the latest reproduction's id
VERDICT_TAG = "vaelab.reproduction"  # on the original: "identical" or "differs"
COMPARISON_ARTIFACT = "reproduction/comparison.json"
TIMINGS = ("epoch_seconds", "images_per_second")  # per-epoch metrics that are not results
WEIGHTS_ARTIFACT = "model/vae.pt"


def client():  # -> MlflowClient of the project's store
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    uri = tracking_uri()
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


def _describe(run) -> str:
    name = run.data.tags.get("mlflow.runName", "")
    return f"run {run.info.run_id}" + (f" ('{name}')" if name else "")


def find_run(experiment: str, wanted: str):
    """The run ``wanted`` names: a run id (any experiment), else a run name in ``experiment``.
    Refuses, in one line, what cannot be reproduced: no such run (with close names), a name
    several runs share (listed), a comparison or sweep-parent run, an unfinished run."""
    from mlflow.exceptions import MlflowException

    store = client()
    if re.fullmatch(r"[0-9a-f]{32}", wanted):
        try:
            return _reproducible(store.get_run(wanted))
        except MlflowException:
            pass  # not an id of this store: maybe a name
    found = store.get_experiment_by_name(experiment)
    if found is None:
        raise VaelabError(f"no MLflow experiment '{experiment}' in {tracking_uri()}")
    quoted = wanted.replace("'", "\\'")
    named = store.search_runs(
        [found.experiment_id], filter_string=f"tags.`mlflow.runName` = '{quoted}'"
    )
    if len(named) > 1:
        listed = "; ".join(f"{r.info.run_id} ({r.info.status}, {_started(r)})" for r in named)
        raise VaelabError(f"{len(named)} runs are named '{wanted}': {listed}. Give one's id.")
    if named:
        return _reproducible(named[0])
    everything = store.search_runs([found.experiment_id], max_results=5000)
    names = {r.data.tags.get("mlflow.runName", "") for r in everything}
    close = difflib.get_close_matches(wanted, sorted(names - {""}), n=3)
    close += [r.info.run_id for r in everything if r.info.run_id.startswith(wanted)][:3]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise VaelabError(
        f"no run with the id or name '{wanted}' in experiment '{experiment}' of "
        f"{tracking_uri()}.{hint}"
    )


def _started(run) -> str:
    import datetime

    started = datetime.datetime.fromtimestamp(run.info.start_time / 1000)
    return f"started {started:%Y-%m-%d %H:%M:%S}"


def _reproducible(run):
    kind = run.data.tags.get(KIND_TAG, "")
    if kind:
        raise VaelabError(
            f"{_describe(run)} is a {kind} run, not a training run: reproduce one of the runs "
            "it holds (its children, or its vaelab.compared_runs)."
        )
    if run.info.status != "FINISHED":
        raise VaelabError(
            f"{_describe(run)} is {run.info.status}: only a complete (FINISHED) run has the "
            "metrics and model a reproduction is compared with."
        )
    return run


def missing(run) -> list[str]:
    """The tags reproduction needs that ``run`` lacks (recorded before they existed)."""
    tags = run.data.tags
    needed = ["git.commit", UNCOMMITTED_TAG, *TRAINING_TAGS]
    lacking = [t for t in needed if tags.get(t, "unknown") == "unknown"]
    if not any(t.startswith("data.md5.") for t in tags):
        lacking.append("data.md5.*")
    return lacking


def uncommitted_diff(run, folder: Path) -> Path | None:
    """The diff the run trained with on top of its commit (None for a clean run)."""
    if not run.data.tags.get(UNCOMMITTED_TAG):
        return None
    diff = download_artifact(run.info.run_id, DIFF_ARTIFACT, folder)
    if diff is None:
        raise VaelabError(
            f"{_describe(run)} trained with uncommitted changes "
            f"({run.data.tags[UNCOMMITTED_TAG]}) but its artifact {DIFF_ARTIFACT} is missing."
        )
    return diff


def reproduction_of(run_id: str, since_ms: int):
    """The newest FINISHED run tagged as a reproduction of ``run_id`` started after
    ``since_ms``, or None."""
    store = client()
    original = store.get_run(run_id)
    found = store.search_runs(
        [original.info.experiment_id],
        filter_string=(
            f"tags.`{REPRODUCES_TAG}` = '{run_id}' and attributes.status = 'FINISHED' "
            f"and attributes.start_time >= {since_ms}"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


@dataclass
class Comparison:
    """The original run against its reproduction: per metric the largest absolute difference
    (inf where one run lacks the metric or an epoch), the weights' digests, and the recorded
    environment (``TRAINING_TAGS``) and params that differ: {name: (original, reproduction)}."""

    original: str
    reproduction: str
    metrics: dict[str, float]
    weights: tuple[str, str]
    environment: dict[str, tuple[str, str]] = field(default_factory=dict)
    params: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return all(v == 0 for v in self.metrics.values()) and self.weights[0] == self.weights[1]

    @property
    def verdict(self) -> str:
        return "identical" if self.identical else "differs"

    def as_json(self) -> str:
        return json.dumps(
            {
                "verdict": self.verdict,
                "original": self.original,
                "reproduction": self.reproduction,
                "max_abs_difference": {k: _finite(v) for k, v in self.metrics.items()},
                "weights_sha256": {"original": self.weights[0], "reproduction": self.weights[1]},
                "environment": {k: list(v) for k, v in self.environment.items()},
                "params": {k: list(v) for k, v in self.params.items()},
            },
            indent=2,
        )


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "missing"


def _largest_difference(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    """Max |a - b| over steps; inf when the steps differ or one run has NaN where the other has
    a number (max() would pass over a NaN gap). NaN against NaN counts as equal."""
    if [s for s, _ in a] != [s for s, _ in b]:
        return math.inf
    gaps = [_gap(x, y) for (_, x), (_, y) in zip(a, b, strict=True)]
    return math.inf if any(math.isnan(g) for g in gaps) else max(gaps, default=0.0)


def _gap(x: float, y: float) -> float:
    """|x - y|, 0 for equal values (also two infinities of a sign, or two NaNs)."""
    return 0.0 if x == y or (math.isnan(x) and math.isnan(y)) else abs(x - y)


def compare(original, reproduction, weights: tuple[str, str], params: dict) -> Comparison:
    """Every per-epoch metric but the timings, every evaluation metric (``eval/...``), the
    weights' digests and where each trained."""
    store = client()

    def history(run, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in store.get_metric_history(run.info.run_id, key))

    metrics = {
        key: _largest_difference(history(original, key), history(reproduction, key))
        for key in HISTORY_METRICS
        if key not in TIMINGS
    }
    evaluated = sorted(
        k for k in {*original.data.metrics, *reproduction.data.metrics} if k.startswith("eval/")
    )
    for key in evaluated:
        a, b = original.data.metrics.get(key), reproduction.data.metrics.get(key)
        metrics[key] = (
            math.inf if a is None or b is None else _largest_difference([(0, a)], [(0, b)])
        )
    environment = {
        tag: (original.data.tags.get(tag, ""), reproduction.data.tags.get(tag, ""))
        for tag in TRAINING_TAGS
        if original.data.tags.get(tag, "") != reproduction.data.tags.get(tag, "")
    }
    return Comparison(
        original.info.run_id, reproduction.info.run_id, metrics, weights, environment, params
    )


def mark(comparison: Comparison, name: str) -> None:
    """Say it on both runs: the new one is named after the original, nested under it
    (``mlflow.parentRunId``, so the UI shows it in the original's row) and carries the
    comparison; the original points at its latest reproduction and the verdict."""
    store = client()
    new, original = comparison.reproduction, comparison.original
    store.set_tag(new, "mlflow.runName", f"{name or original[:8]} (reproduced)")
    store.set_tag(new, "mlflow.parentRunId", original)
    store.set_tag(
        new,
        "mlflow.note.content",
        f"A reproduction of run {original}: {comparison.verdict} (see {COMPARISON_ARTIFACT}).",
    )
    store.log_text(new, comparison.as_json() + "\n", COMPARISON_ARTIFACT)
    store.set_tag(original, REPRODUCED_BY_TAG, new)
    store.set_tag(original, VERDICT_TAG, comparison.verdict)
