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


def git(*args: str, env: dict | None = None, strip: bool = True) -> str | None:
    """``git ARGS`` in the current folder: its output (stripped unless told: a diff's last line
    may end in spaces that matter); None when it fails."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() if strip else out.stdout


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
    diff: str

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
        diff = git(*changes, "--binary", *paths, env=env, strip=False)
    if names is None or diff is None:
        return None
    return Uncommitted(tuple(names.splitlines()), diff)


def log_uncommitted(client, run_id: str, state: Uncommitted | None) -> None:
    """The diff as the run's artifact ``DIFF_ARTIFACT``, when there is one."""
    if state is not None and state.diff:
        client.log_text(run_id, state.diff, DIFF_ARTIFACT)
