"""Seed replicates: the configuration id, the per-configuration means and standard deviations,
and the noise call (Welch's t-test) on hand-made numbers whose answers are known; then compare
on a store of hand-made replicate runs."""

from __future__ import annotations

import csv
import math
import statistics

import matplotlib
import pandas as pd
import pytest

from tests import test_compare
from vaelab import compare, replicates
from vaelab.params import BOOKKEEPING_KEYS, SEED_KEYS, config_id, flatten, is_config_key

# A private store copied from one migrated SQLite file: test_compare's fixtures, found by pytest
# under these names.
migrated_store = test_compare.migrated_store
private_store = test_compare.private_store

matplotlib.use("Agg")


def test_runs_that_differ_in_seeds_and_bookkeeping_share_a_config_id(tiny_params):
    flat = {key: str(value) for key, value in flatten(tiny_params).items()}
    others = {
        "train.seed": "7",
        "evaluate.seed": "3",
        "train.device": "cuda",
        "train.compile": "True",
        "train.nproc": "2",
        "mlflow.experiment": "elsewhere",
        "mlflow.sweep": "a-sweep",
        "plot.grid_size": "12",
    }
    assert set(others) >= {*SEED_KEYS, "train.device"}
    assert config_id(flat | others) == config_id(flat)
    assert len(config_id(flat)) == 12
    for key, value in {"train.lr": "0.002", "model.latent_dims": "3", "loss.beta": "0.5"}.items():
        assert config_id(flat | {key: value}) != config_id(flat), key
    configuration = [key for key in flat if is_config_key(key)]
    assert "train.epochs" in configuration and "data.binarize" in configuration
    assert not {"train.seed", "mlflow.sweep", "plot.line_count"} & set(configuration)
    assert "plot.*" in BOOKKEEPING_KEYS


def test_welch_s_test_on_numbers_with_known_answers():
    # Equal sizes (3) and variances (1): Welch's df is 2(n - 1) = 4, t = d / sqrt(2/3). At the
    # t-table's two-sided 5 % critical value for 4 degrees of freedom, 2.776445, p is 0.05.
    d = 2.776445 * math.sqrt(2 / 3)
    assert replicates.welch([0, 1, 2], [d, d + 1, d + 2]) == pytest.approx(0.05, abs=1e-5)
    # t = 1 with 4 df, from the closed form of Student's t for 4 degrees of freedom:
    # P(|T| > t) = 1 - t (6 + t^2) / (4 + t^2)^(3/2), at t = 1: 1 - 7 / 5^1.5.
    t1 = math.sqrt(2 / 3)
    assert replicates.welch([0, 1, 2], [t1, t1 + 1, t1 + 2]) == pytest.approx(
        1 - 7 / 5**1.5, abs=1e-9
    )
    assert replicates.noise_call(replicates.welch([1.0, 1.1, 0.9], [5.0, 5.1, 4.9])).startswith(
        "beyond the noise"
    )
    assert replicates.noise_call(replicates.welch([1, 2, 3], [1.5, 2.5, 3.5])).startswith(
        "within the noise (p = 0.5"
    )
    assert replicates.welch([1.0], [2.0, 3.0]) is None
    assert replicates.noise_call(None) == "untested (a side has 1 run)"
    assert replicates.welch([2.0, 2.0], [2.0, 2.0]) == 1.0  # no spread, same mean
    assert replicates.welch([2.0, 2.0], [3.0, 3.0]) == 0.0


