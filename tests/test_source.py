"""What a run records of its uncommitted code (``vaelab.tracking.source``): the diff must turn the
commit back into the workspace byte for byte, whatever the files' line ends or encoding."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vaelab.tracking.source import DIFF_ARTIFACT, log_uncommitted, uncommitted

COMMITTED = {"a.csv": b"x,1\r\ny,2\r\n", "keep.txt": b"same\n"}
WORKSPACE = {  # what the user has when the run trains: a CRLF edit, a new Latin-1 file
    "a.csv": b"x,1\r\ny,3\r\nz,4\r\n",
    "keep.txt": b"same\n",
    "notes.txt": b"caf\xe9 cr\xe8me\n",
}


def git(repo: Path, *args: str) -> None:
    ident = ("-c", "user.name=t", "-c", "user.email=t@t", "-c", "core.autocrlf=false")
    subprocess.run(["git", *ident, *args], cwd=repo, check=True, capture_output=True)


def write(repo: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (repo / name).write_bytes(data)


def test_the_diff_re_creates_crlf_and_latin_1_files_byte_for_byte(tmp_path, monkeypatch):
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo, COMMITTED)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "c")
    write(repo, WORKSPACE)
    monkeypatch.chdir(repo)

    state = uncommitted()

    assert state is not None
    assert state.files == ("a.csv", "notes.txt")
    assert state.tags() == {"vaelab.uncommitted": "a.csv,notes.txt"}
    # The artifact as MLflow stores it, applied on a fresh checkout of the commit.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    log_uncommitted(client, run_id, state)
    diff = Path(client.download_artifacts(run_id, DIFF_ARTIFACT, str(tmp_path)))
    assert diff.read_bytes() == state.diff
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "apply", "--binary", str(diff))
    assert {name: (clone / name).read_bytes() for name in WORKSPACE} == WORKSPACE


def test_what_training_leaves_beside_its_outputs_is_not_uncommitted_code():
    """The checkpoint (its path from dvc.yaml), the DDP final-failure mark beside it and an
    atomic write's leftover are ignored by git, so they never turn up in a run's
    ``vaelab.uncommitted`` or its diff."""
    import shlex

    import yaml

    project = Path(__file__).resolve().parents[1]
    cmd = shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["train"]["cmd"])
    checkpoint = cmd[cmd.index("--checkpoint") + 1]
    folder, name = checkpoint.rsplit("/", 1)
    paths = [checkpoint, f"{checkpoint}.stopped", f"{folder}/.{name}.k2x9_a.tmp"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=project, capture_output=True, text=True
    )
    assert done.stdout.split() == paths, done.stdout + done.stderr
