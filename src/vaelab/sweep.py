"""A sweep (``make sweep``): a grid of params values run as queued DVC experiments under one MLflow
parent run, a few at a time, watched until each has ended, then compared into the parent.

    python -m vaelab.sweep --params params.yaml --report reports/comparison.md \
        --figures reports/comparison --grid "model.latent_dims=5,10 train.seed=0,1,2" \
        [--label NAME] [--jobs 2] [--max 64]

1. The grid is checked before anything is queued: each item is ``key=value,value,...``, every key
   is a params key, every combination passes the params schema, and there are at most ``--max``
   combinations.
2. The sweep's parent run is started (``vaelab.tracking.sweeps``): every run whose
   ``mlflow.sweep`` is the label becomes its child.
3. ``dvc exp run --queue -S key=a,b ... -S mlflow.sweep=LABEL``: DVC's own grid, one queued
   experiment per combination; ``dvc queue start -j JOBS`` with the cores shared out.
4. A line whenever one of them starts, finishes or fails: its name, params and time taken. The
   sweep stops with the reason (its parent run FAILED) when ``dvc queue start`` exits non-zero,
   or when no worker takes the queued experiments up within ``PICKUP_SECONDS``.
5. ``python -m vaelab.compare`` on exactly the sweep's runs, logged into the parent run (FAILED,
   with the reason, when an experiment failed).
"""

from __future__ import annotations

import argparse
import ast
import copy
import itertools
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vaelab import params as params_mod
from vaelab.errors import VaelabError, run_stage
from vaelab.experiments import duration as _duration
from vaelab.experiments import dvc, threads_env
from vaelab.tracking.sweeps import fail_sweep, start_sweep

SWEEP_KEY = "mlflow.sweep"  # set by the sweep itself: the label of its runs
POLL_SECONDS = 5.0
# How long the sweep's queued experiments may all stand still, after `dvc queue start` has
# returned and with no queue worker busy, before the sweep stops. DVC 3.67's start returns at
# once with its workers detached, so its exit 0 says nothing about them; workers that die, or
# never start (`dvc queue start -j 0` prints "Started '0' new ... workers" and exits 0), would
# leave the experiments Queued forever. In a scratch repository a worker took the first
# experiment within 3 s; the bound is generous for a loaded machine.
PICKUP_SECONDS = 180.0


def split_values(text: str) -> list[str]:
    """``"5,10"`` -> ["5", "10"]; commas inside brackets belong to a list value:
    ``"[200,200],[512]"`` -> ["[200,200]", "[512]"] (DVC's grid syntax)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_grid(text: str) -> dict[str, list[str]]:
    """``"model.latent_dims=5,10 train.seed=0,1,2"`` -> {key: [values]}, in the order given."""
    grid: dict[str, list[str]] = {}
    for item in text.split():
        key, equals, values = item.partition("=")
        if not equals or not key:
            raise VaelabError(f"sweep: '{item}' is not KEY=VALUES, e.g. train.seed=0,1,2")
        if key in grid:
            raise VaelabError(f"sweep: '{key}' is given twice; give each key once with its values")
        if key == SWEEP_KEY:
            raise VaelabError(f"sweep: '{SWEEP_KEY}' is the sweep's own label; use --label")
        grid[key] = split_values(values)
        if any(value.strip() == "" for value in grid[key]):
            raise VaelabError(f"sweep: '{item}' has an empty value; list values like {key}=1,2")
    if not grid:
        raise VaelabError("sweep: the grid is empty; give KEY=VALUES items, e.g. train.seed=0,1")
    return grid


def combinations(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, {key: value}, the last key varying fastest."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def check_grid(params_file: Path, grid: dict[str, list[str]], most: int) -> int:
    """Refuse the grid before anything is queued: too many combinations, or one the params
    schema refuses (its message names the key and the value). Returns the combinations' count."""
    count = len(combinations(grid))
    if count > most:
        raise VaelabError(
            f"sweep: the grid has {count} combinations, more than the {most} allowed; raise the "
            f"limit to run them all: make sweep SWEEP_MAX={count} (python -m vaelab.sweep "
            f"--max {count})"
        )
    base = params_mod.load_yaml(params_file.read_text())
    params_mod.parse(base, params_file)  # the file itself first: its own errors are its own
    for combination in combinations(grid):
        raw = copy.deepcopy(base)
        for key, value in combination.items():
            section, dot, name = key.partition(".")
            if not dot or "." in name or not isinstance(raw.get(section, {}), dict):
                raise VaelabError(
                    f"sweep: '{key}' is not a params key; keys are SECTION.KEY, e.g. train.seed"
                )
            raw.setdefault(section, {})[name] = params_mod.load_yaml(value)
        where = ", ".join(f"{k}={v}" for k, v in combination.items())
        try:
            params_mod.parse(raw, params_file)
        except VaelabError as error:
            raise VaelabError(f"sweep: the combination {where} is refused: {error}") from None
    return count


