"""A search (``make search``): an Optuna study over params.yaml keys, each trial a DVC experiment
and an MLflow child run of one parent, pruned on the per-epoch validation -ELBO, resumable,
joinable from other machines, its best configurations confirmed over seeds.

    python -m vaelab.search --search searches/NAME.yaml --params params.yaml \
        --pipeline dvc.yaml --state .search --report reports/search.md \
        --figures reports/search [--storage URL] [--jobs N]

1. The search file is checked before anything runs (``vaelab.search_file``).
2. The study (TPE, seeded by trial number) is opened in ``--storage`` (any Optuna storage URL,
   e.g. postgresql://...; a path: a journal file) or in ``<state>/NAME.journal``; a study made
   with another definition is refused (the study's side: ``vaelab.search_study``). Its MLflow
   parent run is found or started.
3. Ask and tell: ``study.ask()`` gives a trial's params; its experiment,
   ``dvc exp run --temp -n NAME-<trial> -S ...``, runs in a temporary copy; the search reads its
   per-epoch validation -ELBO from MLflow (the train stage knows nothing of Optuna), reports it,
   and when the pruner says so stops the experiment (SIGINT, as Ctrl-C: the stage stops between
   two steps, DVC removes the copy; ``vaelab.experiments`` says why not the queue), its run
   KILLED with ``vaelab.pruned``. A trial that fails is told FAIL and the search goes on.
4. The budget is shared: ``trials`` counts every finished and running trial of the study, from
   any process; a trial asked past it (another process took the last place) is withdrawn.
   Trials left RUNNING by a process that died are settled: adopted when their experiment
   finished, else failed and not counted (tried anew).
5. Then the ``confirm.top`` best configurations are re-run with each ``confirm.seeds`` (queued in
   the study, so that processes share them too), and the report (``vaelab.search_report``) says
   whether the best beats the runner-up beyond the seed noise; the winner's test number is
   printed once. The report goes to ``--report``, ``--figures`` and the parent run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.importance import FanovaImportanceEvaluator
from optuna.trial import TrialState

from vaelab import params as params_mod
from vaelab import search_report
from vaelab.errors import VaelabError, run_stage
from vaelab.experiments import (
    TempExperiment,
    duration,
    group_runs,
    stop_group,
    threads_env,
    wait_for_group,
)
from vaelab.search_file import Search, override
from vaelab.search_file import load as load_search
from vaelab.search_report import TrialRecord
from vaelab.search_study import (
    ALIVE_ATTR,
    CONFIRMS_ATTR,
    EXPERIMENT_ATTR,
    FAILED_ATTR,
    KIND_ATTR,
    LAUNCHED_ATTR,
    NOT_COUNTED_ATTR,
    OWNER_ATTR,
    PGID_ATTR,
    PRUNED_ATTR,
    SEED_ATTR,
    SEEN_ATTR,
    abandoned,
    counted,
    decode,
    is_confirmation,
    open_storage,
    open_study,
    shown_storage,
    suggest,
)

# fANOVA's forest over fewer complete trials says little; below this the report has none.
MIN_IMPORTANCE_TRIALS = 4
POLL_SECONDS = 2.0  # how often running experiments are looked at
HEARTBEAT_SECONDS = 20.0  # how often a running trial's owner says it is alive (a user attr)
SETTLE_SECONDS = 60.0  # how often abandoned trials are looked for while waiting


class Runner(Protocol):
    """How trials run and are read: DVC experiments and MLflow here (``DvcRunner``); a fake in
    the tests."""

    def launch(self, name: str, overrides: dict[str, str]) -> int: ...  # its process group
    def poll(self, name: str) -> int | None: ...
    def stop(self, names: list[str]) -> None: ...
    def stop_orphan(self, pgid: int, name: str) -> bool: ...
    def run_id(self, name: str, since: float, finished: bool = False) -> str | None: ...
    def curve(self, run_id: str, key: str) -> list[tuple[int, float]]: ...
    def metrics(self, run_id: str) -> dict[str, float]: ...
    def adopt(self, run_id: str, trial: int | None, confirms: int | None) -> None: ...
    def end_run(self, run_id: str, tags: dict[str, str]) -> None: ...
    def progress(self, counts: dict[str, int], best: dict | None) -> None: ...
    def tail(self, name: str) -> str: ...


# --- one search process ------------------------------------------------------------------------


@dataclass
class Job:
    """A trial or confirmation this process runs."""

    trial: Any  # optuna.Trial
    name: str  # its DVC experiment
    values: dict[str, Any]  # the searched keys' values
    launched: float  # unix time
    started: float  # monotonic
    confirms: int | None = None
    seed: int | None = None
    reported: int = 0  # the last epoch told to Optuna
    seen: int = 0  # the last epoch of its curve the search has seen
    run_id: str | None = None
    beat: float = 0.0  # monotonic time of the last heartbeat

    @property
    def number(self) -> int:
        return self.trial.number


def shown(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


class Searcher:
    """The ask-and-tell loop of one process: up to ``jobs`` experiments at a time, watched until
    the study has its trials and confirmations."""

    def __init__(
        self,
        search: Search,
        study,
        runner: Runner,
        jobs: int,
        *,
        out: Callable[[str], None] = print,
        poll: float = POLL_SECONDS,
        stop_requested: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.search, self.study, self.runner, self.jobs = search, study, runner, jobs
        self.out, self.poll, self.stop_requested = out, poll, stop_requested
        self.clock, self.now = clock, now
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}"
        self.active: dict[int, Job] = {}
        self.settled_at = -math.inf
        self.waiting_said = False

    # the loop

    def run(self) -> None:
        """Run trials until the study has ``trials`` of them and every confirmation."""
        self.settle()
        while True:
            if self.stop_requested():
                raise KeyboardInterrupt
            for job in list(self.active.values()):
                try:
                    self.watch(job)
                except UpdateFinishedTrialError:  # ended by another process (see claim)
                    self.active.pop(job.number, None)
                    self.runner.stop([job.name])
                    self.out(
                        f"search: trial {job.number} was ended by another process; "
                        "its experiment here is stopped"
                    )
            self.fill()
            if not self.active and self.all_done():
                return
            self.sleep()

    def sleep(self) -> None:
        end = self.clock() + self.poll
        while self.clock() < end and not self.stop_requested():
            time.sleep(min(0.2, self.poll))

    def fill(self) -> None:
        while len(self.active) < self.jobs:
            job = self.next_job()
            if job is None:
                return
            self.launch(job)

    def trials(self):
        return self.study.get_trials(deepcopy=False)

    def next_job(self) -> Job | None:
        """The next trial to run: a queued confirmation, else a new search trial while the
        budget lasts; None when there is none for now."""

        while True:
            trials = self.trials()
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if len(counted(trials)) >= self.search.trials and not waiting:
                return None
            trial = self.study.ask()
            try:
                if not self.claim(trial):
                    continue
                if is_confirmation(trial):
                    job = self.confirmation_job(trial)
                else:
                    job = self.search_job(trial)
            except UpdateFinishedTrialError:
                continue  # another process took it too, and has finished with it (see claim)
            if job is not None:
                return job
            if trial.user_attrs.get(NOT_COUNTED_ATTR) == "withdrawn" and not is_confirmation(
                trial
            ):
                return None  # the budget is full: asking again would only withdraw again

    def claim(self, trial) -> bool:
        """Mark ``trial`` as this process's; False when another process claimed it as well.

        Optuna hands a queued trial to one process only with a storage that pops it atomically:
        a journal file, or an RDB with row locks (PostgreSQL, MySQL). SQLite has no SELECT ...
        FOR UPDATE, and two processes on one SQLite study were each given the same queued
        confirmation (seen here); the owner read back after writing it settles most such
        races, and a trial the other process has already ended is skipped (next_job)."""
        trial.set_user_attr(OWNER_ATTR, self.owner)
        trial.set_user_attr(ALIVE_ATTR, self.now())
        return trial.user_attrs.get(OWNER_ATTR) == self.owner

    def search_job(self, trial) -> Job | None:
        places = [t.number for t in counted(self.trials())]
        if trial.number not in places:  # another process was given it too and ended it
            return None
        if places.index(trial.number) >= self.search.trials:  # another took the last place
            self.give_up(trial, "withdrawn", "the budget was full when it was asked")
            return None
        values = suggest(trial, self.search.space)
        try:
            params_mod.parse(self._raw(values), self.search.path)
        except VaelabError as error:  # a combination the schema refuses: a failed trial
            reason = str(error).removeprefix(f"{self.search.path}: ")
            self.tell_failed(trial, f"refused before running: {reason}")
            self.out(f"search: trial {trial.number} FAILED ({shown(values)}): {reason}")
            return None
        name = f"{self.search.name}-{trial.number}"
        return Job(trial, name, values, self.now(), self.clock())

    def confirmation_job(self, trial) -> Job | None:

        confirms, seed = trial.user_attrs[CONFIRMS_ATTR], trial.user_attrs[SEED_ATTR]
        taken = [
            t
            for t in self.trials()
            if is_confirmation(t)
            and t.number < trial.number
            and (t.user_attrs[CONFIRMS_ATTR], t.user_attrs[SEED_ATTR]) == (confirms, seed)
            and t.state in (TrialState.COMPLETE, TrialState.RUNNING)
        ]
        if taken:  # two processes queued the same confirmation; the first one asked runs it
            self.give_up(trial, "withdrawn", f"trial {taken[0].number} runs this confirmation")
            return None
        values = suggest(trial, self.search.space)
        name = f"{self.search.name}-{confirms}-s{seed}"
        return Job(trial, name, values, self.now(), self.clock(), confirms=confirms, seed=seed)

    def _raw(self, values: dict[str, Any], seed: int | None = None) -> dict:
        import copy

        raw = copy.deepcopy(self.search.raw)
        for key, value in values.items():
            section, name = key.split(".", 1)
            raw[section][name] = value
        if seed is not None:
            raw["train"]["seed"] = seed
        return raw

    def overrides(self, job: Job) -> dict[str, str]:
        settings = {**self.search.fixed, **job.values}
        if job.seed is not None:
            settings["train.seed"] = job.seed
        return {key: override(value) for key, value in settings.items()}

    def launch(self, job: Job) -> None:
        pgid = self.runner.launch(job.name, self.overrides(job))
        for key, value in (
            (EXPERIMENT_ATTR, job.name),
            (LAUNCHED_ATTR, job.launched),
            (PGID_ATTR, pgid),
        ):
            job.trial.set_user_attr(key, value)
        job.beat = self.clock()
        self.active[job.number] = job
        if job.confirms is None:
            self.out(
                f"search: trial {job.number} started ({shown(job.values)}) as {job.name}  "
                f"[{self.status()}]"
            )
        else:
            self.out(
                f"search: confirmation of trial {job.confirms} with train.seed={job.seed} "
                f"started as {job.name}  [{self.status()}]"
            )

    def watch(self, job: Job) -> None:
        """Look at a running experiment once: heartbeat, its run, its new epochs (reported,
        pruned when the pruner says so), its end."""
        code = self.runner.poll(job.name)
        if self.clock() - job.beat >= HEARTBEAT_SECONDS:
            job.trial.set_user_attr(ALIVE_ATTR, self.now())
            job.beat = self.clock()
        if job.run_id is None:
            job.run_id = self.runner.run_id(job.name, job.launched)
            if job.run_id is not None:
                self.runner.adopt(job.run_id, self._trial_tag(job), job.confirms)
        if code is None and job.confirms is None and job.run_id is not None:
            epoch = self.report(job, judge=self.search.pruner.name != "none")
            if epoch is not None:
                self.prune(job, epoch)
            return
        if code is None:
            return
        del self.active[job.number]
        if code == 0:
            self.finish(job)
        else:
            tail = self.runner.tail(job.name)
            self.fail(job, f"its experiment exited with {code}; its output ends:\n{tail}")

    def _trial_tag(self, job: Job) -> int | None:
        return job.number if job.confirms is None else None

    def report(self, job: Job, judge: bool) -> int | None:
        """Tell Optuna the epochs of the trial's curve it has not had yet, in order; with
        ``judge``, ask the pruner after each: the epoch it says to prune at, else None. (The
        curve is read every ``poll`` seconds; ``job.seen`` is its last epoch at this look.)"""
        curve = self.runner.curve(job.run_id, self.search.curve)
        job.seen = max((epoch for epoch, _ in curve), default=job.seen)
        for epoch, value in curve:
            if epoch <= job.reported or not math.isfinite(value):
                continue
            job.trial.report(value, epoch)
            job.reported = epoch
            if judge and job.trial.should_prune():
                return epoch
        return None

    def prune(self, job: Job, epoch: int) -> None:
        """Stop the experiment (it stops within the epoch it is in: the stage checks between
        two steps), its run KILLED with the epoch of the decision (``vaelab.pruned``) and the
        last epoch the search had seen when it decided (``vaelab.pruned_seen``: the epochs are
        read every ``poll`` seconds, so on a fast machine the run may be ahead of the decision),
        the trial PRUNED."""

        del self.active[job.number]
        self.runner.stop([job.name])
        tags = {"vaelab.pruned": str(epoch), "vaelab.pruned_seen": str(job.seen)}
        self.runner.end_run(job.run_id, tags)
        job.trial.set_user_attr(PRUNED_ATTR, epoch)
        job.trial.set_user_attr(SEEN_ATTR, job.seen)
        self.study.tell(job.trial, state=TrialState.PRUNED)
        value = dict(self.runner.curve(job.run_id, self.search.curve)).get(epoch)
        what = f"{self.search.curve} = {value:.4f}" if value is not None else ""
        if job.seen > epoch:
            what += f"; seen at epoch {job.seen}"
        self.out(
            f"search: trial {job.number} pruned at epoch {epoch} ({what}) after "
            f"{duration(self.clock() - job.started)}  [{self.status()}]"
        )
        self.runner.progress(self.counts(), self.best_dict())

    def finish(self, job: Job) -> None:
        run_id = self.runner.run_id(job.name, job.launched, finished=True)
        if run_id is None:
            self.fail(job, "its experiment ended, but no FINISHED MLflow run of it was found")
            return
        job.run_id = run_id
        self.runner.adopt(run_id, self._trial_tag(job), job.confirms)
        value = self.runner.metrics(run_id).get(self.search.metric)
        if value is None or not math.isfinite(value):
            self.fail(job, f"its run {run_id} has no finite {self.search.metric}")
            return
        if job.confirms is None:  # the whole curve, for the pruner's later comparisons
            self.report(job, judge=False)
        best = self.best()
        self.study.tell(job.trial, value)
        took = duration(self.clock() - job.started)
        if job.confirms is not None:
            self.out(
                f"search: confirmation of trial {job.confirms} with train.seed={job.seed} "
                f"finished: {self.search.metric} = {value:.4f} in {took}  "
                f"[{self.status()}]"
            )
            return
        new = best is None or search_report.is_better(value, best.value, self.search.direction)
        self.out(
            f"search: trial {job.number} finished: {self.search.metric} = {value:.4f}"
            f"{' (new best)' if new else ''} in {took}  [{self.status()}]"
        )
        self.runner.progress(self.counts(), self.best_dict())

    def fail(self, job: Job, reason: str) -> None:
        if job.run_id is not None:
            self.runner.adopt(job.run_id, self._trial_tag(job), job.confirms)
        self.tell_failed(job.trial, reason)
        what = (
            f"trial {job.number}"
            if job.confirms is None
            else f"confirmation of trial {job.confirms} with train.seed={job.seed}"
        )
        self.out(
            f"search: {what} FAILED after {duration(self.clock() - job.started)}: {reason}"
            f"  [{self.status()}]"
        )

    def tell_failed(self, trial, reason: str) -> None:

        trial.set_user_attr(FAILED_ATTR, reason[-2000:])
        self.study.tell(trial, state=TrialState.FAIL)
        self.runner.progress(self.counts(), self.best_dict())

    def give_up(self, trial, why: str, reason: str) -> None:
        """A trial told FAIL outside the budget: ``why`` = interrupted or withdrawn."""
        trial.set_user_attr(NOT_COUNTED_ATTR, why)
        self.tell_failed(trial, reason)

    # stopping, settling, finishing

    def stop_all(self, reason: str) -> None:
        """Ctrl-C, SIGTERM or an error: stop every running experiment (their runs KILLED), tell
        their trials FAIL, not counted, so that the next ``make search`` runs them anew."""
        jobs = list(self.active.values())
        self.active.clear()
        if not jobs:
            return
        self.out(f"search: stopping {len(jobs)} running experiments ({reason})")
        self.runner.stop([job.name for job in jobs])
        for job in jobs:
            run_id = job.run_id or self.runner.run_id(job.name, job.launched)
            if run_id is not None:
                self.runner.adopt(run_id, self._trial_tag(job), job.confirms)
                self.runner.end_run(run_id, {"vaelab.interrupted": reason})
            self.give_up(job.trial, "interrupted", f"interrupted: {reason}")

    def settle(self) -> None:
        """Trials left RUNNING by a process that died: its experiment stopped when it still
        runs on this machine; the trial adopted as COMPLETE when the experiment had finished
        (a finished trial is never lost), else failed, not counted."""

        self.settled_at = self.clock()
        for trial in self.study.get_trials(states=(TrialState.RUNNING,)):
            if trial.number in self.active or not abandoned(
                trial, self.host, self.now(), self.pid
            ):
                continue
            attrs = trial.user_attrs
            name, pgid = attrs.get(EXPERIMENT_ATTR), attrs.get(PGID_ATTR)
            owner_host = attrs.get(OWNER_ATTR, "").rpartition(":")[0]
            if name and pgid and owner_host == self.host and group_runs(pgid, name):
                self.runner.stop_orphan(pgid, name)
            run_id = None
            if name and LAUNCHED_ATTR in attrs:
                run_id = self.runner.run_id(name, attrs[LAUNCHED_ATTR], finished=True)
            value = self.runner.metrics(run_id).get(self.search.metric) if run_id else None
            storage, trial_id = self.study._storage, trial._trial_id
            try:
                if value is not None and math.isfinite(value):
                    confirms = attrs.get(CONFIRMS_ATTR)
                    self.runner.adopt(run_id, trial.number if confirms is None else None, confirms)
                    if not is_confirmation(trial):
                        for epoch, point in self.runner.curve(run_id, self.search.curve):
                            if epoch not in trial.intermediate_values and math.isfinite(point):
                                storage.set_trial_intermediate_value(trial_id, epoch, point)
                    self.study.tell(trial.number, value)
                    self.out(
                        f"search: trial {trial.number}, left running by {attrs.get(OWNER_ATTR)}"
                        f" (gone), had finished: {self.search.metric} = {value:.4f}; kept"
                    )
                else:
                    storage.set_trial_user_attr(trial_id, NOT_COUNTED_ATTR, "interrupted")
                    storage.set_trial_user_attr(
                        trial_id, FAILED_ATTR, f"its process {attrs.get(OWNER_ATTR)} died"
                    )
                    self.study.tell(trial.number, state=TrialState.FAIL)
                    self.out(
                        f"search: trial {trial.number}, left running by "
                        f"{attrs.get(OWNER_ATTR)} (gone), did not finish: not counted, "
                        "run anew"
                    )
            except (UpdateFinishedTrialError, ValueError, RuntimeError):
                continue  # another process settled it first

    def all_done(self) -> bool:
        """With nothing running here: whether the study is done (trials and confirmations).
        Waits while others run trials; queues the confirmations once the trials are done."""

        if self.clock() - self.settled_at >= SETTLE_SECONDS:
            self.settle()
        trials = self.trials()
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if running:
            if not self.waiting_said:
                self.out(
                    f"search: waiting for {len(running)} trials other processes run "
                    f"({', '.join(str(t.number) for t in running)})"
                )
                self.waiting_said = True
            return False
        self.waiting_said = False
        if len(counted(trials)) < self.search.trials:
            return False
        if any(t.state == TrialState.WAITING for t in trials):
            return False
        return not self.queue_confirmations(trials)

    def confirmations_due(self, trials) -> list[tuple[int, int, dict]]:
        """(trial number, seed, params) of every confirmation the study still needs: the top
        configurations' seeds without a finished, running or queued confirmation (one that
        failed counts as done, except an interrupted one)."""

        confirm = self.search.confirm
        if confirm.top == 0:
            return []
        done = {
            (t.user_attrs[CONFIRMS_ATTR], t.user_attrs[SEED_ATTR])
            for t in trials
            if is_confirmation(t)
            and (t.state != TrialState.FAIL or NOT_COUNTED_ATTR not in t.user_attrs)
        }
        top = search_report.top_configurations(
            self.records(trials), self.search.direction, confirm.top
        )
        by_number = {t.number: t for t in trials}
        return [
            (record.number, seed, by_number[record.number].params)
            for record in top
            for seed in confirm.seeds
            if (record.number, seed) not in done
        ]

    def queue_confirmations(self, trials) -> bool:
        due = self.confirmations_due(trials)
        for number, seed, params in due:
            attrs = {KIND_ATTR: "confirm", CONFIRMS_ATTR: number, SEED_ATTR: seed}
            self.study.enqueue_trial(params, user_attrs=attrs)
        if due:
            tops = sorted({number for number, _, _ in due})
            self.out(
                f"search: the trials are done; confirming trials {', '.join(map(str, tops))}"
                f" with train.seed {', '.join(map(str, self.search.confirm.seeds))} "
                f"({len(due)} runs)"
            )
        return bool(due)

    # what the study holds

    def records(self, trials=None) -> list[TrialRecord]:
        return records(trials if trials is not None else self.trials(), self.search)

    def best(self) -> TrialRecord | None:
        return search_report.best_trial(self.records(), self.search.direction)

    def best_dict(self) -> dict | None:
        best = self.best()
        return (
            None
            if best is None
            else {"value": best.value, "number": best.number, "params": best.params}
        )

    def counts(self) -> dict[str, int]:
        states = [r.state for r in self.records() if r.counted]
        return {s.lower(): states.count(s) for s in search_report.STATES}

    def status(self) -> str:
        """ "2 running, 5 of 16 done, best 97.1234 (trial 3), about 12 min left"."""
        trials = self.trials()
        records = self.records(trials)
        ended = [r for r in records if r.counted and r.state in search_report.STATES]
        running = [job for job in self.active.values()]
        text = f"{len(running)} running, {len(ended)} of {self.search.trials} done"
        best = search_report.best_trial(records, self.search.direction)
        if best is not None:
            text += f", best {best.value:.4f} (trial {best.number})"
        left = search_report.estimate_left(
            [r.seconds for r in ended if r.seconds is not None],
            [r.seconds for r in ended if r.state == "COMPLETE" and r.seconds is not None],
            [self.clock() - job.started for job in running],
            max(0, self.search.trials - len(counted(trials))),
            self.confirmations_left(trials),
            max(self.jobs, len(running)),
        )
        return text + (f", about {duration(left)} left" if left is not None else "")

    def confirmations_left(self, trials) -> int:

        confirm = self.search.confirm
        finished = sum(1 for t in trials if is_confirmation(t) and t.state == TrialState.COMPLETE)
        return max(0, confirm.top * len(confirm.seeds) - finished)


def records(trials, search: Search) -> list[TrialRecord]:
    """The study's search trials (not its confirmations) as report records."""
    kept = []
    for t in trials:
        if is_confirmation(t):
            continue
        seconds = None
        if t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        kept.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                params=decode(t.params, search.space),
                value=t.value if t.state.name == "COMPLETE" else None,
                curve=dict(t.intermediate_values),
                seconds=seconds,
                pruned_epoch=t.user_attrs.get(PRUNED_ATTR),
                reason=t.user_attrs.get(FAILED_ATTR, ""),
                counted=NOT_COUNTED_ATTR not in t.user_attrs,
            )
        )
    return kept


