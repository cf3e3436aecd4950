"""Named configurations (``presets/*.yaml``) run as DVC experiments.

    python -m vaelab.presets --dir presets --params params.yaml --list
    python -m vaelab.presets --dir presets --params params.yaml bernoulli-2d [--queue]
        [-S train.epochs=50] [--dry-run]

A preset lists its changes from the tutorial's defaults (``params.defaults()``) to the keys that
define a configuration (``CONFIG_KEYS``: model, loss, binarisation, the validation split and
early stopping, training length and optimiser, evaluation K). Applying it sets every one of those
keys to defaults + preset, whatever params.yaml holds now, and leaves the others (data source,
device, seeds, plots, MLflow experiment) as they are. The result is validated like params.yaml,
then handed to ``dvc exp run -n <name> -S key=value ...`` for the keys that differ from
params.yaml, so the experiment is tracked (DVC and MLflow) like any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vaelab import params as params_mod
from vaelab.errors import VaelabError, run_stage

# A key is "section.key" or "section.*" for a whole section.
CONFIG_KEYS = (
    "data.binarize",
    "data.validation",
    "model.*",
    "loss.*",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.lr_schedule",
    "train.adam_betas",
    "train.adam_eps",
    "train.kl_warmup_epochs",
    "train.patience",
    "train.keep",
    "evaluate.iw_samples",
)


def is_preset_key(key: str) -> bool:
    """Whether a preset sets ``key``. (A run's configuration id, ``vaelab.params.config_id``,
    counts the same keys and the data source: tests/test_presets.py keeps them so.)"""
    return key in CONFIG_KEYS or f"{key.split('.')[0]}.*" in CONFIG_KEYS


def available(folder: Path) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.yaml"))


def read_preset(path: Path) -> dict[str, Any]:
    """The preset's values as ``{"section.key": value}``; only configuration keys are allowed."""
    try:
        raw = params_mod.load_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise VaelabError(f"{path}: not valid YAML: {error}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise VaelabError(f"{path}: expected sections of keys (loss: {{beta: 0.5}}), got {raw!r}.")
    flat = params_mod.flatten_yaml(raw)
    for key in flat:
        if not is_preset_key(key):
            raise VaelabError(
                f"{path}: '{key}' is not a configuration key; a preset sets only "
                f"{', '.join(CONFIG_KEYS)}. Machine and bookkeeping keys stay in params.yaml."
            )
    return flat


def resolve(
    preset: dict[str, Any], current: params_mod.Params, overrides: dict[str, Any], source: Path
) -> params_mod.Params:
    """params.yaml's values with every configuration key set to defaults + preset, then the
    command line's overrides; validated (errors name ``source``)."""
    raw = dataclasses.asdict(current)
    for section, values in dataclasses.asdict(params_mod.defaults()).items():
        for key, value in values.items():
            if is_preset_key(f"{section}.{key}"):
                raw[section][key] = value
    for key, value in [*preset.items(), *overrides.items()]:
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value  # unknown names are reported by parse
    return params_mod.parse(raw, source)


def format_value(value: Any) -> str:
    """A value as DVC's ``-S`` (Hydra override grammar) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def set_flags(target: params_mod.Params, current: params_mod.Params) -> list[str]:
    """``-S key=value`` for every key whose value differs between ``target`` and ``current``."""
    now = params_mod.flatten(current)
    flags = []
    for key, value in params_mod.flatten(target).items():
        if value != now[key]:
            flags += ["-S", f"{key}={format_value(value)}"]
    return flags


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise VaelabError(f"-S {text!r}: expected section.key=value, e.g. -S train.epochs=50.")
    return key, params_mod.load_yaml(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", help="preset name (a file <dir>/<name>.yaml)")
    parser.add_argument("--dir", type=Path, required=True, help="folder of preset files")
    parser.add_argument("--params", type=Path, required=True, help="the params.yaml to change")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument("--name", help="DVC experiment name (default: the preset's name)")
    parser.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one more key, e.g. -S train.epochs=50",
    )
    args = parser.parse_args(argv)

    def run() -> None:
        names = available(args.dir)
        if args.list or not args.preset:
            for name in names:
                print(name)
            return
        if args.preset not in names:
            raise VaelabError(
                f"no preset '{args.preset}' in {args.dir}/; choose one of: {', '.join(names)}."
            )
        path = args.dir / f"{args.preset}.yaml"
        current = params_mod.load(args.params)
        overrides = dict(parse_override(text) for text in args.set)
        source = Path(f"{path} + -S") if overrides else path  # where a bad value came from
        target = resolve(read_preset(path), current, overrides, source)
        command = [
            "dvc",
            "exp",
            "run",
            "-n",
            args.name or args.preset,
            *set_flags(target, current),
        ]
        if args.queue:
            command.append("--queue")
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            sys.exit(subprocess.run(command, check=False).returncode)

    run_stage(run)


if __name__ == "__main__":
    main()
