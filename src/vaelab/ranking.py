"""Which metric ranks runs (``make compare``, the sweep report, ``make register``'s champion):
the validation split's, and the test set's only for runs that have no validation split.

vaelab chooses on validation and reports the test set once (docs/comparing.md, "How vaelab
chooses"): a configuration picked by its test number has seen the test set, and that number is
no longer an honest estimate. Runs trained with ``data.validation: 0`` have no validation
numbers; they are ranked by the test metric of the same kind, and every report says so. A
validation number and a test number are not comparable, so in a mix of both the runs with a
validation split are ranked first and the others after them.

Pure pandas on ``mlflow.search_runs``' DataFrame (columns ``metrics.<key>``): no MLflow calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

RANK_METRIC = "eval/val_iw/nll"  # nats per image, lower is better: what vaelab chooses with
# Its test-set twin: reported beside it, "reported, not used to choose".
REPORT_METRIC = "eval/test_iw/nll"
NO_SPLIT = "test"  # the ``split`` of a run ranked by the test twin (no validation split)


def on_test_set(metric: str) -> str | None:
    """The test set's metric of the same kind as the validation metric ``metric``, or None for
    a metric that is not a validation one: eval/val_iw/nll -> eval/test_iw/nll, epoch/val/kl ->
    epoch/test/kl; the validation probe (eval/val_latent/...) -> eval/latent/... (the test set's
    latent section kept its first name)."""
    if metric.startswith("eval/val_latent/"):
        return "eval/latent/" + metric.removeprefix("eval/val_latent/")
    for prefix in ("eval/val/", "eval/val_iw/", "epoch/val/", "eval/val_per_digit/"):
        if metric.startswith(prefix):
            return prefix.replace("/val", "/test", 1) + metric.removeprefix(prefix)
    return None


@dataclass(frozen=True)
class Ranking:
    """How a set of runs is ranked: per run (the DataFrame's index) the value it is ranked by,
    which split that value is ("val", or "test" for a run without a validation split; "" for a
    metric that is neither), and the sentence a report prints about it."""

    metric: str  # the metric asked for
    twin: str | None  # its test-set twin, used for runs that lack ``metric``
    value: pd.Series  # float, NaN where a run has neither
    split: pd.Series  # "val" | "test" | "" per run
    note: str

    def sort_key(self, descending: bool = False) -> pd.DataFrame:
        """Columns to sort runs by, best first: the runs ranked by ``metric`` before those
        ranked by its twin (the two are not comparable), then those without either; then the
        value."""
        # 0: ranked by ``metric``, 1: by its twin, 2: by nothing (last).
        group = (self.split == NO_SPLIT).astype(int).mask(self.value.isna(), 2)
        return pd.DataFrame({"group": group, "value": -self.value if descending else self.value})

    def order(self, descending: bool = False) -> pd.Index:
        """The runs' index, best first (stable: equals keep their order)."""
        key = self.sort_key(descending)
        return key.sort_values(["group", "value"], kind="stable", na_position="last").index


def _column(runs: pd.DataFrame, metric: str | None) -> pd.Series:
    if metric is None or f"metrics.{metric}" not in runs.columns:
        return pd.Series(float("nan"), index=runs.index)
    return runs[f"metrics.{metric}"].astype(float)


def rank(runs: pd.DataFrame, metric: str = RANK_METRIC) -> Ranking:
    """The ranking of ``runs`` by ``metric``, falling back per run to its test twin."""
    twin = on_test_set(metric)
    own, other = _column(runs, metric), _column(runs, twin)
    has_own = own.notna()
    has_twin = other.notna() & ~has_own
    value = own.where(has_own, other)
    kind = "val" if twin is not None else ""
    split = pd.Series("", index=runs.index).mask(has_own, kind).mask(has_twin, NO_SPLIT)
    return Ranking(metric, twin, value, split, _note(metric, twin, int(has_own.sum()), has_twin))


def _note(metric: str, twin: str | None, with_own: int, has_twin: pd.Series) -> str:
    without = int(has_twin.sum())
    if twin is None:
        return f"Ranked by `{metric}`."
    if without == 0:
        return (
            f"Ranked by `{metric}` (the validation split); the test set's `{twin}` is reported, "
            "not used to choose."
        )
    if with_own == 0:
        return (
            f"Ranked by the test set's `{twin}`: these runs have no validation split "
            "(`data.validation: 0`), so the test set did the choosing and its numbers are no "
            "longer an unbiased estimate. Hold out a validation split to choose on it."
        )
    return (
        f"{with_own} runs have a validation split and are ranked first, by `{metric}`; the "
        f"{without} without one (`data.validation: 0`) follow, ranked by the test set's "
        f"`{twin}`: a test number is not comparable with a validation number, so the two are "
        "not interleaved."
    )