# --- the real runner: DVC experiments read from MLflow -----------------------------------------


class DvcRunner:
    """Trials as ``dvc exp run --temp`` experiments (``vaelab.experiments.TempExperiment``),
    their runs read and tagged in MLflow (``vaelab.tracking.searches.SearchRuns``)."""

    def __init__(self, runs, logs: Path, jobs: int) -> None:
        self.runs, self.logs = runs, logs
        self.env = threads_env(jobs)
        self.running: dict[str, TempExperiment] = {}

    def launch(self, name: str, overrides: dict[str, str]) -> int:
        experiment = TempExperiment.start(name, overrides, self.logs / f"{name}.log", self.env)
        self.running[name] = experiment
        return experiment.pgid

    def poll(self, name: str) -> int | None:
        return self.running[name].poll()

    def stop(self, names: list[str]) -> None:
        experiments = [self.running.pop(name) for name in names if name in self.running]
        for experiment in experiments:  # every one told first, then each waited for
            with contextlib.suppress(ProcessLookupError):
                os.killpg(experiment.pgid, signal.SIGINT)
        for experiment in experiments:
            experiment.stop()

    def stop_orphan(self, pgid: int, name: str) -> bool:
        stop_group(pgid, wait_for_group(pgid), 120.0, Path("."), name)
        return True

    def run_id(self, name: str, since: float, finished: bool = False) -> str | None:
        run = self.runs.find_run(name, since, finished)
        return None if run is None else run.info.run_id

    def curve(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.runs.curve(run_id, key)

    def metrics(self, run_id: str) -> dict[str, float]:
        return self.runs.metrics(run_id)

    def adopt(self, run_id: str, trial: int | None, confirms: int | None) -> None:
        self.runs.adopt(run_id, trial=trial, confirms=confirms)

    def end_run(self, run_id: str, tags: dict[str, str]) -> None:
        self.runs.end_run(run_id, "KILLED", tags)

    def progress(self, counts: dict[str, int], best: dict | None) -> None:
        self.runs.record_progress(counts, best)

    def tail(self, name: str) -> str:
        experiment = self.running.pop(name, None)
        if experiment is None:
            return "(no log)"
        return f"{experiment.tail()}\n(all of it: {experiment.log})"


# --- the report --------------------------------------------------------------------------------


def importances(study, search: Search) -> dict[str, float]:
    """fANOVA importances of the searched keys over the COMPLETE search trials (a study of
    those alone, so confirmations weigh nothing); empty with fewer than
    MIN_IMPORTANCE_TRIALS, or one key."""

    done = [
        t
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if not is_confirmation(t)
    ]
    if len(done) < MIN_IMPORTANCE_TRIALS or len(search.space) < 2:
        return {}
    alone = optuna.create_study(direction=search.direction)
    alone.add_trials(done)
    try:
        found = optuna.importance.get_param_importances(
            alone, evaluator=FanovaImportanceEvaluator(seed=search.seed)
        )
    except (RuntimeError, ValueError):  # e.g. every trial had the same params
        return {}
    return dict(found)


def write_report(
    search: Search, study, runs, report: Path, figures: Path, storage: str
) -> search_report.Verdict | None:
    """reports/search.md and its figures, logged to the parent run; the verdict on it."""
    trial_records = records(study.get_trials(deepcopy=False), search)
    grouped = verdict = None
    if search.confirm.top:
        confirmation = runs.confirmation_runs()
        if len(confirmation):
            table = search_report.confirmation_table(
                confirmation, search.metric, list(search.space)
            )
            grouped, verdict = search_report.decide(table, search.metric, search.direction)
        else:
            verdict = search_report.Verdict(None, (), "No confirmation run finished.")
    found = importances(study, search)
    drawn = search_report.plot_figures(
        trial_records,
        metric=search.metric,
        curve=search.curve,
        direction=search.direction,
        space=search.space,
        importances=found,
        folder=figures,
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        search_report.markdown(
            search.name,
            trial_records,
            metric=search.metric,
            direction=search.direction,
            keys=list(search.space),
            storage=storage,
            grouped=grouped,
            verdict=verdict,
            importances=found,
            figures=drawn,
            report_dir=report.parent,
        )
    )
    runs.log_report([report, *drawn])
    if verdict is not None:
        runs.set_verdict(verdict.winner, verdict.text)
    return verdict


# --- the command -------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT and SIGTERM only recorded, for the loop to read between two looks (raised at an
    arbitrary point they could land in a storage write); a second one stops at once."""
    received: list[int] = []

    def request(signum, frame) -> None:
        received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_names(search: Search, study) -> None:
    """A new study whose trials' DVC experiments would take the names of an earlier search's
    (the same file name, a study since deleted) is refused: DVC would refuse every trial."""
    if study.trials:
        return
    try:
        listed = subprocess.run(
            ["dvc", "exp", "list", "--all-commits", "--name-only"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return
    taken = [n for n in listed if re.fullmatch(rf"{re.escape(search.name)}-\d+(-s\d+)?", n)]
    if taken:
        raise VaelabError(
            f"{search.path}: the study '{search.name}' is new, but DVC experiments of an earlier "
            f"search of that name exist ({', '.join(sorted(taken)[:5])}...): its trials would "
            f"take their names. Remove them (dvc exp remove {' '.join(sorted(taken)[:3])} ...) or "
            "name this search otherwise (copy the file under another name)."
        )


def parent_params(search: Search, storage: str) -> dict[str, str]:
    space = {f"search.{k}": json.dumps(asdict(v), default=list) for k, v in search.space.items()}
    fixed = {f"fixed.{k}": json.dumps(v) for k, v in search.fixed.items()}
    return (
        space
        | fixed
        | {
            "search.metric": search.metric,
            "search.direction": search.direction,
            "search.pruner": search.pruner.name,
            "search.seed": str(search.seed),
            "search.storage": storage,
        }
    )


def main(argv: list[str] | None = None) -> None:
    from vaelab.tracking.searches import SearchRuns

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", type=Path, required=True, help="the search file (YAML)")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--pipeline", type=Path, required=True, help="dvc.yaml")
    parser.add_argument("--state", type=Path, required=True, help="journal and trial logs")
    parser.add_argument("--report", type=Path, required=True, help="the report's .md")
    parser.add_argument("--figures", type=Path, required=True, help="the report's figures")
    parser.add_argument("--storage", default="", help="an Optuna storage URL or journal file")
    parser.add_argument("--jobs", type=int, help="experiments at a time (default: the file's)")
    args = parser.parse_args(argv)
    search = load_search(args.search, args.params, args.pipeline)
    jobs = args.jobs if args.jobs is not None else search.jobs
    if jobs < 1:
        raise VaelabError(f"--jobs is {jobs}; run at least 1 experiment at a time")
    default = args.state / f"{search.name}.journal"
    storage = shown_storage(args.storage, default)
    study = open_study(search, open_storage(args.storage, default))
    check_names(search, study)
    runs = SearchRuns(params_mod.load(args.params).mlflow.experiment, search.name)
    parent, existed = runs.start_parent(parent_params(search, storage))
    print(
        f"search: '{search.name}', {search.trials} trials on {search.metric} "
        f"({len(study.trials)} in the study so far), {jobs} at a time; study {storage}; "
        f"MLflow parent run {parent}{' (continued)' if existed else ''}",
        flush=True,
    )
    runner = DvcRunner(runs, args.state / "logs", jobs)
    started = time.monotonic()
    with stop_signals() as stop_requested:
        searcher = Searcher(
            search,
            study,
            runner,
            jobs,
            out=lambda line: print(line, flush=True),
            stop_requested=stop_requested,
        )
        try:
            searcher.run()
            runner.progress(searcher.counts(), searcher.best_dict())
            verdict = write_report(search, study, runs, args.report, args.figures, storage)
        except BaseException as error:  # also Ctrl-C: no trial left RUNNING, the parent ended
            why = (
                "interrupted (Ctrl-C or SIGTERM)"
                if isinstance(error, KeyboardInterrupt)
                else (f"{type(error).__name__}: {error}")
            )
            searcher.stop_all(why)
            runs.end(
                "FAILED",
                f"The search stopped: {why}. Run make search again to continue "
                "it; no finished trial is lost.",
            )
            raise
    print(
        f"search: done in {duration(time.monotonic() - started)}; report {args.report}, "
        f"figures in {args.figures}"
    )
    note = f"Search '{search.name}' over {', '.join(search.space)}."
    if verdict is not None:
        print(f"search: {verdict.text}")
        print(f"search: {search_report.test_sentence(verdict)}")
        note += f" {verdict.text}"
    runs.end("FINISHED", note)


if __name__ == "__main__":
    run_stage(main)