@dataclass(frozen=True)
class Queued:
    name: str  # the DVC experiment's name, also its MLflow run's
    overrides: dict[str, str]  # the grid's values of this experiment


def _dvc(*args: str, env: dict | None = None) -> str:
    return dvc(*args, env=env, who="sweep")


def parse_queued(output: str) -> list[Queued]:
    """The experiments ``dvc exp run --queue`` printed: each "Queueing with overrides '{...}'."
    line is followed by "Queued experiment 'NAME' for future execution."."""
    queued, overrides = [], None
    for line in output.splitlines():
        found = re.match(r"Queueing with overrides '(\{.*\})'\.", line)
        if found:
            listed = ast.literal_eval(found.group(1)).get("params.yaml", [])
            overrides = dict(item.split("=", 1) for item in listed)
            overrides.pop(SWEEP_KEY, None)
        found = re.match(r"Queued experiment '([^']+)' for future execution", line)
        if found:
            queued.append(Queued(found.group(1), overrides or {}))
            overrides = None
    return queued


def queue(grid: dict[str, list[str]], label: str) -> list[Queued]:
    """One queued DVC experiment per combination (DVC's ``-S key=a,b`` grid), labelled."""
    settings = [arg for key, values in grid.items() for arg in ("-S", f"{key}={','.join(values)}")]
    output = _dvc("exp", "run", "--queue", *settings, "-S", f"{SWEEP_KEY}={label}")
    queued = parse_queued(output)
    if len(queued) != len(combinations(grid)):
        raise VaelabError(
            f"sweep: expected {len(combinations(grid))} queued experiments, DVC printed "
            f"{len(queued)}:\n{output}"
        )
    return queued


def parse_queue_status(output: str) -> dict[str, str]:
    """``dvc queue status``'s table as {experiment name: status} (Queued, Running, Success,
    Failed, ...): the second column is the name, the last the status."""
    statuses = {}
    for line in output.splitlines()[1:]:
        if not line.strip() or line.startswith("Worker status"):
            continue
        cells = line.split()
        if len(cells) >= 3:
            statuses[cells[1]] = cells[-1]
    return statuses


def parse_busy_workers(output: str) -> int | None:
    """The busy workers in ``dvc queue status``'s last line, "Worker status: 1 active, 0 idle"
    (DVC 3.67: active = running an experiment, idle = waiting); None when there is no such line."""
    found = re.search(r"^Worker status: (\d+) active", output, re.MULTILINE)
    return int(found.group(1)) if found else None


class Progress:
    """What changed since the last look at the queue, as lines: an experiment started, finished
    or failed, with its params and the time since it was first seen running."""

    def __init__(self, queued: list[Queued], started: float) -> None:
        self.queued = {q.name: q for q in queued}
        self.status = {q.name: "Queued" for q in queued}
        self.running_since: dict[str, float] = {}
        self.last_look = started
        self.moved_at = started  # when one of them last changed status

    def update(self, statuses: dict[str, str], now: float) -> list[str]:
        lines = []
        for name, before in self.status.items():
            after = statuses.get(name, before)
            if after == before:
                continue
            what = ", ".join(f"{k}={v}" for k, v in self.queued[name].overrides.items())
            if after == "Running":
                self.running_since[name] = now
                lines.append(f"sweep: started {name} ({what})")
            elif after != "Queued":
                since = self.running_since.get(name)
                took = f"in {_duration(now - since)}" if since is not None else ""
                if since is None:  # it started and ended between two looks at the queue
                    took = f"within {_duration(now - self.last_look)}"
                if after == "Success":
                    lines.append(f"sweep: finished {name} ({what}) {took}")
                else:
                    lines.append(
                        f"sweep: FAILED {name} ({what}) {took} ({after}); its log: "
                        f"dvc queue logs {name}"
                    )
            self.status[name] = after
            self.moved_at = now
        self.last_look = now
        return lines

    @property
    def done(self) -> bool:
        return all(s not in ("Queued", "Running") for s in self.status.values())

    def counts(self) -> str:
        values = list(self.status.values())
        running, waiting = values.count("Running"), values.count("Queued")
        return f"{running} running, {waiting} queued, {len(values) - running - waiting} ended"


def _output(log) -> str:
    log.seek(0)
    return log.read().strip() or "(nothing)"


