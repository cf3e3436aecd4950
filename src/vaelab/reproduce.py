"""Re-create a run from its id or name and say whether it came out identical:
``make reproduce RUN=<run id or name>``.

    python -m vaelab.reproduce --params params.yaml RUN [--threads N] [--experiment NAME]

1. The run is found in the MLflow store (by id, or by name in params.yaml's experiment): a
   complete training run that recorded what reproduction needs (its commit, its uncommitted
   changes, its data's MD5s, where it trained).
2. Its own code, params and data, without touching this workspace: a temporary clone of this
   repository (``git clone --shared``, which borrows the git objects) at the run's commit with
   the run's uncommitted diff applied (``git apply``); for a run of ``dvc exp run`` or the DVC
   queue, at its experiment's commit (only a ref whose baseline is the run's), with the files
   of the diff that commit lacks (DVC commits with ``git add -u``: a new file is left out) or
   has otherwise; the run's logged params in that clone's params.yaml; the data from this
   repository's DVC cache (else pulled, else fetched by ``prepare``), checked against the run's
   MD5s.
3. ``dvc repro --force --no-commit --downstream train`` there (DVC's run cache would restore,
   not train; nothing is committed to the shared cache), with the run's torch thread count,
   logging into this repository's MLflow store: a new run, tagged ``vaelab.reproduces``.
4. The verdict: **identical** (exit 0) when every per-epoch metric but the timings, every
   evaluation metric and the weights are equal; else **differs** (exit 3), with per metric the
   largest absolute difference and, as the likely cause, what differs between the two runs'
   recorded environments (device, torch version and threads, processes, Python, platform) or
   params. Errors (MLflow, git or DVC failing too): one line, exit 2. Both runs are tagged
   (``vaelab.reproduced_by``, ``vaelab.reproduction`` on the original), the comparison is the
   new run's artifact ``reproduction/comparison.json``.

The clone is removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from vaelab import params as params_mod
from vaelab.data import CHECKSUMS_FILE
from vaelab.errors import VaelabError, run_stage
from vaelab.model import load
from vaelab.tracking import reproduction
from vaelab.tracking.queries import download_artifact
from vaelab.tracking.store import project_root, tracking_uri
from vaelab.tracking.tags import REPRODUCES_ENV

DIFFERS = 3  # the exit status of "differs"; errors are 2 (vaelab.errors.run_stage)


def _run(*cmd: str, cwd: Path, env: dict | None = None, quiet: bool = True) -> str:
    """Run ``cmd`` in ``cwd``; its output (shown as it comes unless ``quiet``); raises on
    failure with the output in the message."""
    # errors="replace": a command's messages may quote a file's bytes (git apply quotes a
    # Latin-1 line it warns about), and they are only shown.
    done = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        text=True,
        errors="replace",
        capture_output=quiet,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        output = f"\n{done.stdout}{done.stderr}" if quiet else " (its messages are above)"
        raise VaelabError(f"`{' '.join(cmd)}` failed in {cwd} (exit {done.returncode}){output}")
    return done.stdout if quiet else ""


def _has_commit(root: Path, commit: str) -> bool:
    return (
        subprocess.run(
            ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True
        ).returncode
        == 0
    )


def source_commit(run, root: Path) -> str:
    """The commit to re-create ``run`` from: its DVC experiment's (``dvc exp run``, the queue),
    else the commit it trained at; refused with how to get it when this repository lacks it."""
    tags = run.data.tags
    name = tags.get("dvc.exp_name", "")
    if name:
        return experiment_commit(run.info.run_id, name, tags.get("dvc.baseline_rev", ""), root)
    commit = tags["git.commit"]
    if not _has_commit(root, commit):
        raise VaelabError(
            f"run {run.info.run_id} trained at commit {commit[:12]}, which is not in this "
            "repository: fetch it (`git fetch origin`, or `git fetch <the clone it ran in>`) and "
            "run this again."
        )
    return commit


def experiment_ref(baseline: str, name: str) -> str:
    """Where DVC keeps experiment ``name`` of commit ``baseline``."""
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def experiment_commit(run_id: str, name: str, baseline: str, root: Path) -> str:
    """The commit of DVC experiment ``name`` run on commit ``baseline``: its own ref
    (``experiment_ref``), else any ref named ``.../NAME`` (a ``dvc exp branch``, an experiment
    ref fetched under another path) whose commit's parent is ``baseline``, as an experiment
    commit's is. Experiment names are unique per baseline only, and a branch may share the name:
    such refs with another baseline are refused, naming them, with how to fetch the right one."""
    refs = _run("git", "for-each-ref", "--format=%(refname)", cwd=root).splitlines()
    own = experiment_ref(baseline, name)
    named = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    accepted, other = set(), []
    for ref in named:
        log = ("git", "log", "-1", "--format=%H %P", f"{ref}^{{commit}}", "--")
        commit, _, parents = _run(*log, cwd=root).strip().partition(" ")
        if baseline and ref == own:
            return commit
        parent = parents.split(" ")[0]
        # refs/exps/<2>/<38>/<name>: the path names the baseline, which must agree as well.
        parts = ref.split("/")
        path_baseline = "".join(parts[2:4]) if parts[1] == "exps" and len(parts) == 5 else ""
        if baseline and parent == baseline and path_baseline in ("", baseline):
            accepted.add(commit)
        elif path_baseline:
            other.append(f"{ref} (baseline {path_baseline[:7]})")
        else:
            other.append(f"{ref} ({f'parent {parent[:7]}' if parent else 'no parent'})")
    if len(accepted) == 1:
        return accepted.pop()
    fetch = f"dvc exp pull origin {own if baseline else name}"
    described = f"run {run_id} is DVC experiment '{name}' (baseline {baseline[:7] or 'unknown'})"
    if accepted:
        raise VaelabError(
            f"{described}, and several commits here could be it ({', '.join(sorted(accepted))}): "
            f"`{fetch}` fetches its own ref."
        )
    elsewhere = f" ({', '.join(other)} share its name only)" if other else ""
    raise VaelabError(
        f"{described}, which is not in this repository{elsewhere}: `{fetch}` (or `dvc exp list "
        "--all-commits` to see what is here)."
    )


@contextlib.contextmanager
def clone_at(root: Path, commit: str) -> Iterator[Path]:
    """A temporary clone of ``root`` at ``commit`` (git objects borrowed, not copied) that uses
    ``root``'s DVC cache and remotes; removed afterwards, whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix="vaelab-reproduce-"))
    clone = folder / "repo"
    try:
        _run(
            "git", "clone", "--quiet", "--shared", "--no-checkout", str(root), str(clone), cwd=root
        )
        _run("git", "checkout", "--quiet", "--detach", commit, cwd=clone)
        local = root / ".dvc" / "config.local"  # the user's own remotes, if any
        if local.is_file():
            shutil.copy2(local, clone / ".dvc" / "config.local")
        cache = _run(sys.executable, "-m", "dvc", "cache", "dir", cwd=root).strip()
        _configure(clone, cache)
        yield clone
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def apply_uncommitted(run, clone: Path, folder: Path) -> list[str]:
    """The run's code in ``clone``, checked out at ``source_commit``: a plain run's recorded diff
    applied there; for a DVC experiment's run, whose commit holds its tracked changes already,
    the files that commit lacks or has otherwise (``restore_left_out``), whose paths it
    returns (none for a plain run). ``folder``: where the diff is downloaded."""
    diff = reproduction.uncommitted_diff(run, folder)
    if diff is None:
        return []
    if not run.data.tags.get("dvc.exp_name"):
        _run("git", "apply", "--binary", str(diff), cwd=clone)
        return []
    return restore_left_out(clone, run.data.tags["git.commit"], diff)


