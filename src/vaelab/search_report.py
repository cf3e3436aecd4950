"""The search's report (``reports/search.md`` and its figures), from plain records of its trials
and the MLflow runs of its confirmations: what was tried, what was pruned, which configurations
the confirmation could tell apart, and the winner's test number, once.

No Optuna and no MLflow calls here: ``vaelab.search`` hands in the trials (``TrialRecord``), the
confirmation runs (``find_runs``' DataFrame) and the parameter importances.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vaelab import replicates
from vaelab.experiments import duration
from vaelab.ranking import on_test_set

STATES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class TrialRecord:
    """One search trial as the study holds it."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    params: dict[str, object]  # the searched keys' values
    value: float | None  # the metric (COMPLETE), else None
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> per-epoch value reported
    seconds: float | None = None  # from start to end
    pruned_epoch: int | None = None
    reason: str = ""  # why it failed
    counted: bool = True  # False: interrupted or withdrawn, not part of the trials


@dataclass(frozen=True)
class Verdict:
    """What the confirmation says: the winner's trial number (None when none is named), the
    configurations within the noise of the best (best first; the best alone with a winner), the
    sentence to print, and the winner's test-set number (mean, sd, runs, metric)."""

    winner: int | None
    tied: tuple[int, ...]
    text: str
    test: tuple[float, float, int, str] | None = None


def is_better(a: float, b: float, direction: str) -> bool:
    return a < b if direction == "minimize" else a > b


def running_best(records: list[TrialRecord], direction: str) -> list[tuple[int, float]]:
    """(trial number, best value among the COMPLETE trials up to it), for each COMPLETE trial
    in number order."""
    best, points = None, []
    for record in sorted(records, key=lambda r: r.number):
        if record.state != "COMPLETE" or record.value is None:
            continue
        if best is None or is_better(record.value, best, direction):
            best = record.value
        points.append((record.number, best))
    return points


def best_trial(records: list[TrialRecord], direction: str) -> TrialRecord | None:
    """The COMPLETE trial with the best value (the lowest number of equals)."""
    done = [r for r in records if r.state == "COMPLETE" and r.value is not None]
    if not done:
        return None
    sign = 1 if direction == "minimize" else -1
    return min(done, key=lambda r: (sign * r.value, r.number))


def top_configurations(records: list[TrialRecord], direction: str, top: int) -> list[TrialRecord]:
    """The ``top`` best COMPLETE trials with distinct params (a configuration tried twice counts
    once, as its better trial), best first."""
    sign = 1 if direction == "minimize" else -1
    done = sorted(
        (r for r in records if r.state == "COMPLETE" and r.value is not None),
        key=lambda r: (sign * r.value, r.number),
    )
    chosen, seen = [], set()
    for record in done:
        key = tuple(sorted((k, repr(v)) for k, v in record.params.items()))
        if key not in seen:
            seen.add(key)
            chosen.append(record)
    return chosen[:top]


def test_metric(metric: str) -> str:
    """The test-set metric reported for the winner: the validation metric's twin; for a
    per-epoch metric, the evaluation's of the same kind (eval/test/...)."""
    twin = on_test_set(metric) or metric
    return twin.replace("epoch/test/", "eval/test/", 1)


def confirmation_table(runs: pd.DataFrame, metric: str, space: list[str]) -> pd.DataFrame:
    """The confirmation runs as by_config's per-run table: the metric, its test-set twin, the
    searched params, and the trial each repeats (``config``: "trial N")."""
    twin = test_metric(metric)
    table = pd.DataFrame(
        {
            "config": "trial " + runs["tags.vaelab.confirms"].astype(str),
            "run_id": runs["run_id"],
            "seed": runs.get("params.train.seed", pd.Series("", index=runs.index)),
        }
    )
    for key in space:
        table[key] = runs.get(f"params.{key}", pd.Series("", index=runs.index))
    for name in (metric, twin):
        column = f"metrics.{name}"
        table[name] = runs[column].astype(float) if column in runs else math.nan
    return table