def test_configurations_get_means_sds_ranks_and_the_noise_call():
    """Three configurations (lr), runs of two seeds or three: the means and sample standard
    deviations from the statistics module, the ranking by the metric's mean, the calls."""
    values = {  # lr -> the metric of each seed's run
        "0.001": [10.0, 10.4, 9.9],
        "0.002": [10.2, 10.5],
        "0.01": [14.0, 14.2, 13.9],
    }
    table = pd.DataFrame(
        [
            {"run": f"{lr}-{seed}", "train.lr": lr, "train.seed": str(seed), "nll": v, "kl": 2 * v}
            for lr, runs in values.items()
            for seed, v in enumerate(runs)
        ]
    )
    config = table["train.lr"].map(lambda lr: f"c{lr}")
    grouped = replicates.by_config(table, config, "nll", False, ["train.lr", "train.seed"])
    assert list(grouped.columns[:3]) == ["config", "runs", "train.lr"]
    assert "train.seed" not in grouped.columns
    assert list(grouped["train.lr"]) == ["0.001", "0.002", "0.01"]  # means 10.1, 10.35, 14.03
    assert list(grouped["runs"]) == [3, 2, 3]
    for _, row in grouped.iterrows():
        runs = values[row["train.lr"]]
        assert row["nll mean"] == pytest.approx(statistics.mean(runs))
        assert row["nll sd"] == pytest.approx(statistics.stdev(runs))  # n - 1
        assert row["kl mean"] == pytest.approx(2 * statistics.mean(runs))
    assert grouped["vs next"][0].startswith("within the noise")  # 10.1 vs 10.35
    assert grouped["vs next"][1].startswith("beyond the noise")  # 10.35 vs 14.03
    assert grouped["vs next"][2] == ""
    text = replicates.markdown(grouped, ["nll"], ["train.lr", "train.seed"], "nll")
    assert "| config | runs | train.lr | nll | vs next |" in text
    mean, sd = statistics.mean(values["0.001"]), statistics.stdev(values["0.001"])
    assert f"| c0.001 | 3 | 0.001 | {mean:.4f} ± {sd:.4f} |" in text  # the mean to the sd's places
    single = replicates.by_config(table.iloc[:1], config.iloc[:1], "nll", False, [])
    assert math.isnan(single["nll sd"][0])  # one run: no standard deviation


@pytest.fixture
def replicate_store(private_store):
    """Two configurations (latent 2 and 5), two seeds each, and one configuration (latent 10)
    with one seed, in a private store; params as MLflow logs them."""
    from mlflow.entities import Metric, Param

    from vaelab.tracking.store import connect

    tmp_path = private_store
    client, experiment_id = connect("vaelab")
    nll = {(2, 0): 30.0, (2, 1): 31.0, (5, 0): 24.0, (5, 1): 24.6, (10, 0): 24.2}
    for (latent, seed), value in nll.items():
        run_id = client.create_run(experiment_id, run_name=f"z{latent}-s{seed}").info.run_id
        params = {"model.latent_dims": str(latent), "train.seed": str(seed), "train.lr": "0.001"}
        metrics = [Metric("eval/test_iw/nll", value, 0, 0)]
        metrics += [Metric("epoch/test/neg_elbo", value + 3 - e + seed, 0, e) for e in (1, 2)]
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()], metrics=metrics)
        client.set_terminated(run_id, "FINISHED")
    return tmp_path, nll


def test_compare_groups_replicates_into_a_table_a_csv_and_banded_curves(replicate_store):
    folder, nll = replicate_store
    report = folder / "reports" / "comparison.md"
    files = compare.compare("vaelab", report, folder / "figures", log=False)
    by_config = folder / "reports" / "comparison_by_config.csv"
    assert by_config in files and (folder / "figures" / "comparison_curves.png") in files
    rows = list(csv.DictReader(by_config.open()))
    assert [r["model.latent_dims"] for r in rows] == ["10", "5", "2"]  # 24.2, 24.3, 30.5
    mean = {r["model.latent_dims"]: float(r["eval/test_iw/nll mean"]) for r in rows}
    assert mean == pytest.approx(
        {"5": statistics.mean([24.0, 24.6]), "10": 24.2, "2": statistics.mean([30.0, 31.0])}
    )
    sd = {r["model.latent_dims"]: r["eval/test_iw/nll sd"] for r in rows}
    assert float(sd["5"]) == pytest.approx(statistics.stdev([24.0, 24.6]))
    assert sd["10"] == ""  # one run
    assert [r["runs"] for r in rows] == ["1", "2", "2"]
    assert "train.seed" not in rows[0] and "config" in rows[0]
    text = report.read_text()
    assert text.index("## By configuration") < text.index("| run |")
    assert "untested (a side has 1 run)" in text
    per_run = list(csv.DictReader(report.with_suffix(".csv").open()))
    assert len({r["config"] for r in per_run}) == 3


