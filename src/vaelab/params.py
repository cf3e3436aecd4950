"""Every hyperparameter, read once from params.yaml into frozen, typed dataclasses.

``load(path)`` rejects unknown keys (with a did-you-mean), missing keys, wrong types and
out-of-range values, naming the file, the key, the value and what is expected.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from vaelab.errors import VaelabError

Likelihood = Literal["gaussian", "bernoulli"]
Device = Literal["auto", "cpu", "cuda"]
DataSource = Literal["mnist", "custom"]
Binarize = Literal["none", "dynamic", "static"]
Arch = Literal["mlp", "conv"]
Activation = Literal["relu", "tanh"]
OutputBias = Literal["zero", "data_mean"]
Objective = Literal["elbo", "iwae"]
LrSchedule = Literal["constant", "burda"]
Keep = Literal["last", "best"]


# The sections of params.yaml with their defaults. What each key means is documented once, in
# params.yaml's comments (tests/test_docs.py checks that its values are these defaults).


@dataclass(frozen=True)
class DataParams:
    source: DataSource = "mnist"
    binarize: Binarize = "none"
    validation: int = 10_000


@dataclass(frozen=True)
class ModelParams:
    arch: Arch = "mlp"
    latent_dims: int = 2
    hidden: tuple[int, ...] = (512,)
    activation: Activation = "relu"
    output_bias: OutputBias = "zero"

    def architecture(self) -> dict[str, Any]:
        """The keys that are ``vaelab.model.VAE``'s constructor arguments (``output_bias`` is
        how training initialises it, not part of the model)."""
        return {
            "arch": self.arch,
            "latent_dims": self.latent_dims,
            "hidden": self.hidden,
            "activation": self.activation,
        }


@dataclass(frozen=True)
class LossParams:
    likelihood: Likelihood = "gaussian"
    beta: float = 1.0
    objective: Objective = "elbo"
    samples: int = 1


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: LrSchedule = "constant"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    device: Device = "auto"
    compile: bool = False
    kl_warmup_epochs: int = 0
    nproc: int = 1
    max_restarts: int = 3
    patience: int = 0
    keep: Keep = "last"


@dataclass(frozen=True)
class EvaluateParams:
    seed: int = 0
    iw_samples: int = 1000


@dataclass(frozen=True)
class PlotParams:
    line_start: tuple[float, float] = (-2.5, 0.4)
    line_end: tuple[float, float] = (2.0, 0.4)
    line_count: int = 10
    grid_size: int = 20
    recon_count: int = 10


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "vaelab"
    sweep: str = ""


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    loss: LossParams
    train: TrainParams
    evaluate: EvaluateParams
    plot: PlotParams
    mlflow: MlflowParams


# Range checks: key -> (predicate, what is expected). Types are checked from the annotations.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.latent_dims": (
        lambda v: v >= 2,
        "an integer >= 2 (the latent plots need two dimensions)",
    ),
    "model.hidden": (
        lambda v: len(v) >= 1 and all(1 <= w <= 65536 for w in v),
        "a list of one or more integers from 1 to 65536, e.g. [512] or [200, 200]",
    ),
    "loss.beta": (lambda v: v >= 0, "a number >= 0"),
    "train.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "train.kl_warmup_epochs": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.nproc": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1024 (1 = no DDP)"),
    "train.max_restarts": (lambda v: 0 <= v <= 100, "an integer from 0 to 100 (0 = never)"),
    "train.patience": (lambda v: v >= 0, "an integer >= 0 (0 = no early stopping)"),
    "data.validation": (
        lambda v: v >= 0,
        "an integer >= 0: the last N training images held out (0 = none)",
    ),
    "train.lr": (lambda v: v > 0, "a number > 0"),
    "train.adam_betas": (
        lambda v: all(0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.999]",
    ),
    "train.adam_eps": (lambda v: v > 0, "a number > 0, e.g. 1.0e-8"),
    "loss.samples": (lambda v: 1 <= v <= 10_000, "an integer from 1 to 10000"),
    "train.seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),
    "evaluate.seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),
    "evaluate.iw_samples": (lambda v: v >= 1, "an integer >= 1"),
    "plot.line_count": (lambda v: v >= 2, "an integer >= 2"),
    "plot.grid_size": (lambda v: 2 <= v <= 100, "an integer between 2 and 100"),
    "plot.recon_count": (lambda v: 1 <= v <= 100, "an integer between 1 and 100"),
    "mlflow.experiment": (lambda v: v.strip() != "", "a non-empty name"),
}


def _suggest(key: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_type(path: Path, key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` (int -> float, list -> tuple) or raise."""

    def fail(expected: str, hint: str = "") -> typing.NoReturn:
        raise VaelabError(f"{path}: '{key}' is {value!r}; expected {expected}.{hint}")

    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            fail("one of " + ", ".join(repr(a) for a in allowed), _suggest(str(value), allowed))
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if annotation is int:
        # bool is a subclass of int in Python; `epochs: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if annotation is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            fail("a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):
        if not isinstance(value, list | tuple):
            fail("a list, e.g. [200, 200]")
        item_type = typing.get_args(annotation)[0]
        return tuple(
            _check_type(path, f"{key}[{i}]", item, item_type) for i, item in enumerate(value)
        )
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, list | tuple) or len(value) != len(item_types):
            fail(f"a list of {len(item_types)} numbers, e.g. [-2.5, 0.4]")
        return tuple(
            _check_type(path, f"{key}[{i}]", item, t)
            for i, (item, t) in enumerate(zip(value, item_types, strict=True))
        )
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module