def watch(queued: list[Queued], workers: subprocess.Popen, log) -> Progress:
    """Print a line whenever one of ``queued`` starts, finishes or fails, until all have ended.
    Stops with the reason when ``workers`` (``dvc queue start``, its messages in ``log``) exits
    non-zero, or when, after it has returned, none of ``queued`` has changed status for
    ``PICKUP_SECONDS``, none is running and ``dvc queue status`` shows no busy worker."""
    progress = Progress(queued, time.monotonic())
    print(f"sweep: waiting for {len(queued)} experiments ({progress.counts()})", flush=True)
    returned_at = None
    while not progress.done:
        time.sleep(POLL_SECONDS)
        # Polled while watching: a start that failed leaves every experiment Queued, and the
        # queue's status alone would be watched forever.
        code = workers.poll()
        if code is not None and code != 0:
            raise VaelabError(
                f"sweep: dvc queue start failed (exit {code}), so no experiment of the sweep "
                f"will run; it printed:\n{_output(log)}"
            )
        output = _dvc("queue", "status")
        now = time.monotonic()
        for line in progress.update(parse_queue_status(output), now):
            print(f"{line}  [{progress.counts()}]", flush=True)
        if code is not None and returned_at is None:
            returned_at = now
        # A worker busy with another experiment of the queue (one queued before the sweep) will
        # come to the sweep's; without a "Worker status" line the bound alone decides.
        busy = parse_busy_workers(output)
        if (
            returned_at is not None
            and "Running" not in progress.status.values()
            and not busy
            and now - max(returned_at, progress.moved_at) >= PICKUP_SECONDS
        ):
            waiting = list(progress.status.values()).count("Queued")
            shown = next(
                (line for line in output.splitlines() if line.startswith("Worker status")),
                "no worker status line",
            )
            raise VaelabError(
                f"sweep: {waiting} experiments of the sweep have stayed queued for "
                f"{_duration(now - max(returned_at, progress.moved_at))} with no queue worker "
                f"busy ({shown}) since dvc queue start returned; see why with dvc queue status "
                f"and dvc queue logs NAME, then start the workers again with dvc queue start, "
                f"or drop every queued experiment with dvc queue remove --queued. dvc queue start "
                f"printed:\n{_output(log)}"
            )
    return progress


def default_label(grid: dict[str, list[str]]) -> str:
    """The swept keys' last parts and the time: latent_dims-seed-20261202-101500."""
    keys = "-".join(key.rsplit(".", 1)[-1] for key in grid)
    return f"{keys}-{time.strftime('%Y%m%d-%H%M%S')}"


def compare_command(args: argparse.Namespace, label: str, expected: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vaelab.compare",
        "--params",
        str(args.params),
        "--report",
        str(args.report),
        "--figures",
        str(args.figures),
        "--filter",
        f"tags.sweep = '{label}'",
        "--expect-runs",
        str(expected),
        "--sweep",
        label,
    ]


def run_queue(queued: list[Queued], jobs: int) -> None:
    """``dvc queue start -j JOBS``, watched until every one of ``queued`` has ended."""
    env = threads_env(jobs)  # each worker's torch threads: the cores shared out
    # `dvc queue start` (DVC 3.67) may return at once, its workers detached ("Started '2' new
    # experiments task queue workers."), or once they have emptied the queue: either way the
    # queue's own status says when every experiment has ended, so that is what is watched, with
    # the start's exit status polled meanwhile (see watch). Its messages go to a file, which a
    # pipe nobody reads could not take.
    with tempfile.TemporaryFile("w+") as log:
        workers = subprocess.Popen(
            ["dvc", "queue", "start", "-j", str(jobs)], env=env, stdout=log, stderr=log
        )
        watch(queued, workers, log)
        # Every experiment has ended; a start still in the foreground ends with its workers.
        code = workers.wait()
        if code != 0:
            raise VaelabError(f"sweep: dvc queue start failed (exit {code}):\n{_output(log)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="the comparison's .md")
    parser.add_argument("--figures", type=Path, required=True, help="the comparison's figures")
    parser.add_argument("--grid", required=True, help='"KEY=V1,V2 KEY=V1,V2 ...", as dvc -S')
    parser.add_argument("--label", help="the runs' sweep tag (default: keys and time)")
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at a time")
    parser.add_argument("--max", type=int, default=64, help="the most combinations to queue")
    args = parser.parse_args(argv)
    if args.jobs < 1:  # DVC would start no worker, exit 0, and leave the queue waiting
        raise VaelabError(f"sweep: --jobs is {args.jobs}; run at least 1 experiment at a time")
    grid = parse_grid(args.grid)
    count = check_grid(args.params, grid, args.max)
    label = args.label or default_label(grid)
    experiment = params_mod.load(args.params).mlflow.experiment
    swept = {key: ",".join(values) for key, values in grid.items()}
    run_id = start_sweep(experiment, label, swept)
    print(f"sweep: MLflow parent run {run_id} for the {count} runs of sweep '{label}'")
    try:
        queued = queue(grid, label)
        run_queue(queued, args.jobs)
    except BaseException as error:  # also Ctrl-C: the parent must not stay RUNNING
        fail_sweep(experiment, label, f"{type(error).__name__}: {error}"[:2000])
        raise
    done = subprocess.run(compare_command(args, label, len(queued)))
    if done.returncode != 0:
        raise SystemExit(done.returncode)


if __name__ == "__main__":
    run_stage(main)
