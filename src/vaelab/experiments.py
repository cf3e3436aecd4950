"""Running DVC experiments from a command (``make sweep``, ``make search``): DVC's commands with
their errors as one message, the cores shared out among experiments run at once, durations as
people read them, and one experiment run in a temporary copy that can be stopped cleanly.

How a search runs its trials, and why not through DVC's queue (measured with DVC 3.67.1 in a
scratch repository whose stage trains for 30 one-second "epochs" and handles SIGINT/SIGTERM as
the train stage does):

- ``dvc exp run --temp -n NAME -S ...``, one process per trial, several at a time: each runs in
  its own copy under ``.dvc/tmp/exps/standalone/`` and, when it succeeds, leaves the experiment's
  ref (``dvc exp show``, ``make reproduce``, ``dvc exp push``) and its run-cache entries, like a
  queued one. Two at once ran side by side (8.3 and 8.8 s for 5 s of work each).
  **SIGINT to its process group** (what Ctrl-C does): DVC ignores SIGINT while its stage command
  runs, the stage stops between two steps and exits 2, DVC reports the stage failed and removes
  its temporary copy: no ref, no run-cache entry, nothing left but DVC's small executor info
  file, which every ``--temp`` run leaves. SIGTERM to the group instead killed DVC at once and
  left the half-run copy behind (``stop`` removes such a copy when it has to kill).
- The queue (``dvc exp run --queue`` + ``dvc queue start``): the worker took 9 s more to start an
  experiment, and ``dvc queue kill NAME`` stopped the stage 3-4 epochs after it returned; the
  killed experiment stayed in ``dvc queue status`` as Failed, with a ``refs/exps/celery/failed``
  ref and Celery messages under ``.dvc/tmp/exps/celery`` until ``dvc queue remove``. A search
  that stops trials as a matter of course would leave one such entry per pruned trial, and it
  launches trials one at a time anyway (it learns each trial's params only when it asks).

The sweep keeps the queue: its grid is known up front and nothing is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from vaelab.errors import VaelabError

# How long a stopped experiment may take to end (the stage stops between two steps; evaluate
# or record may be in the middle of a pass) before it is killed and its copy removed.
STOP_SECONDS = 120.0


def dvc(*args: str, env: dict | None = None, who: str = "dvc") -> str:
    """Run ``dvc ARGS``; its output, or a VaelabError (prefixed ``who:``) with what it printed."""
    done = subprocess.run(["dvc", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise VaelabError(f"{who}: dvc {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def threads_env(jobs: int) -> dict[str, str]:
    """The environment for ``jobs`` experiments at a time: each one's torch threads are the cores
    shared out (torch's default, all cores each, oversubscribes); an OMP_NUM_THREADS the user set
    is kept."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    return os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}


def duration(seconds: float) -> str:
    """``125`` -> "2 min 05 s", ``7`` -> "7 s"; an hour or more: "1 h 02 min"."""
    minutes, seconds = divmod(round(seconds), 60)
    if minutes >= 60:
        hours, minutes = divmod(minutes, 60)
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class TempExperiment:
    """One ``dvc exp run --temp -n NAME -S key=value ...`` in a process group of its own (so a
    terminal's Ctrl-C reaches the command that started it, which decides what to stop), its
    output in ``log``."""

    def __init__(self, name: str, process: subprocess.Popen, log: Path, repo: Path) -> None:
        self.name, self.process, self.log, self.repo = name, process, log, repo

    @classmethod
    def start(
        cls, name: str, overrides: dict[str, str], log: Path, env: dict, repo: Path = Path(".")
    ) -> TempExperiment:
        settings = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            process = subprocess.Popen(
                ["dvc", "exp", "run", "--temp", "-n", name, *settings],
                cwd=repo,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(name, process, log, repo)

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session: the leader's pid is the group's id

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self, wait: float = STOP_SECONDS) -> int:
        """Stop it as Ctrl-C would (SIGINT to its group) and wait for it to end; after ``wait``
        seconds SIGTERM, then SIGKILL, and its temporary copy is removed. Its exit status."""
        return stop_group(self.pgid, self.process.wait, wait, self.repo, self.name)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(nothing)"


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int, wait_for, wait: float, repo: Path, name: str) -> int:
    """SIGINT to process group ``pgid``, then ``wait_for(timeout)`` (raises
    subprocess.TimeoutExpired while it runs); escalates to SIGTERM and SIGKILL, and removes what
    DVC left of experiment ``name`` when it had to kill it."""
    _signal_group(pgid, signal.SIGINT)
    try:
        return wait_for(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        _signal_group(pgid, signum)
        try:
            code = wait_for(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            code = -signum
    remove_leftovers(repo, name)
    return code


def wait_for_group(pgid: int):
    """A ``wait_for(timeout)`` for a group this process did not start (an orphan of a search
    process that died): polls until no process of the group is left."""

    def wait_for(timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not _signal_group(pgid, 0):
                return 0
            time.sleep(0.2)
        raise subprocess.TimeoutExpired(f"process group {pgid}", timeout)

    return wait_for


def group_runs(pgid: int, name: str) -> bool:
    """Whether process group ``pgid`` still runs experiment ``name``: its leader is alive and is
    ``dvc exp run ... -n NAME`` (a pid reused by something else is not it)."""
    try:
        command = Path(f"/proc/{pgid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"exp" in command and b"-n" in command and name.encode() in command


def remove_leftovers(repo: Path, name: str) -> list[Path]:
    """The temporary copies DVC left of experiment ``name`` (its executor info files name each
    copy; DVC removes it itself when the experiment ends, killed ones excepted), removed."""
    removed = []
    for info in (repo / ".dvc" / "tmp" / "exps").glob("**/run/*/*.run"):
        try:
            entry = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        root = Path(entry.get("root_dir") or "")
        if entry.get("name") == name and root.is_dir() and ".dvc" in root.parts:
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed
