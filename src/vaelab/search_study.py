"""The Optuna side of a search (``vaelab.search``): the trial attrs a search keeps, the space's
values as Optuna stores them, the sampler and pruner, the storage and the study, and which
trials count against the budget or were abandoned by a process that died."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from vaelab.errors import VaelabError
from vaelab.search_file import Choice, Range, Search

# A trial whose owner on another machine has not said it is alive for this long is taken for
# abandoned (its process died); on this machine a dead owner's pid says so at once.
STALE_SECONDS = 600.0

# Trial user attrs (Optuna 5 has no system attrs for users).
KIND_ATTR = "vaelab.kind"  # "confirm" on a confirmation; search trials have none
CONFIRMS_ATTR = "vaelab.confirms"  # a confirmation: the trial number it repeats
SEED_ATTR = "vaelab.seed"  # a confirmation: its train.seed
OWNER_ATTR = "vaelab.owner"  # "host:pid" of the process running it
ALIVE_ATTR = "vaelab.alive"  # unix time its owner last said it runs it
LAUNCHED_ATTR = "vaelab.launched"  # unix time its experiment was launched
EXPERIMENT_ATTR = "vaelab.experiment"  # its DVC experiment's name
PGID_ATTR = "vaelab.pgid"  # its experiment's process group (on the owner's machine)
NOT_COUNTED_ATTR = "vaelab.not_counted"  # interrupted | withdrawn: a FAIL outside the budget
FAILED_ATTR = "vaelab.failed"  # why it failed
PRUNED_ATTR = "vaelab.pruned_epoch"
SEEN_ATTR = "vaelab.pruned_seen"  # a pruned trial: the last epoch seen when it was pruned
DEFINITION_ATTR = "vaelab.definition"  # on the study: what a search file defined it as


# --- the study --------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    """A choice as Optuna stores categorical values (None, bool, int, float, str): lists as
    JSON text."""
    return json.dumps(value) if isinstance(value, list) else value


def suggest(trial, space: dict[str, Choice | Range]) -> dict[str, Any]:
    """The trial's value of every searched key (a list choice decoded back to the list)."""
    values = {}
    for key, spec in space.items():
        if isinstance(spec, Choice):
            encoded = [_encode(v) for v in spec.values]
            picked = trial.suggest_categorical(key, encoded)
            values[key] = spec.values[encoded.index(picked)]
        elif spec.integer:
            values[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return values


def decode(params: dict[str, Any], space: dict[str, Choice | Range]) -> dict[str, Any]:
    """A frozen trial's params as values of the searched keys."""
    values = {}
    for key, value in params.items():
        spec = space.get(key)
        if isinstance(spec, Choice):
            encoded = [_encode(v) for v in spec.values]
            value = spec.values[encoded.index(value)] if value in encoded else value
        values[key] = value
    return values


def make_sampler(seed: int):
    """TPE (Optuna 5's default: multivariate, constant liar) whose random draws for trial n are
    seeded by (seed, n): a search in one process is reproducible, and processes that share a
    study (same seed, same file) do not draw the same random start-up trials, as they would from
    samplers seeded alike."""
    import numpy as np

    class TrialSeededTPE(optuna.samplers.TPESampler):
        def before_trial(self, study, trial) -> None:
            # Private to Optuna 5.1 (pinned): TPE's own generator and its start-up sampler's.
            state = np.random.RandomState([seed, trial.number])
            self._rng._rng = state
            self._random_sampler._rng._rng = np.random.RandomState([seed, trial.number, 1])
            super().before_trial(study, trial)

    return TrialSeededTPE(seed=seed)


def make_pruner(search: Search):

    spec = search.pruner
    if spec.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_epochs
        )
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search.epochs)
    return optuna.pruners.NopPruner()