def test_a_comparison_without_replicates_looks_as_before(replicate_store):
    folder, _ = replicate_store
    report = folder / "reports" / "comparison.md"
    stale = folder / "reports" / "comparison_by_config.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("an earlier comparison's\n")
    runs = compare.find_runs("vaelab")
    one_each = list(runs.drop_duplicates("params.model.latent_dims")["run_id"])
    files = compare.compare("vaelab", report, folder / "figures", run_ids=one_each, log=False)
    assert not stale.exists() and stale not in files
    assert "By configuration" not in report.read_text()
    assert "config" not in next(csv.reader(report.with_suffix(".csv").open()))


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's two-sided p and the Welch-Satterthwaite degrees of freedom, from the formulas:
    t = (mean a - mean b) / sqrt(s_a^2/n_a + s_b^2/n_b), and P(|T| > t) for Student's t with df
    degrees of freedom written as the regularised incomplete beta function I_{df/(df+t^2)}(df/2,
    1/2) (mpmath, arbitrary precision), not scipy."""
    import mpmath

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True)), df


def test_welch_s_test_with_unequal_variances_and_sizes():
    """Where Welch's test is not Student's: the Welch-Satterthwaite degrees of freedom, far from
    Student's, and the p-value from the formulas."""
    a, b = [10.0, 10.5, 9.8, 10.1], [11.0, 13.5, 12.2]
    p, df = welch_by_hand(a, b)
    assert 2 < df < 3  # far from Student's len(a) + len(b) - 2 = 5
    assert replicates.welch(a, b) == pytest.approx(p, rel=1e-9)
    assert replicates.welch(b, a) == pytest.approx(p, rel=1e-9)


# Four configurations (train.lr) with 3, 4, 2 and 3 runs, chosen so that "against the next one
# down" and "against the best" give different calls (by welch_by_hand: A-B p = 0.097, B-C 0.13,
# C-D 0.030, but A-C 0.019 and A-D 0.0055).
FOUR = {
    "A": [10.0, 10.3, 9.9],
    "B": [10.4, 10.1, 10.8, 10.5],
    "C": [10.8, 10.7],
    "D": [11.6, 12.4, 11.9],
}


def _four_configurations() -> tuple[pd.DataFrame, pd.Series]:
    table = pd.DataFrame(
        [
            {"run": f"{lr}-{seed}", "train.lr": lr, "train.seed": str(seed), "nll": value}
            for lr, runs in FOUR.items()
            for seed, value in enumerate(runs)
        ]
    )
    return table, table["train.lr"].map(lambda lr: f"c{lr}")


def _expected_call(a: list[float], b: list[float]) -> str:
    p, _ = welch_by_hand(a, b)
    return f"{'within' if p >= 0.05 else 'beyond'} the noise (p = {p:.2g})"


@pytest.mark.parametrize("descending", [False, True])
def test_each_configuration_is_tested_against_the_next_one_down(descending):
    """Ranked by the mean (ascending: A B C D; --descending: D C B A), and each call is Welch's
    test against the configuration right below it, not against the best one."""
    table, config = _four_configurations()
    grouped = replicates.by_config(table, config, "nll", descending, ["train.lr"])
    means = {lr: statistics.mean(runs) for lr, runs in FOUR.items()}
    order = sorted(FOUR, key=means.get, reverse=descending)
    assert order == (["D", "C", "B", "A"] if descending else ["A", "B", "C", "D"])
    assert list(grouped["train.lr"]) == order, "the ranking ignores --descending"
    expected = [_expected_call(FOUR[a], FOUR[b]) for a, b in zip(order, order[1:], strict=False)]
    assert list(grouped["vs next"]) == [*expected, ""]
    # The calls against the best differ from these: the test can tell the two apart.
    best = [_expected_call(FOUR[order[0]], FOUR[b]) for b in order[1:]]
    assert best != expected


