"""Compare tracked runs: one table and a few figures, read from MLflow (``make compare``).

    python -m vaelab.compare --params params.yaml --report reports/comparison.md \
        --figures reports/comparison [--filter "tags.sweep = 'latent-dims'"] [--run-ids ID ...] \
        [--metric eval/test_iw/nll] [--experiment NAME] [--no-log]

Reads the FINISHED runs of the experiment (``mlflow.search_runs``, a pandas DataFrame) and
writes:
- ``<report>.md`` and ``.csv``: one row per run with its name, DVC experiment, commit, the params
  that vary across the selected runs (the constant ones are listed once above the table), the
  final losses, the evaluation metrics the runs have, and the median epoch time; sorted by
  ``--metric``;
- ``<figures>/comparison_curves.png``: per-epoch test negative ELBO of every run;
- ``<figures>/comparison_<param>.png``: ``--metric`` against each varying numeric param;
- ``<figures>/comparison_latents.png``: the runs' latent scatters side by side;
and logs them all so they open from the MLflow UI: into a sweep's parent run when the runs are
exactly its children (all of them, in any status; a parent that ended FAILED or KILLED is left as
it is), else into a run named "comparison" (tag ``vaelab.kind = comparison``). Params and metrics
come from the runs themselves, not from a list here.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd

from vaelab import params as params_mod
from vaelab import replicates
from vaelab.errors import VaelabError, run_stage
from vaelab.ranking import RANK_METRIC, Ranking, rank
from vaelab.tracking.comparison import log_comparison
from vaelab.tracking.queries import download_artifact, find_runs, metric_history
from vaelab.tracking.sweeps import fail_sweep

# The CSV's metric columns: per-epoch metrics (their last value is the final one) and evaluation
# metrics, in table order; a column appears only when some selected run has it. (The ranking
# metric and its test-set twin come first.)
METRIC_PREFIXES = (
    "epoch/train/neg_elbo",
    "epoch/val/neg_elbo",
    "epoch/val/recon",
    "epoch/val/kl",
    "epoch/test/neg_elbo",
    "epoch/test/recon",
    "epoch/test/kl",
    "train.best_epoch",
    "eval/val/",
    "eval/val_iw/",
    "eval/val_latent/",
    "eval/test/",
    "eval/test_iw/",
    "eval/latent/active_units",
    "eval/latent/probe_accuracy",
)
# The markdown tables are for reading: after the ranking metric and its test-set twin, these
# few, where some run has them (the CSVs keep every column). The validation ELBO is what the
# curves show; the probe and the active units say what the latent space holds; the best epoch
# says whether training had finished improving; the epoch time is the price.
READ_COLUMNS = (
    "eval/val/neg_elbo",
    "eval/val_latent/probe_accuracy",
    "eval/latent/active_units",
    "train.best_epoch",
    "epoch_seconds",
)
# The per-epoch curve: the validation split's, the test set's for a run without one.
CURVE_METRICS = ("epoch/val/neg_elbo", "epoch/test/neg_elbo")
DEFAULT_METRIC = RANK_METRIC  # also make register's
RANKED_BY, RANK_VALUE = "ranked_by", "rank_value"  # the per-run table's ranking columns


def varying_and_constant(runs: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """Param names (without ``params.``) that differ between runs, and the others' one value."""
    varying, constant = [], {}
    for column in sorted(c for c in runs.columns if c.startswith("params.")):
        values = runs[column].fillna("(unset)").astype(str)
        name = column.removeprefix("params.")
        if values.nunique() > 1:
            varying.append(name)
        else:
            constant[name] = values.iloc[0]
    return varying, constant


