"""Seed replicates in a comparison: runs of one configuration (the same params but for seeds and
bookkeeping, ``vaelab.params.config_id``) grouped, each metric's mean and sample standard
deviation over them, and whether two configurations differ beyond the run-to-run noise.

The noise call is Welch's t-test (two-sided, alpha = 0.05) on the ranking metric of the two
configurations' runs: it compares means without assuming equal variances (another latent size
may well vary more from seed to seed), and it works from the handful of runs a sweep has. A
bootstrap interval over runs (rliable's approach) needs more: with 3 runs a percentile bootstrap
has 10 distinct resampled means. "Within the noise" means the test cannot tell the two apart at
that level, not that they are equal.
"""

from __future__ import annotations

import math

import pandas as pd

from vaelab.params import config_id, is_config_key
from vaelab.ranking import Ranking, rank

NOISE_TEST = "Welch's t-test"
ALPHA = 0.05


def configs(runs: pd.DataFrame) -> pd.Series:
    """Each run's configuration id, from its logged params (``params.*`` columns) as the runs'
    ``vaelab.config`` tag holds it."""
    columns = [c for c in runs.columns if c.startswith("params.")]

    def one(row: pd.Series) -> str:
        flat = {c.removeprefix("params."): row[c] for c in columns if isinstance(row[c], str)}
        return config_id(flat)

    return runs.apply(one, axis=1) if len(runs) else pd.Series(dtype=str)


def replicated(config: pd.Series) -> bool:
    """Whether some configuration has more than one run: then the report groups them."""
    return bool((config.value_counts() > 1).any())


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test for equal means; None when a side has fewer than two
    values. Two sets without any spread: 1 for equal means, 0 for different ones."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    if pd.Series(a).std() == 0 and pd.Series(b).std() == 0:
        return 1.0 if pd.Series(a).mean() == pd.Series(b).mean() else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def noise_call(p: float | None) -> str:
    if p is None:
        return "untested (a side has 1 run)"
    verdict = "within the noise" if p >= ALPHA else "beyond the noise"
    return f"{verdict} (p = {p:.2g})"


def by_config(
    table: pd.DataFrame, config: pd.Series, metric: str, descending: bool, varying: list[str]
) -> pd.DataFrame:
    """One row per configuration of the per-run ``table`` (its runs in the order of
    ``config``; its ``ranked_by``/``rank_value`` columns say what each run is ranked by,
    ``vaelab.compare.build_table``): ``config``, ``runs``, the params in ``varying`` that are
    configuration keys, ``ranked_by``, then ``<column> mean`` and ``<column> sd`` (sample sd,
    n - 1; NaN for one run) for every numeric column; ranked by the mean of ``rank_value``
    (``metric`` itself in a table without it)
    (lowest first, highest with ``descending``), the configurations ranked by another metric
    than ``metric`` (its test-set twin: no validation split) after the others; ``vs next``: the
    noise call against the next configuration down the ranking."""
    table = table.assign(config=config.to_numpy())
    if "rank_value" not in table.columns:  # a table ranked by ``metric`` alone
        table = table.assign(ranked_by=metric, rank_value=table[metric])
    numeric = [
        c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and c != "rank_value"
    ]
    params = [p for p in varying if is_config_key(p)]
    rows, values = [], {}
    for key, runs in table.groupby("config", sort=False):
        row = {"config": key, "runs": len(runs)}
        row |= {p: runs[p].iloc[0] for p in params}
        # One configuration, one validation split (data.validation is a configuration key).
        row["ranked_by"] = runs["ranked_by"].iloc[0]
        for column in numeric:
            row[f"{column} mean"] = runs[column].mean()
            row[f"{column} sd"] = runs[column].std(ddof=1) if len(runs) > 1 else math.nan
        rows.append(row)
        values[key] = runs["rank_value"].dropna().tolist()
    grouped = pd.DataFrame(rows)
    # Each configuration's mean of what its runs are ranked by (its ranked_by column's).
    mean = pd.Series(
        [pd.Series(values[k], dtype=float).mean() for k in grouped["config"]],
        index=grouped.index,
    )
    # 0: ranked by ``metric``, 1: by its twin (not comparable with it), 2: by nothing.
    group = (grouped["ranked_by"] != metric).astype(int).mask(mean.isna(), 2)
    key = pd.DataFrame({"group": group, "value": -mean if descending else mean})
    grouped = grouped.loc[key.sort_values(["group", "value"], kind="stable").index]
    keys = list(grouped["config"])
    metrics = dict(zip(grouped["config"], grouped["ranked_by"], strict=True))
    calls = [
        noise_call(welch(values[a], values[b]))
        if metrics[a] == metrics[b]
        else f"not comparable ({metrics[a]} against {metrics[b]})"
        for a, b in zip(keys, keys[1:], strict=False)
    ]
    grouped["vs next"] = [*calls, ""]
    return grouped.reset_index(drop=True)


def _mean_sd(row: pd.Series, column: str) -> str:
    mean, sd = row[f"{column} mean"], row[f"{column} sd"]
    if isinstance(mean, float) and math.isnan(mean):
        return ""
    if isinstance(sd, float) and math.isnan(sd):
        return f"{mean:.4f}" if abs(mean) < 1 else f"{mean:.2f}"
    # The mean to the sd's decimals: 738.5851 ± 0.0114 vs 738.6133 ± 0.0108, where two decimals
    # (738.59, 738.61) would hide most of a difference the noise test calls real.
    places = 4 if abs(sd) < 1 or abs(mean) < 1 else 2
    return f"{mean:.{places}f} ± {sd:.{places}f}"


# What a configuration is, as the per-configuration table says it (a search says its own).
CONFIG_IS = "runs equal but for seeds and bookkeeping keys; their `vaelab.config` tag"


def markdown(
    grouped: pd.DataFrame,
    metrics: list[str],
    params: list[str],
    ranking: Ranking | str,
    config_is: str = CONFIG_IS,
) -> str:
    """The per-configuration table: mean ± sd over each configuration's runs of ``metrics``
    (the ranking metric and its test-set twin first, then a few to read), ranked as
    ``ranking`` says (a ``vaelab.ranking.Ranking``, or the name of the one metric);
    ``config_is`` says what a configuration is."""
    if isinstance(ranking, str):
        ranking = rank(pd.DataFrame(), ranking)
    metric, twin = ranking.metric, ranking.twin
    lines = [
        "## By configuration",
        "",
        f"{len(grouped)} configurations ({config_is}), best first by the mean of the metric "
        "each is ranked by. "
        f"{ranking.note} Each cell is the mean ± the sample standard deviation over the "
        f"configuration's runs. `vs next`: {NOISE_TEST} (two-sided, alpha = {ALPHA}) of "
        "that metric against the next configuration down.",
        "",
    ]
    params = [p for p in params if p in grouped.columns]
    lead = [m for m in (metric, twin) if m in metrics]
    rest = [m for m in metrics if m not in lead]
    headers = [f"{twin} (reported)" if m == twin else m for m in lead]
    lines.append("| " + " | ".join(["config", "runs", *params, *headers, "vs next", *rest]) + " |")
    lines.append("|" + "---|" * (3 + len(params) + len(lead) + len(rest)))
    for _, row in grouped.iterrows():
        cells = [row["config"], str(row["runs"]), *(str(row[p]) for p in params)]
        cells += [_mean_sd(row, m) for m in lead]
        cells += [row["vs next"], *(_mean_sd(row, m) for m in rest)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
