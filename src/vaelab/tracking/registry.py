"""The model registry (``python -m vaelab.register``): the best FINISHED run's MLflow model as a
version of a registered model, with an alias that always points at the best."""

from __future__ import annotations

from dataclasses import dataclass

from vaelab.errors import VaelabError
from vaelab.ranking import NO_SPLIT, RANK_METRIC, on_test_set, rank
from vaelab.tracking.models import MODEL_TAG
from vaelab.tracking.queries import find_runs
from vaelab.tracking.store import tracking_uri


@dataclass(frozen=True)
class Registration:
    """Where ``alias`` of the registered model ``name`` points after ``register_best``."""

    name: str
    alias: str
    version: str
    run_id: str
    metric: str
    value: float
    new_version: bool  # a version was created for the run's model (else an existing one is used)
    previous: str | None  # the version the alias pointed at before; == version: nothing changed
    # The test set's twin of ``metric`` and its value: reported, not used to choose (None when
    # the champion was chosen on the test set itself, having no validation split).
    reported: tuple[str, float] | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def best_run(runs, metric: str = RANK_METRIC, descending: bool = False) -> tuple[object, str]:
    """The row of ``runs`` (``find_runs``' DataFrame, oldest first) that ranks first by
    ``metric`` (``vaelab.ranking``: lowest first, highest with ``descending``; a validation
    metric falls back to its test-set twin for runs without a validation split, ranked after the
    others), and the metric its value is; the oldest of equals, so the choice does not flip-flop.
    Runs without either metric are not ranked."""
    ranking = rank(runs, metric)
    ranked = ranking.value.notna()
    if not ranked.any():
        available = sorted(
            c.removeprefix("metrics.")
            for c in runs.columns
            if c.startswith("metrics.") and runs[c].notna().any()
        )
        twin = f" (nor its test-set twin '{ranking.twin}')" if ranking.twin else ""
        raise VaelabError(
            f"no FINISHED run has the metric '{metric}'{twin}; choose --metric from: "
            f"{', '.join(available) or 'none'}."
        )
    first = ranking.order(descending)[0]
    used = ranking.twin if ranking.split[first] == NO_SPLIT else metric
    return runs.loc[first], used


def _best_with_model(runs, metric: str, descending: bool) -> tuple[object, str]:
    """``best_run``; among runs equal on the metric, one with a model: the same result recorded
    again with its model ties with the older run recorded before models were logged."""
    best, used = best_run(runs, metric, descending)
    tag = f"tags.{MODEL_TAG}"
    modelled = runs[runs[tag].fillna("").str.startswith("models:/")] if tag in runs else runs[:0]
    if not _has_model(best) and not modelled.empty:
        candidate, candidate_used = best_run(modelled, metric, descending)
        same = candidate[f"metrics.{candidate_used}"] == best[f"metrics.{used}"]
        if candidate_used == used and same:
            return candidate, used
    return best, used


def _has_model(row) -> bool:
    model_uri = row.get(f"tags.{MODEL_TAG}")
    return isinstance(model_uri, str) and model_uri.startswith("models:/")


def _best_to_register(experiment: str, metric: str, descending: bool, filter_string: str):
    """The row of the best FINISHED training run (``_best_with_model``); refused when there is
    none, or when the best has no logged model."""
    runs = find_runs(experiment, filter_string)
    if runs.empty:
        where = f" matching {filter_string!r}" if filter_string else ""
        raise VaelabError(
            f"no FINISHED training run in experiment '{experiment}'{where} to register; run "
            "`make repro` (or `dvc repro`) first, or change --filter."
        )
    best, used = _best_with_model(runs, metric, descending)
    if not _has_model(best):
        raise VaelabError(
            f"the best run {best['run_id']} ({used} = {best[f'metrics.{used}']:g}) has no "
            f"logged MLflow model (no tag {MODEL_TAG}): it was recorded before models were "
            "logged. Run `dvc repro` (or `dvc exp apply` its experiment, then `dvc repro`) to "
            "record it again with its model, or leave such runs out with "
            f"--filter \"tags.`{MODEL_TAG}` LIKE 'models:/%'\"."
        )
    return best, used


def register_best(
    experiment: str,
    *,
    metric: str = RANK_METRIC,
    descending: bool = False,
    filter_string: str = "",
    name: str = "vaelab-vae",
    alias: str = "champion",
) -> Registration:
    """Point ``alias`` of the registered model ``name`` at the MLflow model of the best FINISHED
    training run of ``experiment`` (``best_run``), registering that model as a new version unless
    a version of ``name`` already holds it: registering again without a better run creates
    nothing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    best, metric = _best_to_register(experiment, metric, descending, filter_string)
    run_id, value = str(best["run_id"]), float(best[f"metrics.{metric}"])
    twin = on_test_set(metric)
    reported = None
    if twin and isinstance(best.get(f"metrics.{twin}"), float):
        reported = (twin, float(best[f"metrics.{twin}"]))
    model_uri = best[f"tags.{MODEL_TAG}"]
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # mlflow.register_model uses the fluent API's store
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        previous = _aliased_version(client, name, alias)
        if previous is not None and _holds(previous, model_uri):
            same = str(previous.version)
            return Registration(name, alias, same, run_id, metric, value, False, same, reported)
        version = _version_holding(client, name, model_uri)
        new_version = version is None
        if new_version:
            version = mlflow.register_model(model_uri, name)
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as error:
        invalid = error.error_code == "INVALID_PARAMETER_VALUE"
        hint = " Choose another --name or --alias." if invalid else ""
        raise VaelabError(
            f"cannot register {model_uri} (run {run_id}) as '{name}' with alias '{alias}' in "
            f"{uri}: {error.message}{hint}"
        ) from None
    return Registration(
        name,
        alias,
        str(version.version),
        run_id,
        metric,
        value,
        new_version,
        None if previous is None else str(previous.version),
        reported,
    )


def _aliased_version(client, name: str, alias: str):
    """The version ``alias`` points at; None when the registered model or the alias is new."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return None if version is None else client.get_model_version(name, str(version))


def _holds(version, model_uri: str) -> bool:
    """Whether the model version was registered from the logged model ``models:/<model id>``.
    MLflow 3.17's SQL registry leaves ``version.model_id`` None; ``source`` keeps the URI."""
    return version.source == model_uri or f"models:/{version.model_id}" == model_uri


def _version_holding(client, name: str, model_uri: str):
    """The newest version of ``name`` registered from the logged model ``model_uri``, or None
    (the alias may have been moved away from it by hand since)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    holding = [v for v in versions if _holds(v, model_uri)]
    return max(holding, key=lambda v: int(v.version), default=None)