def restore_left_out(clone: Path, baseline: str, diff: Path) -> list[str]:
    """Every file the run's ``diff`` (against its ``baseline`` commit) touches, as the run
    trained with it, in the work tree of ``clone`` (at the experiment's commit) where that commit
    has it otherwise; returns their paths. DVC commits an experiment with ``git add -u``, so a
    file git did not track yet (a new module, a data manifest) is in the diff and not in the
    commit; the diff leaves out DVC's own outputs (``dvc.lock``, metrics), kept from the commit."""
    with tempfile.TemporaryDirectory() as scratch:
        # The run's tree, built in an index of its own: the clone's index stays the commit's.
        env = os.environ | {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        _run("git", "read-tree", baseline, cwd=clone, env=env)
        try:
            _run("git", "apply", "--cached", "--binary", str(diff), cwd=clone, env=env)
        except VaelabError as error:
            raise VaelabError(
                f"the run's recorded diff does not apply on its commit {baseline[:12]}, so the "
                f"files its experiment's commit lacks cannot be re-created: {_last_line(error)}"
            ) from None
        trained = _run("git", "write-tree", cwd=clone, env=env).strip()

    def changed(a: str, b: str) -> set[str]:
        names = _run("git", "diff", "--name-only", "-z", "--no-renames", a, b, cwd=clone)
        return set(names.split("\0")) - {""}

    restored = sorted(changed(baseline, trained) & changed("HEAD", trained))
    if restored:
        # --worktree only: the files come back untracked, as in the run's workspace; a file the
        # run had deleted is deleted.
        literal = [f":(literal){path}" for path in restored]
        _run("git", "restore", f"--source={trained}", "--worktree", "--", *literal, cwd=clone)
    return restored


def _last_line(error: Exception) -> str:
    """A failed command's last line of output: its error, usually."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _first_line(error: Exception) -> str:
    """An exception's first line: what went wrong (MLflow's may add a long response body)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _configure(clone: Path, cache: str) -> None:
    """The clone's DVC settings, written directly (a `dvc` command there would start DVC's
    update check, a detached process that writes into the clone after it is removed): the
    user's cache, no update check, no analytics."""
    from dvc.config import Config

    with Config(dvc_dir=str(clone / ".dvc"), validate=False).edit("local") as settings:
        settings.setdefault("core", {}).update({"check_update": False, "analytics": False})
        settings.setdefault("cache", {})["dir"] = cache