def decide(table: pd.DataFrame, metric: str, direction: str) -> tuple[pd.DataFrame, Verdict]:
    """The per-configuration table (``replicates.by_config``: mean ± sd over the seeds, Welch's
    test against the next one down) and the verdict: a winner only when the best configuration's
    runs beat the runner-up's beyond the noise (p < alpha); else the configurations within the
    noise of the best."""
    descending = direction == "maximize"
    config = table["config"]
    grouped = replicates.by_config(table.drop(columns="config"), config, metric, descending, [])
    values = {
        key: table.loc[table["config"] == key, metric].dropna().tolist()
        for key in grouped["config"]
    }
    keys = [k for k in grouped["config"] if values[k]]
    number = {k: int(k.split()[-1]) for k in keys}
    if not keys:
        return grouped, Verdict(None, (), "No confirmation run finished: no winner is named.")
    best = keys[0]
    if len(keys) == 1:
        text = f"Only {best} was confirmed, so there is no runner-up to beat: no winner is named."
        return grouped, Verdict(None, (number[best],), text)
    runner_up = keys[1]
    p = replicates.welch(values[best], values[runner_up])
    mean = {k: sum(values[k]) / len(values[k]) for k in keys}
    if p is not None and p < replicates.ALPHA:
        text = (
            f"Winner: {best} ({metric} {mean[best]:.4f} over {len(values[best])} seeds) beats "
            f"the runner-up {runner_up} ({mean[runner_up]:.4f}) beyond the seed noise "
            f"({replicates.NOISE_TEST}, p = {p:.2g} < {replicates.ALPHA})."
        )
        twin = test_metric(metric)
        tested = table.loc[table["config"] == best, twin].dropna()
        test = None
        if len(tested):
            sd = float(tested.std(ddof=1)) if len(tested) > 1 else math.nan
            test = (float(tested.mean()), sd, len(tested), twin)
        return grouped, Verdict(number[best], (number[best],), text, test)
    tied = [best]
    for other in keys[1:]:
        p_other = replicates.welch(values[best], values[other])
        if p_other is None or p_other >= replicates.ALPHA:
            tied.append(other)
    why = "untested (a side has 1 run)" if p is None else f"p = {p:.2g} >= {replicates.ALPHA}"
    text = (
        f"No winner: {best} ({mean[best]:.4f}) does not beat the runner-up {runner_up} "
        f"({mean[runner_up]:.4f}) beyond the seed noise ({replicates.NOISE_TEST}, {why}). "
        f"Within the noise of each other: {', '.join(tied)}."
    )
    return grouped, Verdict(None, tuple(number[k] for k in tied), text)


def test_sentence(verdict: Verdict) -> str:
    if verdict.test is None:
        if verdict.winner is None:
            return (
                "No test-set number is reported: with no winner named, picking one of the "
                "configurations by its test number would make the test set choose."
            )
        return "The winner's runs have no test-set metric."
    mean, sd, n, twin = verdict.test
    spread = f" ± {sd:.4f} (sd)" if not math.isnan(sd) else ""
    return (
        f"The winner's test set {twin}: {mean:.4f}{spread} over its {n} confirmation runs: the "
        "unbiased estimate (the test set chose nothing in this search)."
    )


def estimate_left(
    finished: list[float],
    complete: list[float],
    running: list[float],
    to_start: int,
    confirmations: int,
    workers: int,
) -> float | None:
    """Seconds left, roughly: the trials not started yet at the mean time of the trials that
    have ended (``finished``, pruned ones included), what the running ones (their elapsed
    seconds) have left of that mean, and the confirmation runs at the mean of the COMPLETE
    trials (they are never pruned), shared among ``workers``; None before any trial has ended."""
    if not finished:
        return None
    mean = sum(finished) / len(finished)
    full = sum(complete) / len(complete) if complete else mean
    work = to_start * mean + sum(max(0.0, mean - e) for e in running)
    work += confirmations * full
    return work / max(1, workers)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_markdown(records: list[TrialRecord], metric: str, keys: list[str]) -> list[str]:
    lines = ["| trial | state | " + " | ".join(keys) + f" | {metric} | epochs | time |"]
    lines.append("|" + "---|" * (len(keys) + 5))
    for r in sorted(records, key=lambda r: r.number):
        state = r.state if r.counted else f"{r.state} (not counted)"
        if r.state == "PRUNED":
            state = f"PRUNED at epoch {r.pruned_epoch}"
        value = f"{r.value:.4f}" if r.value is not None and r.state == "COMPLETE" else ""
        epochs = str(max(r.curve)) if r.curve else ""
        took = duration(r.seconds) if r.seconds is not None else ""
        cells = [str(r.number), state, *(_short(r.params.get(k, "")) for k in keys)]
        lines.append("| " + " | ".join([*cells, value, epochs, took]) + " |")
    return lines


