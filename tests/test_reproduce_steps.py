"""Fast tests of `vaelab.reproduce`'s steps on small git repositories made here, and of its
verdict on hand-made comparisons and runs: no pipeline runs, no MLflow store (the end-to-end
reproductions are in test_reproduce.py).

- A DVC experiment's commit lacks the files git did not track when it ran (DVC commits with
  `git add -u`); the clone gets them from the run's recorded diff.
- The experiment's commit is only taken from a ref whose baseline is the run's.
- MLflow, git or a file failing after the clone is made: exit 2, one line, no clone left.
- The verdict is "identical" only when the weights and every metric are equal, and a metric one
  run lacks is a difference."""

from __future__ import annotations

import math
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from vaelab import reproduce
from vaelab.errors import VaelabError, run_stage
from vaelab.tracking import reproduction
from vaelab.tracking.reproduction import Comparison
from vaelab.tracking.source import UNCOMMITTED_TAG, uncommitted


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def write(repo: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)


def commit(repo: Path, message: str) -> str:
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit: a params file, a module, DVC's lock and pipeline
    (whose metrics file the recorded diff leaves out), and a folder ``.dvc`` (a DVC project)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    write(
        repo,
        {
            "params.yaml": b"seed: 1\n",
            "src/pkg/train.py": b"import pkg.steps\n",
            "src/pkg/steps.py": b"STEPS = 3\n",
            "dvc.yaml": b"stages:\n  train:\n    cmd: python x\n    metrics: [metrics.json]\n",
            "dvc.lock": b"schema: '2.0'\n",
            "metrics.json": b"{}\n",
            ".dvc/config": b"",
        },
    )
    git(repo, "add", "--all")
    commit(repo, "baseline")
    return repo


def fake_run(**tags: str) -> SimpleNamespace:
    """What ``reproduce`` reads of an MLflow run: its id and tags."""
    info = SimpleNamespace(run_id="a" * 32)
    return SimpleNamespace(info=info, data=SimpleNamespace(tags=tags, metrics={}, params={}))