def metric_columns(
    runs: pd.DataFrame, metric: str | None = None, twin: str | None = None
) -> list[str]:
    present = [c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")]
    chosen = [m for m in (metric, twin) if m in present]
    for prefix in METRIC_PREFIXES:
        chosen += sorted(
            m
            for m in present
            if m.startswith(prefix) and m not in chosen and runs[f"metrics.{m}"].notna().any()
        )
    return chosen


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def build_table(
    runs: pd.DataFrame, metric: str, descending: bool
) -> tuple[pd.DataFrame, list[str], dict[str, str], Ranking]:
    """The comparison table (one row per run, best first by ``vaelab.ranking``: ``metric``, its
    test-set twin for runs without a validation split, after the others), the names of the
    params that vary (its param columns), the constant params with their one value, and the
    ranking. ``ranked_by``/``rank_value``: the metric each run is ranked by and its value."""
    ranking = rank(runs, metric)
    if ranking.value.isna().all():
        available = (
            ", ".join(
                sorted(
                    c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")
                )
            )
            or "none"
        )
        twin = f" (nor its test-set twin '{ranking.twin}')" if ranking.twin else ""
        raise VaelabError(
            f"no selected run has the metric '{metric}'{twin}; choose --metric from: {available}."
        )
    varying, constant = varying_and_constant(runs)

    def tag(name: str) -> pd.Series:
        return runs.get(f"tags.{name}", pd.Series("", index=runs.index)).fillna("")

    table = pd.DataFrame(
        {
            "run": tag("mlflow.runName"),
            "dvc_experiment": tag("dvc.exp_name"),
            "commit": tag("git.commit").str[:7],
            "run_id": runs["run_id"],
        }
    )
    for name in varying:
        table[name] = runs[f"params.{name}"]
    for name in metric_columns(runs, metric, ranking.twin):
        table[name] = runs[f"metrics.{name}"]
    table["epoch_seconds"] = [
        pd.Series([v for _, v in metric_history(run_id, "epoch_seconds")]).median()
        for run_id in runs["run_id"]
    ]
    table[RANKED_BY] = ranking.split.map({"val": metric, "test": ranking.twin, "": metric}).where(
        ranking.value.notna(), ""
    )
    table[RANK_VALUE] = ranking.value
    table = table.loc[ranking.order(descending)]
    return table.reset_index(drop=True), varying, constant, ranking


def _cell(value: object, counts: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if counts:
            return str(int(value))  # a column of whole numbers: active units, samples
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    return "(unset)" if value is None else str(value).replace("|", "\\|")


def reported(twin: str | None) -> str:
    """The header of the test-set twin's column: shown, not used to choose."""
    return f"{twin} (reported)"


def read_columns(table: pd.DataFrame, ranking: Ranking, varying: list[str]) -> list[str]:
    """The per-run markdown's columns: the run, the ranking metric, its test-set twin, the
    varying params, ``READ_COLUMNS`` (those some run has), the commit."""
    lead = [c for c in (ranking.metric, ranking.twin) if c in table.columns]
    read = [c for c in READ_COLUMNS if c in table.columns and c not in lead]
    return ["run", *lead, *varying, *read, "commit"]


def markdown(
    table: pd.DataFrame,
    constant: dict[str, str],
    title: str,
    ranking: Ranking,
    shown: list[str],
) -> str:
    """The per-run table: ``shown`` columns (``read_columns``), ranked as ``ranking`` says."""
    lines = [
        f"# {title}",
        "",
        f"{len(table)} runs, best first. {ranking.note} Losses in nats per image; "
        "`epoch_seconds` is the median training time of an epoch. Every column (each run's "
        "DVC experiment and every metric) is in the CSV beside this file.",
        "",
    ]
    if constant:
        lines += ["Same in every run: " + ", ".join(f"`{k}={v}`" for k, v in constant.items()), ""]
    headers = [reported(c) if c == ranking.twin else c for c in shown]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(shown))
    counts = {
        c: pd.api.types.is_float_dtype(table[c]) and bool((table[c].dropna() % 1 == 0).all())
        for c in shown
    }
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], counts[c]) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _label(row: pd.Series, params: list[str]) -> str:
    """The run's name and the values of the varying params (at most three)."""
    name = row["run"] or row["run_id"][:8]
    values = ", ".join(f"{p.split('.')[-1]}={row[p]}" for p in params[:3])
    return f"{name} ({values})" if values else name


def config_curves(
    table: pd.DataFrame, grouped: pd.DataFrame, histories: dict[str, list[tuple[int, float]]]
) -> dict[str, pd.DataFrame]:
    """Each configuration of ``grouped`` (its runs: the rows of ``table`` with its ``config``)
    as a frame indexed by epoch, columns ``mean``, ``min`` and ``max`` of its runs' values in
    ``histories`` ({run id: [(epoch, value)]}); an epoch some runs lack is over the others."""
    curves = {}
    for key in grouped["config"]:
        ids = table.loc[table["config"] == key, "run_id"]
        values = pd.DataFrame({i: dict(histories[i]) for i in ids}, dtype=float).sort_index()
        curves[key] = pd.DataFrame(
            {"mean": values.mean(axis=1), "min": values.min(axis=1), "max": values.max(axis=1)}
        )
    return curves