def markdown(
    name: str,
    records: list[TrialRecord],
    *,
    metric: str,
    direction: str,
    keys: list[str],
    storage: str,
    grouped: pd.DataFrame | None,
    verdict: Verdict | None,
    importances: dict[str, float],
    figures: list[Path],
    report_dir: Path,
) -> str:
    counted = [r for r in records if r.counted]
    count = {s: sum(r.state == s for r in counted) for s in STATES}
    best = best_trial(records, direction)
    lines = [
        f"# Search `{name}`",
        "",
        f"{len(counted)} trials ({count['COMPLETE']} complete, {count['PRUNED']} pruned, "
        f"{count['FAIL']} failed), chosen on `{metric}` ({direction}; the validation split). "
        f"Study: `{storage}`.",
        "",
    ]
    if best is not None:
        shown = ", ".join(f"`{k}={_short(best.params.get(k))}`" for k in keys)
        lines += [f"Best trial: {best.number}, {metric} = {best.value:.4f} ({shown}).", ""]
    if verdict is not None:
        lines += ["## Confirmation", "", verdict.text, "", test_sentence(verdict), ""]
    if grouped is not None:
        numbers = [metric, test_metric(metric)]
        config_is = "a trial's params, run with each confirmation seed"
        lines.append(replicates.markdown(grouped, numbers, [], metric, config_is))
    if importances:
        lines += ["## Parameter importances (fANOVA, over the complete trials)", ""]
        lines += [f"- `{k}`: {v:.3f}" for k, v in importances.items()]
        lines.append("")
    lines += ["## Trials", "", *trials_markdown(records, metric, keys), ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{p.stem}]({p.relative_to(report_dir).as_posix()})" for p in figures]
        lines.append("")
    return "\n".join(lines)


def plot_figures(
    records: list[TrialRecord],
    *,
    metric: str,
    curve: str,
    direction: str,
    space: dict,
    importances: dict[str, float],
    folder: Path,
) -> list[Path]:
    """running_best.png, importances.png (when there are any), param_<key>.png for each searched
    key, pruned_curves.png; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    done = [r for r in records if r.state == "COMPLETE" and r.value is not None]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append(folder / name)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([r.number for r in done], [r.value for r in done], "o", alpha=0.6, label="trial")
    best = running_best(records, direction)
    if best:
        ax.step(*zip(*best, strict=True), where="post", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title="Running best over the trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, "running_best.png")

    if importances:
        fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(importances) + 1.5))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title=f"What moved {metric}")
        save(fig, "importances.png")

    for key, spec in space.items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [r.params.get(key) for r in done]
        if all(isinstance(x, int | float) for x in xs):
            ax.plot(xs, [r.value for r in done], "o")
            if getattr(spec, "log", False):
                ax.set_xscale("log")
        else:  # choices that are lists or strings: one column each
            labels = sorted({str(x) for x in xs})
            ax.plot([labels.index(str(x)) for x in xs], [r.value for r in done], "o")
            ax.set_xticks(range(len(labels)), labels)
        for r in done:
            x = r.params.get(key)
            x = x if isinstance(x, int | float) else sorted({str(v) for v in xs}).index(str(x))
            ax.annotate(
                str(r.number), (x, r.value), xytext=(3, 3), textcoords="offset points", fontsize=7
            )
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key} (complete trials)")
        ax.grid(alpha=0.3)
        save(fig, f"param_{_safe(key)}.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(records, key=lambda r: r.number):
        if not r.curve or r.state not in ("COMPLETE", "PRUNED"):
            continue
        epochs = sorted(r.curve)
        pruned = r.state == "PRUNED"
        ax.plot(
            epochs,
            [r.curve[e] for e in epochs],
            color="tab:red" if pruned else "0.6",
            alpha=0.9 if pruned else 0.5,
            marker="." if pruned else None,
        )
        if pruned and r.pruned_epoch in r.curve:
            ax.plot([r.pruned_epoch], [r.curve[r.pruned_epoch]], "x", color="tab:red")
            ax.annotate(str(r.number), (r.pruned_epoch, r.curve[r.pruned_epoch]), fontsize=7)
    ax.set(
        xlabel="epoch",
        ylabel=curve,
        title="Per-epoch curves: pruned trials in red (x: where pruned), others grey",
    )
    ax.grid(alpha=0.3)
    save(fig, "pruned_curves.png")
    return written
