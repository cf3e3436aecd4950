"""A search file (``searches/NAME.yaml``, ``make search``): what to search, how long, on which
validation metric, how to prune and how to confirm the winner; read once and validated like
params.yaml, so that every mistake is one clear error before anything runs.

    params:                          # the params.yaml keys searched, each a choice or a range
      model.latent_dims: {low: 2, high: 32, int: true, log: true}
      model.hidden: {choices: [[256], [512]]}
      train.lr: {low: 0.0003, high: 0.01, log: true}
    trials: 16                       # trials in all, over every process that joins the search
    jobs: 2                          # experiments at a time in this process
    metric: eval/val_iw/nll          # what is chosen on: a validation metric, never a test one
    direction: minimize              # must agree with the metric (nats: minimize)
    pruner: median                   # median | hyperband | none, or {name: median,
                                     #   startup_trials: 5, warmup_epochs: 0}
    seed: 0                          # the sampler's seed
    confirm: {top: 3, seeds: [1, 2, 3]}   # re-run the 3 best with these train.seed values
    train.epochs: 5                  # any other params key: a fixed override of every trial

No Optuna here: this module is plain data and checks (``vaelab.search`` builds the study).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vaelab import params as params_mod
from vaelab.errors import VaelabError
from vaelab.history import heldout_columns
from vaelab.params import SEED_KEYS, is_config_key

# The validation metrics a run has (reports/metrics.json's val sections as ``record`` logs them,
# and the per-epoch held-out columns); tests/test_search_file.py checks them against a real
# metrics.json. Counts (eval/val_iw/samples) are tags, not metrics.
VALIDATION_METRICS = (
    *heldout_columns("val"),
    "eval/val/neg_elbo",
    "eval/val/recon",
    "eval/val/kl",
    "eval/val_iw/nll",
    "eval/val_iw/nll_stderr",
    "eval/val_iw/neg_elbo",
    "eval/val_iw/gap",
    "eval/val_latent/active_units",
    "eval/val_latent/probe_accuracy",
    *(f"eval/val_per_digit/{digit}" for digit in range(10)),
)
# Higher is better for these; every other metric is in nats per image, lower is better.
MAXIMIZED = ("eval/val_latent/active_units", "eval/val_latent/probe_accuracy")
# What the per-epoch pruning decision reads when the metric is not itself per-epoch.
PRUNING_CURVE = "epoch/val/neg_elbo"
PRUNERS = ("median", "hyperband", "none")
TOP_KEYS = ("params", "trials", "jobs", "metric", "direction", "pruner", "seed", "confirm")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (as the search file gives them: numbers, strings, lists)."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """A number from ``low`` to ``high`` (both included), on a log scale with ``log``, whole
    numbers with ``integer``."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Pruner:
    name: str  # median | hyperband | none
    startup_trials: int = 5  # median: finished trials before any pruning (Optuna's default)
    warmup_epochs: int = 0  # median: epochs of a trial before it may be pruned


@dataclass(frozen=True)
class Confirm:
    top: int  # the best configurations re-run; 0: no confirmation
    seeds: tuple[int, ...]  # the train.seed of each re-run


@dataclass(frozen=True)
class Search:
    name: str  # the file's stem: the study, the parent run and the experiments' prefix
    path: Path
    space: dict[str, Choice | Range]  # params key -> what is searched, in the file's order
    fixed: dict[str, Any]  # params key -> the value every trial gets
    trials: int
    jobs: int
    metric: str
    direction: str  # minimize | maximize
    pruner: Pruner
    seed: int
    confirm: Confirm
    base: params_mod.Params  # params.yaml with the fixed overrides: what every trial starts from
    raw: dict = field(
        repr=False, compare=False, default_factory=dict
    )  # the same, as YAML reads it

    @property
    def curve(self) -> str:
        """The per-epoch metric the pruner reads: the metric itself when it is per-epoch."""
        return self.metric if self.metric.startswith("epoch/") else PRUNING_CURVE

    @property
    def epochs(self) -> int:
        return self.base.train.epochs