def _build_section(path: Path, name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise VaelabError(
            f"{path}: section '{name}' must be a mapping of keys to values, got {raw!r}."
        )
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in raw:
        if key not in known:
            raise VaelabError(
                f"{path}: unknown key '{name}.{key}'.{_suggest(str(key), known)} "
                f"Known keys in '{name}': {', '.join(known)}."
            )
    values = {}
    for f in fields(cls):
        key = f"{name}.{f.name}"
        if f.name not in raw:
            raise VaelabError(
                f"{path}: missing key '{key}'. Add it to the '{name}' section "
                f"(default: {f.default!r})."
            )
        value = _check_type(path, key, raw[f.name], hints[f.name])
        if key in _RANGES:
            ok, expected = _RANGES[key]
            if not ok(value):
                raise VaelabError(f"{path}: '{key}' is {raw[f.name]!r}; expected {expected}.")
        values[f.name] = value
    return cls(**values)


def parse(raw: Any, path: Path = Path("params.yaml")) -> Params:
    """Validate an already-parsed YAML document and return typed params."""
    if not isinstance(raw, dict):
        raise VaelabError(
            f"{path}: expected a mapping of sections (data:, model:, ...), got {raw!r}."
        )
    hints = typing.get_type_hints(Params)
    sections = [f.name for f in fields(Params)]
    for name in raw:
        if name not in sections:
            raise VaelabError(
                f"{path}: unknown section '{name}'.{_suggest(str(name), sections)} "
                f"Known sections: {', '.join(sections)}."
            )
    built = {}
    for name in sections:
        if name not in raw:
            raise VaelabError(f"{path}: missing section '{name}'.")
        built[name] = _build_section(path, name, hints[name], raw[name])
    params = Params(**built)
    if params.model.arch == "conv" and len(params.model.hidden) > 2:
        raise VaelabError(
            f"{path}: 'model.hidden' is {list(params.model.hidden)} with 'model.arch' conv; the "
            "conv net takes 1 or 2 channel counts (28 -> 14 -> 7 pixels), e.g. [32, 64]."
        )
    if params.train.batch_size % params.train.nproc:
        raise VaelabError(
            f"{path}: 'train.batch_size' is {params.train.batch_size}, which does not divide "
            f"among 'train.nproc' = {params.train.nproc} processes; batch_size is the global "
            "batch. Choose a multiple of train.nproc."
        )
    if params.data.binarize != "none" and params.loss.likelihood != "bernoulli":
        raise VaelabError(
            f"{path}: 'data.binarize' is {params.data.binarize!r} but 'loss.likelihood' is "
            f"{params.loss.likelihood!r}; binarised data goes with the Bernoulli likelihood. "
            "Set loss.likelihood: bernoulli, or data.binarize: none."
        )
    if params.loss.objective == "iwae":
        _check_iwae(params, path)
    _check_validation_use(params, path)
    return params


def _check_validation_use(params: Params, path: Path) -> None:
    """Early stopping and keeping the best epoch choose on the validation split: without one
    they would choose on the test set (or on nothing)."""
    uses = {
        "train.patience": (params.train.patience, 0),
        "train.keep": (params.train.keep, "last"),
    }
    for key, (value, neutral) in uses.items():
        if params.data.validation == 0 and value != neutral:
            raise VaelabError(
                f"{path}: '{key}' is {value!r} but 'data.validation' is 0: it chooses on the "
                "validation split, and there is none. Hold images out (data.validation: 10000, "
                f"the canonical 50k/10k split), or set {key}: {neutral!r}."
            )


def _check_iwae(params: Params, path: Path) -> None:
    """beta and KL warm-up weight the KL term of the ELBO; the IWAE bound has no separate KL term
    (Burda et al. 2016, eq. 8: the log of an average of p(x, z)/q(z|x)), so they are undefined."""
    unset = {
        "loss.beta": (params.loss.beta, 1.0),
        "train.kl_warmup_epochs": (params.train.kl_warmup_epochs, 0),
    }
    for key, (value, neutral) in unset.items():
        if value != neutral:
            raise VaelabError(
                f"{path}: '{key}' is {value!r} with 'loss.objective' iwae; it weights the ELBO's "
                "KL term, which the IWAE bound does not have. Set "
                f"{key}: {neutral!r}, or loss.objective: elbo."
            )


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; DVC's `-S loss.beta=1e-5`
    writes exactly that. Add YAML 1.2's float syntax so it reads as the number it is."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML the way params are read (safe, with YAML 1.2 exponent floats)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def load(path: str | Path) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise VaelabError(f"{path}: file not found. Run from the project root.") from None
    try:
        raw = load_yaml(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise VaelabError(f"{path}: not valid YAML{where}: {error.problem}.") from None
    except yaml.YAMLError as error:
        raise VaelabError(f"{path}: not valid YAML: {error}.") from None
    return parse(raw, path)


def flatten_yaml(raw: dict) -> dict[str, Any]:
    """A params-shaped YAML mapping as ``{"section.key": value}``; non-mapping sections skipped."""
    return {
        f"{section}.{key}": value
        for section, keys in raw.items()
        if isinstance(keys, dict)
        for key, value in keys.items()
    }


def flatten(params: Params) -> dict[str, str | int | float]:
    """All params as ``{"section.key": value}``: the one naming scheme MLflow runs use."""
    flat: dict[str, str | int | float] = {}
    for section in fields(params):
        for f in fields(getattr(params, section.name)):
            value = getattr(getattr(params, section.name), f.name)
            flat[f"{section.name}.{f.name}"] = list(value) if isinstance(value, tuple) else value
    return flat


# Runs whose params differ only in these keys are replicates of one configuration (the tag
# ``vaelab.config``, vaelab.replicates): the seeds, and bookkeeping that does not change what is
# computed (where and how it runs: the device, compilation, the number of DDP processes, which
# split one global batch, and their restarts; where it is filed: the MLflow experiment and sweep;
# its figures).
SEED_KEYS = ("train.seed", "evaluate.seed")
BOOKKEEPING_KEYS = (
    "train.device",
    "train.compile",
    "train.nproc",
    "train.max_restarts",
    "mlflow.*",
    "plot.*",
)


def is_config_key(key: str) -> bool:
    """Whether ``key`` ("section.name") is part of a configuration (not a seed or bookkeeping)."""
    not_config = (*SEED_KEYS, *BOOKKEEPING_KEYS)
    return key not in not_config and f"{key.split('.', 1)[0]}.*" not in not_config


def config_id(flat: dict[str, str]) -> str:
    """A configuration's id, 12 hex digits: a hash of the configuration keys' values as MLflow
    logs them (``{"train.lr": "0.001", ...}``); equal for seed replicates."""
    kept = {key: str(value) for key, value in flat.items() if is_config_key(key)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def defaults() -> Params:
    """The defaults above (the tutorial's settings) as a Params object; used by tests."""
    hints = typing.get_type_hints(Params)
    return Params(**{f.name: hints[f.name]() for f in fields(Params)})