def _clone_params(clone: Path) -> dict[str, str]:
    """The clone's params.yaml as its own code reads it, flattened as MLflow logs params."""
    script = (
        "import json; from vaelab.params import flatten, load; "
        "print(json.dumps({k: str(v) for k, v in flatten(load('params.yaml')).items()}))"
    )
    env = os.environ | {"PYTHONPATH": str(clone / "src")}
    return json.loads(_run(sys.executable, "-c", script, cwd=clone, env=env))


def write_params(run, clone: Path) -> dict[str, tuple[str, str]]:
    """The run's logged params in the clone's params.yaml; returns those that differ from the
    file at the run's commit, {key: (file, run)} (none for an intact run)."""
    logged = run.data.params
    before = _clone_params(clone)
    differing = {
        k: (before.get(k, "(absent)"), v) for k, v in logged.items() if before.get(k) != v
    }
    if not differing:
        return {}
    path = clone / "params.yaml"
    raw = params_mod.load_yaml(path.read_text())
    for key, (_, value) in differing.items():
        section, name = key.split(".", 1)
        parsed = params_mod.load_yaml(value) if value else value
        kept_string = isinstance(raw.get(section, {}).get(name), str)  # a name, not a number
        raw.setdefault(section, {})[name] = value if kept_string else parsed
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    after = _clone_params(clone)
    wrong = {k for k, v in logged.items() if after.get(k) != v}
    if wrong:
        raise VaelabError(f"cannot write run {run.info.run_id}'s params {sorted(wrong)} back")
    return differing


def _prepared_data(clone: Path) -> Path:
    """Where the clone's ``prepare`` stage writes the data (its dvc.yaml's output)."""
    (out,) = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]["prepare"]["outs"]
    return clone / (next(iter(out)) if isinstance(out, dict) else out)