def _suggest(word: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def natural_direction(metric: str) -> str:
    return "maximize" if metric in MAXIMIZED else "minimize"


def check_metric(path: Path, metric: Any) -> str:
    """A validation metric, or the error that names the right one: a test-set metric is refused
    (choosing on it spends the test set), with its validation twin."""
    if not isinstance(metric, str):
        raise VaelabError(
            f"{path}: 'metric' is {metric!r}; expected a metric name, e.g. eval/val_iw/nll."
        )
    if metric in VALIDATION_METRICS:
        return metric
    twin = _validation_twin(metric)
    if twin is not None:
        raise VaelabError(
            f"{path}: 'metric' is {metric!r}, a test-set metric: a search chooses on the "
            f"validation split, and the test set is reported once for the winner. Use its "
            f"validation twin, metric: {twin}."
        )
    raise VaelabError(
        f"{path}: 'metric' is {metric!r}, not a validation metric a run has."
        f"{_suggest(metric, VALIDATION_METRICS)} "
        f"Choose one of: {', '.join(VALIDATION_METRICS)}."
    )


def _validation_twin(metric: str) -> str | None:
    """The validation metric of the same kind as a test-set (or train) metric, if any."""
    for test, val in (
        ("eval/latent/", "eval/val_latent/"),
        ("eval/test_iw/", "eval/val_iw/"),
        ("eval/test_per_digit/", "eval/val_per_digit/"),
        ("eval/test/", "eval/val/"),
        ("epoch/test/", "epoch/val/"),
    ):
        if metric.startswith(test):
            twin = val + metric.removeprefix(test)
            return twin if twin in VALIDATION_METRICS else None
    return None


def stage_keys(pipeline: dict) -> set[str]:
    """The params keys and sections the stages of dvc.yaml (parsed) list as read."""
    listed = set()
    for stage in (pipeline.get("stages") or {}).values():
        for entry in stage.get("params", []) or []:
            listed |= set(entry) if isinstance(entry, dict) else {entry}
    return listed


def _key_type(key: str) -> Any:
    section, name = key.split(".", 1)
    section_type = typing.get_type_hints(params_mod.Params)[section]
    return typing.get_type_hints(section_type)[name]


def check_key(path: Path, key: Any, where: str) -> str:
    """``key`` as a params key, "section.name", or the error naming the close one."""
    hints = typing.get_type_hints(params_mod.Params)
    if not isinstance(key, str) or "." not in key:
        raise VaelabError(f"{path}: '{where}' has {key!r}; expected a params key, e.g. train.lr.")
    section, name = key.split(".", 1)
    if section not in hints:
        raise VaelabError(
            f"{path}: '{key}' in '{where}' is not a params key: no section '{section}'."
            f"{_suggest(section, hints)} Sections: {', '.join(hints)}."
        )
    known = [f"{section}.{f.name}" for f in fields(hints[section])]
    if key not in known:
        raise VaelabError(
            f"{path}: '{key}' in '{where}' is not a params key.{_suggest(key, known)} Keys of "
            f"'{section}': {', '.join(known)}."
        )
    return key


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _with(raw: dict, values: dict[str, Any]) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return raw


def check_value(path: Path, raw: dict, key: str, value: Any, what: str) -> None:
    """The params schema's verdict on ``key`` = ``value`` (all else as in ``raw``)."""
    try:
        params_mod.parse(_with(raw, {key: value}), path)
    except VaelabError as error:
        message = str(error).removeprefix(f"{path}: ")
        raise VaelabError(f"{path}: {what} is refused by the params schema: {message}") from None


def parse_spec(path: Path, key: str, spec: Any, raw: dict) -> Choice | Range:
    """One searched key's ``choices`` or ``low``/``high`` (``log``, ``int``), checked: every
    choice and both ends must pass the params schema."""
    where = f"params.{key}"
    if not isinstance(spec, dict):
        raise VaelabError(
            f"{path}: '{where}' is {spec!r}; expected {{choices: [...]}} or "
            "{low: ..., high: ...} (with log: true, int: true)."
        )
    allowed = ("choices", "low", "high", "log", "int")
    for name in spec:
        if name not in allowed:
            raise VaelabError(
                f"{path}: '{where}' has an unknown entry '{name}'.{_suggest(str(name), allowed)} "
                f"Entries: {', '.join(allowed)}."
            )
    annotation = _key_type(key)
    if "choices" in spec:
        extra = [name for name in spec if name != "choices"]
        if extra:
            raise VaelabError(
                f"{path}: '{where}' has choices and {', '.join(extra)}; give either choices or "
                "a range (low, high, log, int)."
            )
        values = spec["choices"]
        if not isinstance(values, list) or not values:
            raise VaelabError(
                f"{path}: '{where}.choices' is {values!r}; expected a list of "
                "one or more values, e.g. [256, 512]."
            )
        texts = [json.dumps(v, sort_keys=True) for v in values]
        repeated = sorted({t for t in texts if texts.count(t) > 1})
        if repeated:
            raise VaelabError(
                f"{path}: '{where}.choices' lists {', '.join(repeated)} more than "
                "once; list each value once."
            )
        for value in values:
            check_value(path, raw, key, value, f"'{where}' choice {value!r}")
        return Choice(tuple(values))
    missing = [name for name in ("low", "high") if name not in spec]
    if missing:
        raise VaelabError(
            f"{path}: '{where}' lacks {' and '.join(missing)}; a range needs low "
            "and high, or give choices: [...]."
        )
    low, high = spec["low"], spec["high"]
    log, integer = spec.get("log", False), spec.get("int", False)
    for name, flag in (("log", log), ("int", integer)):
        if not isinstance(flag, bool):
            raise VaelabError(f"{path}: '{where}.{name}' is {flag!r}; expected true or false.")
    if annotation not in (int, float):
        raise VaelabError(
            f"{path}: '{where}' is a range, but '{key}' is not a number; give its values as "
            "choices: [...]."
        )
    for name, end in (("low", low), ("high", high)):
        if not _number(end):
            raise VaelabError(f"{path}: '{where}.{name}' is {end!r}; expected a number.")
        if integer and not isinstance(end, int):
            raise VaelabError(
                f"{path}: '{where}.{name}' is {end!r}; with int: true the ends are whole numbers."
            )
    if annotation is int and not integer:
        raise VaelabError(f"{path}: '{where}': '{key}' takes whole numbers; add int: true.")
    if not low < high:
        raise VaelabError(
            f"{path}: '{where}' has low {low!r} >= high {high!r}; low must be "
            "below high (a single value is a fixed override: put it beside params)."
        )
    if log and low <= 0:
        raise VaelabError(
            f"{path}: '{where}' has log: true and low {low!r}; a log scale needs low > 0."
        )
    for name, end in (("low", low), ("high", high)):
        value = end if integer else float(end)
        check_value(path, raw, key, value, f"'{where}.{name}' {end!r}")
    return Range(float(low), float(high), log, integer)


def _check_searchable(path: Path, key: str, read: set[str]) -> None:
    section = key.split(".", 1)[0]
    if key in SEED_KEYS:
        raise VaelabError(
            f"{path}: 'params.{key}' is a seed: searching it would choose a lucky draw, not a "
            "configuration. Seeds belong in confirm: {seeds: [...]}, which re-runs the best."
        )
    if not is_config_key(key):
        raise VaelabError(
            f"{path}: 'params.{key}' is bookkeeping (where or how a run is filed or drawn): it "
            "does not change what a run computes, so there is nothing to search. Search a "
            "model, loss, data, train or evaluate key."
        )
    if key not in read and section not in read:
        raise VaelabError(
            f"{path}: 'params.{key}' is read by no stage of dvc.yaml, so changing it changes no "
            "result. Search a key a stage lists under params:."
        )


def _int(path: Path, doc: dict, key: str, default: int | None, least: int) -> int:
    value = doc.get(key, default)
    if value is None:
        raise VaelabError(f"{path}: '{key}' is missing; add e.g. {key}: 16.")
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise VaelabError(f"{path}: '{key}' is {value!r}; expected an integer >= {least}.")
    return value


def parse_pruner(path: Path, value: Any) -> Pruner:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise VaelabError(
            f"{path}: 'pruner' is {value!r}; expected median, hyperband or none "
            "(or {name: median, startup_trials: 5, warmup_epochs: 0})."
        )
    allowed = ("name", "startup_trials", "warmup_epochs")
    for name in value:
        if name not in allowed:
            raise VaelabError(
                f"{path}: 'pruner' has an unknown entry '{name}'."
                f"{_suggest(str(name), allowed)} Entries: {', '.join(allowed)}."
            )
    if value["name"] not in PRUNERS:
        raise VaelabError(
            f"{path}: 'pruner' is {value['name']!r}; expected one of "
            f"{', '.join(PRUNERS)}.{_suggest(str(value['name']), PRUNERS)}"
        )
    if value["name"] != "median" and len(value) > 1:
        raise VaelabError(
            f"{path}: startup_trials and warmup_epochs are the median pruner's; "
            f"'{value['name']}' takes none."
        )
    numbers = {}
    for name in ("startup_trials", "warmup_epochs"):
        number = value.get(name, getattr(Pruner, name))
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise VaelabError(f"{path}: 'pruner.{name}' is {number!r}; expected an integer >= 0.")
        numbers[name] = number
    return Pruner(value["name"], **numbers)


def parse_confirm(path: Path, value: Any, trial_seed: int, trials: int) -> Confirm:
    if value is None:
        return Confirm(0, ())
    if not isinstance(value, dict):
        raise VaelabError(
            f"{path}: 'confirm' is {value!r}; expected {{top: 3, seeds: [1, 2, 3]}}."
        )
    for name in value:
        if name not in ("top", "seeds"):
            raise VaelabError(
                f"{path}: 'confirm' has an unknown entry '{name}'."
                f"{_suggest(str(name), ('top', 'seeds'))} Entries: top, seeds."
            )
    top, seeds = value.get("top"), value.get("seeds")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0 or top == 1:
        raise VaelabError(
            f"{path}: 'confirm.top' is {top!r}; expected 0 (no confirmation) or an integer >= 2: "
            "a winner is named only against a runner-up."
        )
    if top > trials:
        raise VaelabError(f"{path}: 'confirm.top' is {top}, more than the {trials} trials.")
    if top == 0:
        return Confirm(0, ())
    if not isinstance(seeds, list) or len(seeds) < 2:
        raise VaelabError(
            f"{path}: 'confirm.seeds' is {seeds!r}; expected a list of two or more train.seed "
            "values, e.g. [1, 2, 3]: the noise between seeds needs at least two runs each."
        )
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise VaelabError(
                f"{path}: 'confirm.seeds' has {seed!r}; expected integers from 0 to 2**32 - 1."
            )
    if len(set(seeds)) != len(seeds):
        raise VaelabError(f"{path}: 'confirm.seeds' lists a seed twice: {seeds}.")
    if trial_seed in seeds:
        raise VaelabError(
            f"{path}: 'confirm.seeds' has {trial_seed}, the train.seed every trial ran with: that "
            "run is the one the search selected (and DVC would restore it from its cache), not a "
            "new draw. Use other seeds."
        )
    return Confirm(top, tuple(seeds))


def name_of(path: Path) -> str:
    name = path.stem
    if not NAME_PATTERN.fullmatch(name):
        raise VaelabError(
            f"{path}: the search's name '{name}' (the file's name) names its study, its MLflow "
            "parent run and its DVC experiments; use letters, digits, - and _ (at most 64)."
        )
    return name


def parse(doc: Any, path: Path, params_raw: dict, pipeline: dict) -> Search:
    """The search in ``doc`` (the file's YAML), against params.yaml's raw mapping and dvc.yaml's;
    every error names the file, the entry and what is expected."""
    name = name_of(path)
    if not isinstance(doc, dict):
        raise VaelabError(f"{path}: expected a mapping (params:, trials:, ...), got {doc!r}.")
    params_mod.parse(params_raw, Path("params.yaml"))  # its own errors are its own
    fixed: dict[str, Any] = {}
    for key in doc:
        if not isinstance(key, str) or ("." not in key and key not in TOP_KEYS):
            raise VaelabError(
                f"{path}: unknown entry '{key}'.{_suggest(str(key), TOP_KEYS)} Entries: "
                f"{', '.join(TOP_KEYS)}, and params keys (section.key) as fixed overrides."
            )
        if "." in key:
            fixed[check_key(path, key, key)] = doc[key]
    for key, value in fixed.items():
        if key.startswith("mlflow."):
            raise VaelabError(
                f"{path}: '{key}' is the search's own bookkeeping; set "
                "mlflow.experiment in params.yaml."
            )
        check_value(path, params_raw, key, value, f"the fixed override {key}: {value!r}")
    raw = _with(params_raw, fixed)
    base = params_mod.parse(raw, path)
    if base.data.validation == 0:
        raise VaelabError(
            f"{path}: data.validation is 0, so the runs have no validation split and the search "
            "would choose on the test set. Hold images out (data.validation: 10000)."
        )
    space_doc = doc.get("params")
    if not isinstance(space_doc, dict) or not space_doc:
        raise VaelabError(
            f"{path}: 'params' is {space_doc!r}; expected a mapping of params keys "
            "to what is searched, e.g. train.lr: {low: 0.0001, high: 0.01, log: true}."
        )
    read = stage_keys(pipeline)
    space = {}
    for key, spec in space_doc.items():
        check_key(path, key, "params")
        if key in fixed:
            raise VaelabError(f"{path}: '{key}' is both searched and fixed; keep one.")
        _check_searchable(path, key, read)
        space[key] = parse_spec(path, key, spec, raw)
        if key == "data.validation" and _reaches_zero(space[key]):
            raise VaelabError(
                f"{path}: 'params.data.validation' can be 0: such a trial has no "
                "validation split to be chosen on. Keep it >= 1."
            )
    trials = _int(path, doc, "trials", None, 1)
    jobs = _int(path, doc, "jobs", 1, 1)
    seed = _int(path, doc, "seed", 0, 0)
    metric = check_metric(path, doc.get("metric", "eval/val_iw/nll"))
    natural = natural_direction(metric)
    direction = doc.get("direction", natural)
    if direction not in ("minimize", "maximize"):
        raise VaelabError(f"{path}: 'direction' is {direction!r}; expected minimize or maximize.")
    if direction != natural:
        sense = "higher" if natural == "maximize" else "lower"
        raise VaelabError(
            f"{path}: 'direction' is {direction} but {metric} is better {sense}: "
            f"use direction: {natural}."
        )
    pruner = parse_pruner(path, doc.get("pruner", "median"))
    search = Search(
        name,
        path,
        space,
        fixed,
        trials,
        jobs,
        metric,
        direction,
        pruner,
        seed,
        parse_confirm(path, doc.get("confirm"), base.train.seed, trials),
        base,
        raw,
    )
    if pruner.name != "none":
        if search.curve == PRUNING_CURVE and direction == "maximize":
            raise VaelabError(
                f"{path}: pruning reads the per-epoch validation -ELBO (lower is better), which "
                f"cannot judge a search that maximizes {metric}; set pruner: none."
            )
        if base.train.epochs < 2:
            raise VaelabError(
                f"{path}: pruning stops trials between epochs, and train.epochs "
                "is 1; set pruner: none or train more epochs."
            )
    return search


def _reaches_zero(spec: Choice | Range) -> bool:
    if isinstance(spec, Choice):
        return 0 in spec.values
    return spec.low <= 0


def load(path: Path, params_file: Path, pipeline_file: Path) -> Search:
    """Read and validate the search file ``path`` against params.yaml and dvc.yaml."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise VaelabError(f"{path}: no such search file; see searches/ for examples.") from None
    try:
        doc = params_mod.load_yaml(text)
    except yaml.YAMLError as error:
        raise VaelabError(f"{path}: not valid YAML: {error}.") from None
    params_raw = params_mod.load_yaml(params_file.read_text())
    pipeline = yaml.safe_load(pipeline_file.read_text())
    return parse(doc, path, params_raw, pipeline)


def override(value: Any) -> str:
    """A value as DVC's ``-S key=value`` takes it (YAML: JSON for lists, repr for floats)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return repr(value) if isinstance(value, float) else str(value)
