"""The code and params a run trained with, as ``vaelab.reproduce`` needs them: the git commit and,
when the workspace differed from it, which files did (the tag ``vaelab.uncommitted``) and their
diff against the commit (the artifact ``reproduce/uncommitted.diff``, applied on the commit to
re-create the run).

The pipeline's own outputs are not code: ``dvc.lock``, every path ``dvc.yaml`` declares as a
stage's output, metrics or plots file (``reports/metrics.json`` is one, tracked by git) and the
``.gitignore`` files DVC writes beside them are left out; so is whatever git ignores (the
DVC-cached outputs, the MLflow store).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

UNCOMMITTED_TAG = "vaelab.uncommitted"  # "" (clean), files comma-separated, or "unknown"
DIFF_ARTIFACT = "reproduce/uncommitted.diff"
_TAG_LENGTH = 5000  # MLflow's limit on a tag's value, with room to spare


def git(*args: str, env: dict | None = None) -> str | None:
    """``git ARGS`` in the current folder: its stripped output; None when it fails."""
    out = git_bytes(*args, env=env)
    try:
        return None if out is None else out.decode().strip()
    except UnicodeDecodeError:
        return None


def git_bytes(*args: str, env: dict | None = None) -> bytes | None:
    """``git ARGS``: its output as bytes, untouched (a diff of CRLF or Latin-1 files must apply
    as it was written: text mode would turn its line ends into LF or fail to decode it)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def pipeline_outputs(root: Path) -> list[str]:
    """``dvc.lock``, the paths ``dvc.yaml`` declares as its stages' outs, metrics and plots, and
    the ``.gitignore`` files DVC keeps beside them."""
    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        stages = {}
    outputs = [
        next(iter(entry)) if isinstance(entry, dict) else str(entry)
        for stage in stages.values()
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, []) or []
    ]
    # DVC writes a .gitignore beside each output it caches.
    ignores = sorted({(Path(path).parent / ".gitignore").as_posix() for path in outputs})
    return ["dvc.lock", *outputs, *ignores]


@dataclass(frozen=True)
class Uncommitted:
    """The workspace against its commit: the files that differ (tracked changes, and new files
    git does not ignore) and the binary diff that turns the commit into the workspace."""

    files: tuple[str, ...]
    diff: bytes

    def tags(self) -> dict[str, str]:
        listed = ",".join(self.files)
        if len(listed) > _TAG_LENGTH:
            listed = listed[: _TAG_LENGTH - 40].rsplit(",", 1)[0] + f",... ({len(self.files)})"
        return {UNCOMMITTED_TAG: listed}


UNKNOWN = {UNCOMMITTED_TAG: "unknown"}  # the tag when git cannot tell (no repository)


def uncommitted() -> Uncommitted | None:
    """What in the current repository differs from HEAD (``Uncommitted``); None when git
    cannot tell. Read through a temporary index, so the user's index is left as it was."""
    top = git("rev-parse", "--show-toplevel")
    if top is None or git("rev-parse", "--verify", "-q", "HEAD") is None:
        return None
    excluded = [f":(exclude){path}" for path in pipeline_outputs(Path(top))]
    with tempfile.TemporaryDirectory() as scratch:
        env = os.environ | {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        steps = (("-C", top, "read-tree", "HEAD"), ("-C", top, "add", "--all", "--", "."))
        if any(git(*step, env=env) is None for step in steps):
            return None
        changes = ("-C", top, "diff", "--cached")
        paths = ("HEAD", "--", ".", *excluded)
        names = git(*changes, "--name-only", *paths, env=env)
        diff = git_bytes(*changes, "--binary", *paths, env=env)
    if names is None or diff is None:
        return None
    return Uncommitted(tuple(names.splitlines()), diff)


def log_uncommitted(client, run_id: str, state: Uncommitted | None) -> None:
    """The diff as the run's artifact ``DIFF_ARTIFACT``, when there is one."""
    if state is not None and state.diff:
        folder, name = DIFF_ARTIFACT.rsplit("/", 1)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / name
            path.write_bytes(state.diff)
            client.log_artifact(run_id, str(path), folder)