def clone_at_commit(repo: Path, commit: str, clone: Path) -> Path:
    git(repo, "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(clone))
    git(clone, "checkout", "--quiet", "--detach", commit)
    return clone


# --- A DVC experiment's commit and the files git did not track ------------------------------

NEW_MODULE = b"VALUE = 42  # caf\xe9, Latin-1\r\n"  # bytes as written, CRLF and all
TRAIN_AS_RUN = b"import pkg.steps\nimport pkg.new_module\n"


def experiment_run(repo: Path, tmp_path: Path, monkeypatch) -> tuple[str, str, Path]:
    """``dvc exp run -S seed=5`` as DVC 3.67 does it in the workspace (seen in a scratch
    repository): the run starts at the baseline with params.yaml and a module edited and a new
    module git does not track, records its diff (``uncommitted``, as the train stage does), and
    DVC then commits the experiment with ``git add -u`` and its lock file: the new module is
    left out. Returns (baseline, experiment commit, the diff's file)."""
    baseline = git(repo, "rev-parse", "HEAD")
    write(
        repo,
        {
            "params.yaml": b"seed: 5\n",
            "src/pkg/train.py": TRAIN_AS_RUN,
            "src/pkg/new_module.py": NEW_MODULE,
            "metrics.json": b'{"loss": 1.5}\n',  # a pipeline output: not in the diff
        },
    )
    monkeypatch.chdir(repo)
    recorded = uncommitted()
    monkeypatch.chdir(tmp_path)
    assert recorded is not None
    assert recorded.files == ("params.yaml", "src/pkg/new_module.py", "src/pkg/train.py")
    diff = tmp_path / "uncommitted.diff"
    diff.write_bytes(recorded.diff)
    write(repo, {"dvc.lock": b"schema: '2.0'\nstages: {train: {}}\n"})
    git(repo, "add", "-u")
    experiment = commit(repo, "dvc: commit experiment")
    listed = git(repo, "ls-tree", "-r", "--name-only", experiment).splitlines()
    assert "src/pkg/new_module.py" not in listed and "src/pkg/train.py" in listed
    return baseline, experiment, diff


def test_an_experiment_run_gets_the_files_its_commit_left_out_from_its_recorded_diff(
    repo, tmp_path, monkeypatch
):
    baseline, experiment, diff = experiment_run(repo, tmp_path, monkeypatch)
    run = fake_run(
        **{
            "dvc.exp_name": "exp-a",
            "dvc.baseline_rev": baseline,
            "git.commit": baseline,
            UNCOMMITTED_TAG: "params.yaml,src/pkg/new_module.py,src/pkg/train.py",
        }
    )
    monkeypatch.setattr(reproduction, "uncommitted_diff", lambda run, folder: diff)
    clone = clone_at_commit(repo, experiment, tmp_path / "clone")

    restored = reproduce.apply_uncommitted(run, clone, tmp_path / "downloads")

    assert restored == ["src/pkg/new_module.py"]
    assert (clone / "src/pkg/new_module.py").read_bytes() == NEW_MODULE
    # The rest is the experiment commit's: its tracked changes and DVC's lock file.
    assert (clone / "src/pkg/train.py").read_bytes() == TRAIN_AS_RUN
    assert (clone / "params.yaml").read_bytes() == b"seed: 5\n"
    assert (clone / "dvc.lock").read_bytes() == b"schema: '2.0'\nstages: {train: {}}\n"
    # Untracked in the clone, as in the run's workspace; the clone's index is the commit's.
    assert git(clone, "status", "--porcelain") == "?? src/pkg/new_module.py"


def test_a_file_the_experiment_commit_has_otherwise_comes_back_as_the_run_trained_with_it(
    repo, tmp_path, monkeypatch
):
    """A module edited again after the run recorded its diff, before DVC committed: the
    commit has the later edit, the run trained with the recorded one."""
    baseline, _, diff = experiment_run(repo, tmp_path, monkeypatch)
    write(repo, {"src/pkg/train.py": b"edited while it trained\n"})
    git(repo, "add", "-u")
    later = commit(repo, "an experiment commit with a later edit")
    run = fake_run(**{"dvc.exp_name": "exp-a", "git.commit": baseline, UNCOMMITTED_TAG: "x"})
    monkeypatch.setattr(reproduction, "uncommitted_diff", lambda run, folder: diff)
    clone = clone_at_commit(repo, later, tmp_path / "clone")

    restored = reproduce.apply_uncommitted(run, clone, tmp_path / "downloads")

    assert restored == ["src/pkg/new_module.py", "src/pkg/train.py"]
    assert (clone / "src/pkg/train.py").read_bytes() == TRAIN_AS_RUN


def test_a_diff_that_does_not_apply_on_the_runs_commit_is_one_line(repo, tmp_path, monkeypatch):
    _, experiment, diff = experiment_run(repo, tmp_path, monkeypatch)
    # Its git.commit wrong: the diff's params.yaml change is already in the experiment commit.
    run = fake_run(**{"dvc.exp_name": "exp-a", "git.commit": experiment, UNCOMMITTED_TAG: "x"})
    monkeypatch.setattr(reproduction, "uncommitted_diff", lambda run, folder: diff)
    clone = clone_at_commit(repo, experiment, tmp_path / "clone")
    with pytest.raises(VaelabError, match="does not apply on its commit") as caught:
        reproduce.apply_uncommitted(run, clone, tmp_path / "downloads")
    assert "\n" not in str(caught.value)


# --- Which commit is the run's experiment ---------------------------------------------------


def commit_on(repo: Path, parent: str, message: str) -> str:
    """A commit whose parent is ``parent``, made without touching the work tree."""
    tree = git(repo, "rev-parse", f"{parent}^{{tree}}")
    return git(repo, "commit-tree", tree, "-p", parent, "-m", message)


def test_only_a_ref_whose_baseline_is_the_runs_is_taken_for_its_experiment(repo):
    baseline = git(repo, "rev-parse", "HEAD")
    other_baseline = commit_on(repo, baseline, "a later commit")
    ours = commit_on(repo, baseline, "dvc: commit experiment (the run's)")
    theirs = commit_on(repo, other_baseline, "dvc: commit experiment (another baseline's)")
    unrelated = commit_on(repo, other_baseline, "a branch named like the experiment")
    own_ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/exp-a"
    other_ref = f"refs/exps/{other_baseline[:2]}/{other_baseline[2:]}/exp-a"

    def refused(*refs: str) -> str:
        with pytest.raises(VaelabError) as caught:
            reproduce.experiment_commit("r" * 32, "exp-a", baseline, repo)
        message = str(caught.value)
        assert "\n" not in message
        assert f"`dvc exp pull origin {own_ref}`" in message, message
        for ref in refs:
            assert ref in message, message
        return message

    refused()  # none of that name
    git(repo, "update-ref", "refs/heads/exp-a", unrelated)
    message = refused("refs/heads/exp-a")
    assert f"parent {other_baseline[:7]}" in message
    git(repo, "update-ref", "-d", "refs/heads/exp-a")
    git(repo, "update-ref", other_ref, theirs)
    assert f"baseline {other_baseline[:7]}" in refused(other_ref)
    git(repo, "update-ref", "refs/heads/exp-a", unrelated)
    refused(other_ref, "refs/heads/exp-a")
    # `dvc exp branch exp-a exp-a` (the experiment's commit as a branch): its parent is the
    # run's baseline, so it is the run's experiment even without its own ref.
    git(repo, "update-ref", "refs/heads/exp-a", ours)
    assert reproduce.experiment_commit("r" * 32, "exp-a", baseline, repo) == ours
    git(repo, "update-ref", "refs/heads/exp-a", unrelated)
    git(repo, "update-ref", own_ref, ours)
    assert reproduce.experiment_commit("r" * 32, "exp-a", baseline, repo) == ours


# --- A failure after the clone is made ------------------------------------------------------


@pytest.fixture
def own_temporary_folder(tmp_path, monkeypatch) -> Path:
    """Clones are made here (``TMPDIR``), so "no clone left" sees only this test's."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def mlflow_down(*args, **kwargs):
    from mlflow.exceptions import MlflowException

    raise MlflowException("API request to /api/2.0/mlflow/runs/get failed\nwith error 503")


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def git_gone(*args, **kwargs):
    raise subprocess.CalledProcessError(128, ["git", "status"], "fatal: not a git repository")


NEW_RUN = SimpleNamespace(info=SimpleNamespace(run_id="b" * 32))
COMPARED = Comparison("a" * 32, "b" * 32, {"k": 0.0}, ("1" * 64, "1" * 64))


@pytest.mark.parametrize(
    ("module", "step", "failure", "message"),
    [
        (reproduction, "uncommitted_diff", mlflow_down, "MlflowException: API request to"),
        (reproduce, "write_params", disk_full, "No space left on device"),
        (reproduce, "restore_data", git_gone, "CalledProcessError: Command '['git', 'status']'"),
        (reproduction, "mark", mlflow_down, f"its reproduction, run {'b' * 32}, is in the store"),
    ],
)
def test_a_failure_after_the_clone_is_exit_2_in_one_line_and_leaves_no_clone(
    repo, own_temporary_folder, monkeypatch, capsys, module, step, failure, message
):
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{own_temporary_folder / 'x.db'}")
    baseline = git(repo, "rev-parse", "HEAD")
    run = fake_run(**{"git.commit": baseline, UNCOMMITTED_TAG: "", "torch.threads": "1"})
    monkeypatch.setattr(reproduction, "find_run", lambda experiment, wanted: run)
    monkeypatch.setattr(reproduction, "missing", lambda run: [])
    clones = []
    real_clone_at = reproduce.clone_at

    def clone_at(root, commit):
        clones.append(commit)
        return real_clone_at(root, commit)

    # The steps that would run the pipeline and read the store, up to the failing one.
    monkeypatch.setattr(reproduce, "clone_at", clone_at)
    monkeypatch.setattr(reproduce, "write_params", lambda run, clone: {})
    monkeypatch.setattr(reproduce, "restore_data", lambda run, clone, env: None)
    real_run = reproduce._run
    monkeypatch.setattr(
        reproduce,
        "_run",
        lambda *cmd, **kw: "" if "repro" in cmd and "--force" in cmd else real_run(*cmd, **kw),
    )
    monkeypatch.setattr(reproduction, "reproduction_of", lambda run_id, since: NEW_RUN)
    monkeypatch.setattr(reproduce, "_weights", lambda run, folder: "1" * 64)
    monkeypatch.setattr(reproduction, "compare", lambda *args: COMPARED)
    monkeypatch.setattr(reproduction, "mark", lambda comparison, name: None)
    monkeypatch.setattr(module, step, failure)

    with pytest.raises(SystemExit) as caught:
        run_stage(lambda: reproduce.main(["--params", "p.yaml", "--experiment", "e", "a" * 32]))

    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: reproducing run {'a' * 32} stopped")
    assert message in err, err
    assert "The temporary clone is removed" in err
    assert clones == [baseline]  # the clone was made
    assert list(own_temporary_folder.glob("vaelab-reproduce-*")) == []  # and is gone


# --- The verdict ----------------------------------------------------------------------------


def test_identical_takes_equal_weights_and_equal_metrics_both():
    equal, unequal = ("1" * 64, "1" * 64), ("1" * 64, "2" * 64)
    assert Comparison("a", "b", {"m": 0.0}, equal).identical
    assert not Comparison("a", "b", {"m": 0.0}, unequal).identical  # weights differ only
    assert not Comparison("a", "b", {"m": 0.0, "n": 1e-9}, equal).identical  # metrics only
    lines = reproduce.verdict_lines(Comparison("a", "b", {"m": 0.0}, unequal), 1)
    assert lines[1] == "reproduce: differs (largest absolute difference):"
    assert lines[2] == f"  {'weights (sha256)':<34} 111111111111 vs 222222222222"


class HandMadeStore:
    """The store's one method ``compare`` reads: each run's per-epoch history of a metric."""

    def __init__(self, histories: dict[str, dict[str, list[float]]]):
        self.histories = histories

    def get_metric_history(self, run_id: str, key: str):
        values = self.histories[run_id].get(key, [])
        return [SimpleNamespace(step=step, value=v) for step, v in enumerate(values, 1)]


def hand_made_run(run_id: str, metrics: dict[str, float]) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(metrics=metrics, tags={})
    )


def test_a_metric_one_run_lacks_is_a_difference_named_missing(monkeypatch):
    from vaelab.history import METRICS

    epochs = {key: [2.0, 1.0] for key in METRICS}
    partial = {key: v for key, v in epochs.items() if key != "epoch/test/neg_elbo"}
    evaluated = {"eval/test/neg_elbo": 90.5, "eval/test_iw/nll": 88.25}
    cases = [  # (original's, reproduction's) histories and evaluation metrics; what is missing
        ((epochs, evaluated), (epochs, {"eval/test/neg_elbo": 90.5}), "eval/test_iw/nll"),
        ((epochs, {"eval/test/neg_elbo": 90.5}), (epochs, evaluated), "eval/test_iw/nll"),
        ((epochs, evaluated), (partial, evaluated), "epoch/test/neg_elbo"),
        ((partial, evaluated), (epochs, evaluated), "epoch/test/neg_elbo"),
    ]
    weights = ("1" * 64, "1" * 64)
    for (a_epochs, a_eval), (b_epochs, b_eval), lacking in cases:
        store = HandMadeStore({"a": a_epochs, "b": b_epochs})
        monkeypatch.setattr(reproduction, "client", lambda store=store: store)
        compared = reproduction.compare(
            hand_made_run("a", a_eval), hand_made_run("b", b_eval), weights, {}
        )
        assert compared.metrics[lacking] == math.inf
        assert {k for k, v in compared.metrics.items() if v != 0} == {lacking}
        assert compared.verdict == "differs"
        assert f"  {lacking:<34} missing" in reproduce.verdict_lines(compared, 1)
    # The control: the same metrics on both sides, all equal.
    store = HandMadeStore({"a": epochs, "b": epochs})
    monkeypatch.setattr(reproduction, "client", lambda: store)
    same = reproduction.compare(
        hand_made_run("a", evaluated), hand_made_run("b", dict(evaluated)), weights, {}
    )
    assert same.identical and set(same.metrics.values()) == {0.0}