def heldout_histories(
    run_ids: list[str],
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """Each run's per-epoch held-out negative ELBO, [(epoch, value)], and the metric it is: the
    validation split's, the test set's for a run without one (``CURVE_METRICS``)."""
    histories, keys = {}, {}
    for run_id in run_ids:
        for key in CURVE_METRICS:
            histories[run_id] = metric_history(run_id, key)
            if histories[run_id]:
                keys[run_id] = key
                break
    return histories, keys


def plot_curves(
    table: pd.DataFrame, params: list[str], path: Path, grouped: pd.DataFrame | None = None
) -> None:
    """The held-out negative ELBO per epoch of every run (the validation split's; the test
    set's for a run without one); with ``grouped`` (seed replicates), each configuration's mean
    over its runs with a band from their minimum to their maximum."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    histories, keys = heldout_histories(list(table["run_id"]))
    used = set(keys.values())
    if grouped is None:
        for _, row in table.iterrows():
            if histories[row["run_id"]]:
                curve = zip(*histories[row["run_id"]], strict=True)
                ax.plot(*curve, marker=".", label=_label(row, params))
    else:
        curves = config_curves(table, grouped, histories)
        shown = [p for p in params if p in grouped.columns][:3]
        for _, config in grouped.iterrows():
            curve = curves[config["config"]]
            values = ", ".join(f"{p.split('.')[-1]}={config[p]}" for p in shown)
            label = f"{values or config['config']} ({config['runs']} runs)"
            (line,) = ax.plot(curve.index, curve["mean"], marker=".", label=label)
            ax.fill_between(
                curve.index, curve["min"], curve["max"], color=line.get_color(), alpha=0.2
            )
    val, test = CURVE_METRICS
    title = {
        frozenset({val}): "Validation negative ELBO",
        frozenset({test}): "Test negative ELBO (no validation split)",
    }.get(frozenset(used), "Validation (test without a split) negative ELBO")
    if grouped is not None:
        title += "\n(mean of each configuration's runs, band: their min to max)"
    ylabel = " / ".join(k for k in CURVE_METRICS if k in used) or CURVE_METRICS[0]
    ax.set(xlabel="epoch", ylabel=f"{ylabel} (nats/image)", title=title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_against_params(table: pd.DataFrame, params: list[str], metric: str, folder: Path):
    """One figure per varying param whose values are all numbers, against each run's ranking
    value (``metric``, its test-set twin for a run without a validation split); returns the
    files."""
    import matplotlib.pyplot as plt

    written = []
    for name in params:
        xs = [_number(v) for v in table[name]]
        if any(x is None for x in xs):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(xs, table[RANK_VALUE], "o")
        for x, y, label in zip(xs, table[RANK_VALUE], table["run"], strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
            ax.minorticks_off()
        values = sorted(set(xs))
        if len(values) <= 12:  # label the values the runs have, not powers of ten
            ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.set(xlabel=name, ylabel=metric, title=f"{metric} vs {name}")
        if table[RANKED_BY].nunique() > 1:  # some runs ranked by the test-set twin
            ax.set_ylabel(f"{metric} (test-set twin without a validation split)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"comparison_{_safe(name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_latents(table: pd.DataFrame, params: list[str], path: Path) -> None:
    """Each run's logged figures/latent_scatter.png, side by side (a gap says it is missing)."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    count = len(table)
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    with tempfile.TemporaryDirectory() as scratch:
        for ax, (i, row) in zip(axes.flat, table.iterrows(), strict=False):
            local = download_artifact(
                row["run_id"], "figures/latent_scatter.png", Path(scratch) / str(i)
            )
            if local is not None:
                ax.imshow(mpimg.imread(local))
            else:
                ax.text(0.5, 0.5, "no latent_scatter.png", ha="center", va="center")
            ax.set_title(_label(row, params), fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(
    experiment: str,
    report: Path,
    figures: Path,
    filter_string: str = "",
    run_ids: list[str] = (),
    metric: str = DEFAULT_METRIC,
    descending: bool = False,
    log: bool = True,
    expect_runs: int | None = None,
) -> list[Path]:
    """Write the report, its CSV and the figures, log them to a comparison run; return them."""
    runs = find_runs(experiment, filter_string, list(run_ids))
    if runs.empty:
        where = f" matching {filter_string!r}" if filter_string else ""
        raise VaelabError(f"no FINISHED runs in experiment '{experiment}'{where}.")
    if expect_runs is not None and len(runs) != expect_runs:
        raise VaelabError(
            f"expected {expect_runs} FINISHED runs matching {filter_string!r}, found {len(runs)}: "
            "an experiment failed or is still running; see dvc queue status / dvc queue logs."
        )
    table, varying, constant, ranking = build_table(runs, metric, descending)
    report.parent.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    title = f"Comparison: experiment `{experiment}`" + (
        f", `{filter_string}`" if filter_string else ""
    )
    shown = read_columns(table, ranking, varying)
    text = markdown(table, constant, title, ranking, shown)
    csv_path = report.with_suffix(".csv")
    by_config_path = report.with_name(f"{report.stem}_by_config.csv")
    config = replicates.configs(runs).set_axis(runs["run_id"]).reindex(table["run_id"])
    grouped = None
    if replicates.replicated(config):  # seed replicates: the per-configuration table first
        grouped = replicates.by_config(table, config, metric, descending, varying)
        numbers = [
            c for c in shown if c in table.columns and pd.api.types.is_numeric_dtype(table[c])
        ]
        text = replicates.markdown(grouped, numbers, varying, ranking) + "\n" + text
        table.insert(1, "config", config.to_numpy())
        grouped.to_csv(by_config_path, index=False)
    else:
        by_config_path.unlink(missing_ok=True)  # an earlier comparison's, not this one's
    report.write_text(text)
    table.to_csv(csv_path, index=False)
    files = [report, csv_path, *([by_config_path] if grouped is not None else [])]
    files.append(figures / "comparison_curves.png")
    plot_curves(table, varying, files[-1], grouped)
    files += plot_against_params(table, varying, metric, figures)
    files.append(figures / "comparison_latents.png")
    plot_latents(table, varying, files[-1])
    if log:
        # Each run's parent: the report goes into a sweep's parent run when the runs are all
        # of its children (vaelab.tracking.comparison checks that against MLflow).
        column = runs.get("tags.mlflow.parentRunId", pd.Series(None, index=runs.index))
        parents = [p if isinstance(p, str) and p else None for p in column]
        run_id, why = log_comparison(experiment, files, list(table["run_id"]), parents)
        print(f"compare: logged to MLflow run {run_id} (artifacts under comparison/)")
        if why:
            print(f"compare: a run of its own, not the sweep's parent: {why}")
    print(f"compare: {len(table)} runs -> {report}, {csv_path}, figures in {figures}")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="for mlflow.experiment")
    parser.add_argument("--report", type=Path, required=True, help="the .md (the .csv beside it)")
    parser.add_argument("--figures", type=Path, required=True, help="folder for the figures")
    parser.add_argument("--experiment", help="MLflow experiment (default: params.yaml's)")
    parser.add_argument("--filter", default="", help="MLflow filter, e.g. \"tags.sweep = 'x'\"")
    parser.add_argument("--run-ids", nargs="*", default=[], help="compare only these runs")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="rank by this metric")
    parser.add_argument("--descending", action="store_true", help="higher is better")
    parser.add_argument("--no-log", action="store_true", help="do not log a comparison run")
    parser.add_argument("--expect-runs", type=int, help="fail unless exactly this many runs match")
    parser.add_argument(
        "--sweep", help="the sweep label whose parent run this completes (FAILED if it cannot)"
    )
    args = parser.parse_args(argv)
    experiment = args.experiment or params_mod.load(args.params).mlflow.experiment
    try:
        compare(
            experiment,
            args.report,
            args.figures,
            args.filter,
            args.run_ids,
            args.metric,
            args.descending,
            log=not args.no_log,
            expect_runs=args.expect_runs,
        )
    except VaelabError as error:
        # A sweep whose comparison cannot be made (an experiment failed) ends its parent run,
        # which would otherwise stay RUNNING in the UI.
        if args.sweep and fail_sweep(experiment, args.sweep, str(error)):
            print(f"compare: sweep '{args.sweep}' parent run marked FAILED", file=sys.stderr)
        raise


if __name__ == "__main__":
    run_stage(main)