def test_descending_ranks_the_configurations_from_the_highest_mean(replicate_store, capsys):
    """`make compare COMPARE_ARGS=--descending` on the hand-made replicates: the per-
    configuration CSV from the highest IW-NLL mean down (2: 30.5, 5: 24.3, 10: 24.2)."""
    folder, nll = replicate_store
    report = folder / "reports" / "comparison.md"
    args = ["--params", "unused.yaml", "--experiment", "vaelab", "--report", str(report)]
    compare.main([*args, "--figures", str(folder / "figures"), "--descending", "--no-log"])
    rows = list(csv.DictReader((folder / "reports" / "comparison_by_config.csv").open()))
    means = {}
    for (latent, _), value in nll.items():
        means.setdefault(str(latent), []).append(value)
    expected = sorted(means, key=lambda latent: statistics.mean(means[latent]), reverse=True)
    assert [r["model.latent_dims"] for r in rows] == expected == ["2", "5", "10"]


def test_each_configuration_s_band_is_drawn_from_its_own_runs():
    """compare.config_curves, what the banded figure draws: by epoch, the mean, minimum and
    maximum of each configuration's own runs, from hand-made histories (one run of "x" lacks
    epoch 3; "z" has one run, so its band is its line)."""
    histories = {
        "x0": [(1, 30.0), (2, 25.0), (3, 22.0)],
        "x1": [(1, 34.0), (2, 27.0)],
        "x2": [(1, 29.0), (2, 26.0), (3, 24.0)],
        "y0": [(1, 50.0), (2, 45.0), (3, 41.0)],
        "y1": [(1, 54.0), (2, 44.0), (3, 43.0)],
        "z0": [(1, 70.0), (2, 60.0), (3, 55.0)],
    }
    table = pd.DataFrame({"run_id": list(histories), "config": [i[0] for i in histories]})
    grouped = pd.DataFrame({"config": ["y", "x", "z"], "runs": [2, 3, 1]})
    curves = compare.config_curves(table, grouped, histories)
    assert set(curves) == {"x", "y", "z"}
    for key, curve in curves.items():
        own = [dict(history) for run_id, history in histories.items() if run_id[0] == key]
        for epoch in (1, 2, 3):
            values = [run[epoch] for run in own if epoch in run]
            assert curve.loc[epoch, "mean"] == pytest.approx(statistics.mean(values)), key
            assert curve.loc[epoch, "min"] == min(values), key
            assert curve.loc[epoch, "max"] == max(values), key


# Two configurations with a validation split whose validation and test numbers rank them in
# opposite orders (A is better on validation, B on test), and one without a validation split
# (C: data.validation 0) whose test numbers beat both.
CHOOSING = {
    "A": {"lr": "0.001", "validation": "10000", "val": [80.0, 80.4, 80.2], "test": [90.0, 90.5]},
    "B": {"lr": "0.002", "validation": "10000", "val": [81.0, 81.5, 81.1], "test": [85.0, 85.3]},
    "C": {"lr": "0.003", "validation": "0", "val": [], "test": [70.2, 70.0]},
}


