"""vaelab.ranking: runs are ranked by the validation metric, by its test-set twin only where a run
has no validation split (after the others), and the report's sentence says which."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from vaelab import ranking

NAN = math.nan


@pytest.mark.parametrize(
    ("metric", "twin"),
    [
        ("eval/val_iw/nll", "eval/test_iw/nll"),
        ("eval/val/neg_elbo", "eval/test/neg_elbo"),
        ("epoch/val/kl", "epoch/test/kl"),
        ("eval/val_latent/probe_accuracy", "eval/latent/probe_accuracy"),
        ("eval/val_per_digit/3", "eval/test_per_digit/3"),
        ("eval/test_iw/nll", None),
        ("eval/train/neg_elbo", None),
        ("epoch_seconds", None),
    ],
)
def test_a_validation_metric_s_test_set_twin(metric, twin):
    assert ranking.on_test_set(metric) == twin


def _runs(val: list[float], test: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {"run_id": [f"r{i}" for i in range(len(val))], "metrics.eval/val_iw/nll": val}
        | {"metrics.eval/test_iw/nll": test}
    )


def test_runs_with_a_validation_split_rank_by_it_against_the_test_order():
    runs = _runs(val=[85.0, 80.0, 82.0], test=[70.0, 90.0, 95.0])
    ranked = ranking.rank(runs)
    assert list(runs.loc[ranked.order(), "run_id"]) == ["r1", "r2", "r0"]
    assert list(runs.loc[ranked.order(descending=True), "run_id"]) == ["r0", "r2", "r1"]
    assert list(ranked.split) == ["val"] * 3
    assert ranked.note == (
        "Ranked by `eval/val_iw/nll` (the validation split); the test set's `eval/test_iw/nll` "
        "is reported, not used to choose."
    )


def test_runs_without_one_rank_by_the_test_set_and_say_so():
    runs = _runs(val=[NAN, NAN], test=[71.0, 70.0])
    ranked = ranking.rank(runs)
    assert list(runs.loc[ranked.order(), "run_id"]) == ["r1", "r0"]
    assert list(ranked.value) == [71.0, 70.0] and list(ranked.split) == ["test", "test"]
    assert ranked.note.startswith("Ranked by the test set's `eval/test_iw/nll`: these runs have")


def test_a_mix_ranks_the_runs_with_a_validation_split_first_and_says_how():
    """r1 and r3 have no validation split: however good their test numbers, they come after
    r0 and r2, in the order of their test numbers; r4 has no number at all and comes last."""
    runs = _runs(val=[85.0, NAN, 80.0, NAN, NAN], test=[99.0, 60.0, 98.0, 50.0, NAN])
    ranked = ranking.rank(runs)
    assert list(runs.loc[ranked.order(), "run_id"]) == ["r2", "r0", "r3", "r1", "r4"]
    assert list(ranked.split) == ["val", "test", "val", "test", ""]
    assert ranked.note.startswith(
        "2 runs have a validation split and are ranked first, by `eval/val_iw/nll`; the 2 "
        "without one (`data.validation: 0`) follow, ranked by the test set's `eval/test_iw/nll`"
    )


def test_a_metric_that_is_no_validation_metric_ranks_as_it_is():
    runs = pd.DataFrame({"metrics.epoch_seconds": [3.0, 1.0, 2.0]})
    ranked = ranking.rank(runs, "epoch_seconds")
    assert list(ranked.order()) == [1, 2, 0] and ranked.note == "Ranked by `epoch_seconds`."