def definition(search: Search) -> str:
    """What a study is a search of, as JSON: the space, fixed overrides, metric, direction,
    pruner and seed (``trials``, ``jobs`` and ``confirm`` may change between runs)."""
    return json.dumps(
        {
            "space": {k: asdict(v) for k, v in search.space.items()},
            "fixed": search.fixed,
            "metric": search.metric,
            "direction": search.direction,
            "pruner": asdict(search.pruner),
            "seed": search.seed,
        },
        sort_keys=True,
        default=list,
    )


def open_storage(url: str | None, default: Path):
    """An Optuna storage: ``url`` with "://" (an RDB: postgresql://, sqlite:///...), another
    ``url`` a journal file's path, else the journal file ``default``."""

    if url and "://" in url:
        # Two processes opening a brand-new database at once both make its tables, and one
        # fails (seen with SQLite: UNIQUE constraint failed: alembic_version.version_num); a
        # second try finds them made.
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url)
            except Exception as error:  # SQLAlchemy's, Alembic's or Optuna's own
                if attempt == 2:
                    raise VaelabError(
                        f"cannot open the Optuna storage {shown_storage(url, default)}: "
                        f"{type(error).__name__}: {error}"
                    ) from None
                time.sleep(2.0 * (attempt + 1))
    path = Path(url) if url else default
    path.parent.mkdir(parents=True, exist_ok=True)
    # A journal file: safe for several processes on one machine (a lock file beside it); over
    # NFS Optuna recommends an RDB (docs/search.md).
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def shown_storage(url: str | None, default: Path) -> str:
    """The storage as the report shows it: a password in a URL hidden."""
    if not url:
        return str(default)
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)


def open_study(search: Search, storage):
    """The search's study (made if new); refused when it was made with another definition."""

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search prints its own lines
    study = optuna.create_study(
        study_name=search.name,
        storage=storage,
        sampler=make_sampler(search.seed),
        pruner=make_pruner(search),
        direction=search.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != search.direction:
        raise VaelabError(
            f"{search.path}: the study '{search.name}' in this storage maximizes or minimizes "
            "the other way; name a new search (another file name)."
        )
    mine, stored = definition(search), study.user_attrs.get(DEFINITION_ATTR)
    if stored is None:
        study.set_user_attr(DEFINITION_ATTR, mine)
    elif stored != mine:
        before, now = json.loads(stored), json.loads(mine)
        changed = [k for k in now if before.get(k) != now[k]]
        raise VaelabError(
            f"{search.path}: the study '{search.name}' was begun with another {', '.join(changed)}"
            f" (it has {len(study.trials)} trials): mixing them would make one search of two. "
            "Continue with the file as it was (trials, jobs and confirm may change), or name a "
            "new search (copy the file under another name)."
        )
    return study


# --- the budget, the owner, abandoned trials ---------------------------------------------------


def is_confirmation(trial) -> bool:
    return trial.user_attrs.get(KIND_ATTR) == "confirm"


def counted(trials) -> list:
    """The search trials that count against ``trials``, by number: every finished or running
    one but those interrupted or withdrawn."""

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return sorted(
        (
            t
            for t in trials
            if t.state in states
            and not is_confirmation(t)
            and NOT_COUNTED_ATTR not in t.user_attrs
        ),
        key=lambda t: t.number,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def abandoned(trial, host: str, now: float, own_pid: int) -> bool:
    """Whether a RUNNING trial's owner is gone: on this machine its pid is dead (or it has been
    silent for ``STALE_SECONDS``, a pid reused), elsewhere it has been silent that long. A trial
    not yet claimed (asked a moment ago) counts from its start."""
    owner = trial.user_attrs.get(OWNER_ATTR)
    alive = trial.user_attrs.get(ALIVE_ATTR)
    if alive is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        alive = started
    silent = now - alive > STALE_SECONDS
    if not owner:
        return silent
    owner_host, _, pid = owner.rpartition(":")
    if owner_host == host and int(pid) == own_pid:
        return False
    if owner_host == host:
        return silent or not pid_alive(int(pid))
    return silent