def restore_data(run, clone: Path, env: dict) -> None:
    """The run's data in the clone: from the DVC cache, else pulled, else ``prepare`` (which
    fetches and verifies); then checked against the run's MD5s."""
    dvc = (sys.executable, "-m", "dvc")
    subprocess.run([*dvc, "checkout", "prepare"], cwd=clone, env=env, capture_output=True)
    try:
        _run(*dvc, "repro", "--pull", "prepare", cwd=clone, env=env)
    except VaelabError as error:
        raise VaelabError(
            f"the data of run {run.info.run_id} is neither in this repository's DVC cache nor "
            f"fetchable: {str(error).splitlines()[-1] if str(error) else error}"
        ) from None
    checksums = json.loads((_prepared_data(clone) / CHECKSUMS_FILE).read_text())
    got = {name: entry["md5"] for name, entry in checksums.get("files", {}).items()}
    wanted = {
        k.removeprefix("data.md5."): v
        for k, v in run.data.tags.items()
        if k.startswith("data.md5.")
    }
    differ = [
        f"{n} (md5 {got.get(n, 'absent')}, the run's {m})"
        for n, m in wanted.items()
        if got.get(n) != m
    ]
    if differ:
        raise VaelabError(
            f"the data prepared for run {run.info.run_id} is not the data it trained on: "
            f"{'; '.join(differ)}"
        )


