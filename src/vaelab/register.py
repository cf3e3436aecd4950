"""Register the MLflow model of the best FINISHED training run: ``python -m vaelab.register``
(``make register``).

The run with the lowest ``--metric`` (default ``eval/val_iw/nll``, the validation split's; the
highest with ``--descending``) among the experiment's FINISHED training runs (``--filter``:
MLflow's search syntax; runs without a validation split are ranked by the test set's twin of the
metric, after the others: ``vaelab.ranking``) has its logged model (the run's tag
``vaelab.model_uri``) registered as a version of the registered model ``--name`` (default
``vaelab-vae``), and the alias ``--alias`` (default ``champion``) is pointed at it, so
``models:/vaelab-vae@champion`` always loads the best model. When the alias already points at
that model nothing is registered; when another version holds it (the alias was moved by hand),
the alias goes back to that version instead of a duplicate.

``--search NAME`` takes the confirmed winner of search NAME (``make search``): the best of the
winner's confirmation runs (the parent run's ``vaelab.winner`` says which trial won); a search
that named no winner, its configurations within the seed noise of each other, is refused with its
verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vaelab import params as params_mod
from vaelab.errors import run_stage
from vaelab.ranking import RANK_METRIC
from vaelab.tracking.registry import Registration, register_best
from vaelab.tracking.searches import winner_filter


def describe(done: Registration) -> str:
    """One line: the URI, the version, the run and its metric, and what changed."""
    run = f"run {done.run_id}, {done.metric} = {done.value:g}"
    if done.reported:
        key, value = done.reported
        run += f"; {key} = {value:g}, reported, not used to choose"
    if done.previous == done.version:
        return f"{done.uri} is already version {done.version} ({run}): nothing to register"
    how = "a new version" if done.new_version else "an existing version of this model"
    was = f", was version {done.previous}" if done.previous else ""
    return f"{done.uri} -> version {done.version}, {how} ({run}{was})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="for mlflow.experiment")
    parser.add_argument("--metric", default=RANK_METRIC, help="rank by this metric")
    parser.add_argument("--descending", action="store_true", help="higher is better")
    parser.add_argument("--filter", default="", help="MLflow filter, e.g. \"tags.sweep = 'x'\"")
    parser.add_argument("--search", help="take the confirmed winner of this search (its name)")
    parser.add_argument("--name", default="vaelab-vae", help="the registered model")
    parser.add_argument("--alias", default="champion", help="the alias to point at the best")
    args = parser.parse_args(argv)
    experiment = params_mod.load(args.params).mlflow.experiment
    filter_string = args.filter
    if args.search:
        winner = winner_filter(experiment, args.search)
        # MLflow's filters have no parentheses: "and" joins them.
        filter_string = f"{winner} and {filter_string}" if filter_string else winner
    done = register_best(
        experiment,
        metric=args.metric,
        descending=args.descending,
        filter_string=filter_string,
        name=args.name,
        alias=args.alias,
    )
    print(f"register: {describe(done)}")


if __name__ == "__main__":
    run_stage(main)