@pytest.fixture
def choosing_store(private_store):
    """The runs of ``CHOOSING`` (A and B: three seeds, the third with a test number of
    test[0] + 0.1; C: two seeds) in a private store, with the evaluation metrics a run has and
    per-epoch held-out curves (epoch/val/* with a validation split, epoch/test/* without)."""
    from mlflow.entities import Metric, Param

    from vaelab.tracking.store import connect

    client, experiment_id = connect("vaelab")
    for name, spec in CHOOSING.items():
        seeds = max(len(spec["val"]), len(spec["test"]))
        for seed in range(seeds):
            run_id = client.create_run(experiment_id, run_name=f"{name}{seed}").info.run_id
            params = {"train.lr": spec["lr"], "train.seed": str(seed)}
            params["data.validation"] = spec["validation"]
            test = spec["test"][seed] if seed < len(spec["test"]) else spec["test"][0] + 0.1
            metrics = [Metric("eval/test_iw/nll", test, 0, 2), Metric("eval/test/kl", 3.0, 0, 2)]
            split = "val" if spec["val"] else "test"
            if spec["val"]:
                metrics += [Metric("eval/val_iw/nll", spec["val"][seed], 0, 2)]
                metrics += [Metric("eval/val/neg_elbo", spec["val"][seed] - 60, 0, 2)]
            metrics += [Metric(f"epoch/{split}/neg_elbo", 50.0 - e, 0, e) for e in (1, 2)]
            metrics += [Metric("epoch_seconds", 2.0, 0, e) for e in (1, 2)]
            client.log_batch(run_id, [*metrics], [Param(k, v) for k, v in params.items()])
            client.set_terminated(run_id, "FINISHED")
    return private_store


def test_validation_ranks_the_configurations_and_test_is_only_reported(choosing_store):
    folder = choosing_store
    report = folder / "reports" / "comparison.md"
    compare.compare("vaelab", report, folder / "figures", log=False)
    rows = list(csv.DictReader(report.with_name("comparison_by_config.csv").open()))
    assert [r["train.lr"] for r in rows] == ["0.001", "0.002", "0.003"]  # A, B, then C
    assert [r["ranked_by"] for r in rows] == ["eval/val_iw/nll"] * 2 + ["eval/test_iw/nll"]
    p, _ = welch_by_hand(CHOOSING["A"]["val"], CHOOSING["B"]["val"])
    assert rows[0]["vs next"] == f"{'within' if p >= 0.05 else 'beyond'} the noise (p = {p:.2g})"
    assert rows[1]["vs next"] == "not comparable (eval/val_iw/nll against eval/test_iw/nll)"
    runs = list(csv.DictReader(report.with_suffix(".csv").open()))
    # Per run: A's by validation, then B's, then C's by test, however good C's test numbers.
    assert [r["run"] for r in runs] == ["A0", "A2", "A1", "B0", "B2", "B1", "C1", "C0"]
    assert "eval/test/kl" in runs[0]  # the CSV keeps every column
    text = report.read_text()
    assert "6 runs have a validation split and are ranked first" in text
    assert "the 2 without one (`data.validation: 0`) follow" in text
    assert "| run | eval/val_iw/nll | eval/test_iw/nll (reported) | data.validation |" in text
    assert "| config | runs | data.validation | train.lr | eval/val_iw/nll | " in text
    assert "eval/test/kl" not in text  # the markdown shows a few columns to read
    histories, keys = compare.heldout_histories([r["run_id"] for r in runs])
    assert [keys[r["run_id"]] for r in runs] == ["epoch/val/neg_elbo"] * 6 + [
        "epoch/test/neg_elbo"
    ] * 2
    assert histories[runs[0]["run_id"]] == [(1, 49.0), (2, 48.0)]


def test_without_any_validation_split_the_report_says_the_test_set_chose(choosing_store):
    folder = choosing_store
    report = folder / "reports" / "comparison.md"
    runs = compare.find_runs("vaelab", "params.`data.validation` = '0'")
    compare.compare("vaelab", report, folder / "figures", run_ids=list(runs["run_id"]), log=False)
    text = report.read_text()
    assert "Ranked by the test set's `eval/test_iw/nll`: these runs have no validation split" in (
        text
    )
    assert [r["run"] for r in csv.DictReader(report.with_suffix(".csv").open())] == ["C1", "C0"]