def weights_sha256(path: Path) -> str:
    """SHA-256 of the model's tensors (names, dtypes, shapes, bytes), not of the file: two saves
    of the same weights by other torch versions still match."""
    digest = hashlib.sha256()
    for name, tensor in load(path).state_dict().items():
        tensor = tensor.detach().cpu().contiguous().flatten()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pipeline_env(original, threads: int) -> dict[str, str]:
    """The re-created pipeline's environment: this repository's store, the original's id (the
    new run's ``vaelab.reproduces`` tag), its torch threads; nothing of an enclosing DVC run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_RUN"))}
    return env | {
        "MLFLOW_TRACKING_URI": tracking_uri(),
        REPRODUCES_ENV: original.info.run_id,
        "OMP_NUM_THREADS": str(threads),
        # dvc.yaml's commands run `python`: this one, with vaelab's dependencies.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _weights(run, folder: Path) -> str:
    local = download_artifact(run.info.run_id, reproduction.WEIGHTS_ARTIFACT, folder)
    if local is None:
        raise VaelabError(f"run {run.info.run_id} has no {reproduction.WEIGHTS_ARTIFACT}")
    return weights_sha256(local)


def reproduce(experiment: str, wanted: str, threads: int | None = None) -> reproduction.Comparison:
    """Re-create the run ``wanted`` names (steps 1-3 of the module docstring) and compare."""
    original = reproduction.find_run(experiment, wanted)
    lacking = reproduction.missing(original)
    if lacking:
        raise VaelabError(
            f"run {original.info.run_id} was recorded before vaelab kept what reproducing it "
            f"takes: it lacks the tags {', '.join(lacking)}. Record it again with this version "
            "(`dvc exp apply` its experiment or check out its commit, then `dvc repro`)."
        )
    root = project_root()
    commit = source_commit(original, root)
    threads = threads or int(original.data.tags["torch.threads"])
    print(f"reproduce: run {original.info.run_id} from commit {commit[:12]}, {threads} threads")
    started_ms = int(time.time() * 1000)
    from dvc.exceptions import DvcException
    from mlflow.exceptions import MlflowException

    new = None
    try:
        with tempfile.TemporaryDirectory() as scratch, clone_at(root, commit) as clone:
            folder = Path(scratch)
            restored = apply_uncommitted(original, clone, folder)
            if restored:
                print(
                    "reproduce: from the run's recorded diff, as it trained with them (DVC "
                    f"commits an experiment with `git add -u`): {', '.join(restored)}"
                )
            differing = write_params(original, clone)
            env = pipeline_env(original, threads)
            restore_data(original, clone, env)
            dvc = (sys.executable, "-m", "dvc")
            # --no-commit: the clone shares this repository's DVC cache, and a run-cache entry
            # from here (same deps and params as the original) would hand this workspace's next
            # `dvc repro` the reproduction's outputs and MLflow run instead of the original's.
            repro = ("repro", "--force", "--no-commit", "--downstream", "train")
            _run(*dvc, *repro, cwd=clone, env=env, quiet=False)
            new = reproduction.reproduction_of(original.info.run_id, started_ms)
            if new is None:
                raise VaelabError(
                    f"the re-created pipeline ended without a FINISHED run tagged "
                    f"{reproduction.REPRODUCES_TAG} = {original.info.run_id}"
                )
            weights = (_weights(original, folder / "a"), _weights(new, folder / "b"))
        comparison = reproduction.compare(original, new, weights, differing)
        reproduction.mark(comparison, original.data.tags.get("mlflow.runName", ""))
    except (MlflowException, DvcException, OSError, subprocess.SubprocessError) as error:
        # The store, git or DVC failing under us is no bug of vaelab's: one line (run_stage), and
        # what is already done named, since a second try trains again.
        made = (
            f"; its reproduction, run {new.info.run_id}, is in the store, not compared"
            if new is not None
            else ""
        )
        raise VaelabError(
            f"reproducing run {original.info.run_id} stopped: {type(error).__name__}: "
            f"{_first_line(error)}. The temporary clone is removed and this workspace is as it "
            f"was{made}; check the tracking store ({tracking_uri()}) and git, then run it again."
        ) from None
    return comparison


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def verdict_lines(comparison: reproduction.Comparison, seconds: float) -> list[str]:
    """What ``main`` prints: the verdict, and for "differs" each metric that differs (largest
    absolute difference first) and the likely cause."""
    c = comparison
    causes = [f"{k} {a or '(none)'} -> {b or '(none)'}" for k, (a, b) in c.environment.items()]
    causes += [
        f"param {k}: {a} in the commit's params.yaml, {b} in the run"
        for k, (a, b) in c.params.items()
    ]
    head = (
        f"reproduce: run {c.original} re-created as run {c.reproduction} in {_duration(seconds)}"
    )
    if c.identical:
        lines = [
            head,
            f"reproduce: identical: {len(c.metrics)} metrics (every epoch's) and the weights "
            f"(sha256 {c.weights[0][:12]}) are equal",
        ]
        if causes:
            lines.append(f"reproduce: (it ran with {'; '.join(causes)}: no effect on the results)")
        return lines
    lines = [head, "reproduce: differs (largest absolute difference):"]
    differing = sorted((v, k) for k, v in c.metrics.items() if v != 0)
    for value, key in reversed(differing):
        lines.append(f"  {key:<34} {'missing' if value == float('inf') else f'{value:.3g}'}")
    if c.weights[0] != c.weights[1]:
        lines.append(f"  {'weights (sha256)':<34} {c.weights[0][:12]} vs {c.weights[1][:12]}")
    lines.append(
        "reproduce: likely cause: " + "; ".join(causes)
        if causes
        else "reproduce: no recorded difference in environment or params: something in the "
        "code or its data is not deterministic here"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="for mlflow.experiment")
    parser.add_argument("run", help="the run's id, or its name in the experiment")
    parser.add_argument(
        "--experiment", help="where to look up a run name (default: params.yaml's)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: the run's)")
    args = parser.parse_args(argv)
    experiment = args.experiment or params_mod.load(args.params).mlflow.experiment
    started = time.monotonic()
    comparison = reproduce(experiment, args.run, args.threads)
    print("\n".join(verdict_lines(comparison, time.monotonic() - started)), flush=True)
    if not comparison.identical:
        raise SystemExit(DIFFERS)


if __name__ == "__main__":
    run_stage(main)
