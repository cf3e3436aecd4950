"""`python -m vaelab.reproduce` on a fake-MNIST repository (``reproduced_copy``, conftest.py): a
run recorded from uncommitted code and params comes out identical; a DVC experiment whose param
was tampered with in the store differs, naming the metrics and the causes; every bad input is
one line and changes nothing. The user's workspace (git status, params.yaml, dvc.lock, the
outputs) is the same after each, and no temporary clone is left behind.

The runs here come from `dvc repro` / `dvc exp run` with only an evaluate param changed, so DVC
restores train from its run cache and `record` rebuilds the run: cheap to make, and the
reproduction still trains the model again from scratch (`dvc repro --force`)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import _env, client_for, run, runs
from vaelab import reproduce
from vaelab.errors import VaelabError
from vaelab.tracking.reproduction import COMPARISON_ARTIFACT, REPRODUCED_BY_TAG, VERDICT_TAG
from vaelab.tracking.tags import REPRODUCES_TAG

# Under `pytest -n 2 --dist loadgroup` (make test) these tests run in one worker, which builds
# their shared fixtures once.
pytestmark = pytest.mark.xdist_group("reproduced")

OUTPUTS = (
    "params.yaml",
    "dvc.lock",
    "models/vae.pt",
    "reports/metrics.json",
    "reports/train_history.csv",
    "reports/figures/latent_grid.png",
    "src/vaelab/plot.py",
)


def uncommitted_run(repo: Path):
    """A run recorded with params.yaml (evaluate.seed) and src/vaelab/plot.py edited and not
    committed: train comes from DVC's run cache, evaluate, plot and record run."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["evaluate"]["seed"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with open(repo / "src" / "vaelab" / "plot.py", "a") as source:
        source.write("\n# an uncommitted edit\n")
    run(repo, "dvc", "repro")
    return runs(repo)[-1]


def snapshot(repo: Path) -> dict:
    """What a reproduction must leave as it found it: git's view, the files, no clone left."""
    status = run(repo, "git", "status", "--porcelain")
    files = {name: hashlib.md5((repo / name).read_bytes()).hexdigest() for name in OUTPUTS}
    clones = sorted(Path(tempfile.gettempdir()).glob("vaelab-reproduce-*"))
    # The DVC cache too (outputs and run cache): a reproduction's entry there would hand the
    # workspace's next `dvc repro` the reproduction's MLflow run instead of the original's.
    cache = sorted(str(p.relative_to(repo)) for p in (repo / ".dvc" / "cache").rglob("*"))
    assert any("/runs/" in name for name in cache)  # the pipeline's own run cache is there
    return {"status": status, "files": files, "clones": clones, "cache": cache}


@pytest.fixture(autouse=True)
def own_temporary_folder(tmp_path, monkeypatch) -> Path:
    """Reproductions make their clones in a folder of this test's own (``TMPDIR``), so that
    "no clone left" cannot be confused by another process's reproduction."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def reproduce_cmd(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaelab.reproduce", "--params", "params.yaml", *args],
        cwd=repo,
        env=_env(repo),
        capture_output=True,
        text=True,
        timeout=600,
    )


def comparison_of(repo: Path, run_id: str) -> dict:
    import mlflow

    path = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path=COMPARISON_ARTIFACT,
        tracking_uri=f"sqlite:///{repo / 'mlflow.db'}",
    )
    return json.loads(Path(path).read_text())


def test_a_run_from_uncommitted_code_comes_out_identical_and_both_runs_say_so(reproduced_copy):
    repo = reproduced_copy
    original = uncommitted_run(repo)
    assert original.data.tags["vaelab.uncommitted"] == "params.yaml,src/vaelab/plot.py"
    before = snapshot(repo)

    done = reproduce_cmd(repo, original.info.run_id)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "reproduce: identical:" in done.stdout, done.stdout
    assert snapshot(repo) == before
    store = client_for(repo)
    original = store.get_run(original.info.run_id)
    (new,) = [r for r in runs(repo) if r.data.tags.get(REPRODUCES_TAG) == original.info.run_id]
    assert new.info.status == "FINISHED"
    assert original.data.tags[REPRODUCED_BY_TAG] == new.info.run_id
    assert original.data.tags[VERDICT_TAG] == "identical"
    assert new.data.tags["mlflow.parentRunId"] == original.info.run_id
    assert new.info.run_name == f"{original.info.run_name} (reproduced)"
    assert new.data.params == original.data.params
    assert new.data.tags["vaelab.uncommitted"] == "params.yaml,src/vaelab/plot.py"
    compared = comparison_of(repo, new.info.run_id)
    assert compared["verdict"] == "identical"
    assert set(compared["max_abs_difference"].values()) == {0.0}
    assert "epoch/val/neg_elbo" in compared["max_abs_difference"]
    assert "eval/test_iw/nll" in compared["max_abs_difference"]
    assert "eval/val_iw/nll" in compared["max_abs_difference"]
    weights = compared["weights_sha256"]
    assert weights["original"] == weights["reproduction"]
    # Computed independently: the same weights file bytes give the same tensors' digest.
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        run_id=new.info.run_id,
        artifact_path="model/vae.pt",
        tracking_uri=f"sqlite:///{repo / 'mlflow.db'}",
    )
    assert reproduce.weights_sha256(Path(local)) == weights["reproduction"]
    # A reproduction is no new result: comparisons and the registry leave it out.

    from vaelab.tracking.queries import find_runs

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    try:
        listed = set(find_runs("vaelab")["run_id"])
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert original.info.run_id in listed and new.info.run_id not in listed


def tamper(repo: Path, run_id: str, key: str, value: str) -> None:
    """Change a logged param in the SQLite store (MLflow itself refuses to)."""
    with sqlite3.connect(repo / "mlflow.db") as store:
        changed = store.execute(
            "UPDATE params SET value = ? WHERE run_uuid = ? AND key = ?", (value, run_id, key)
        ).rowcount
    assert changed == 1


def test_a_tampered_experiment_differs_naming_the_metrics_and_the_causes(reproduced_copy):
    """`dvc exp run -n exp-seed-4 -S evaluate.seed=4` is re-created from its experiment's commit
    (params.yaml there has that seed) and, from its recorded diff, the new module its evaluate
    stage imports, which git did not track, so DVC's `git add -u` left it out of the commit; its
    train.lr was changed in the store and the reproduction runs on another thread count:
    differs, exit 3, the differing metrics and both causes named."""
    repo = reproduced_copy
    (repo / "src" / "vaelab" / "exp_note.py").write_text('NOTE = "not tracked by git"\n')
    with open(repo / "src" / "vaelab" / "evaluate.py", "a") as source:
        source.write("\nimport vaelab.exp_note  # noqa: E402,F401\n")
    run(repo, "dvc", "exp", "run", "-n", "exp-seed-4", "-S", "evaluate.seed=4")
    original = runs(repo)[-1]
    assert original.data.tags["dvc.exp_name"] == "exp-seed-4"
    assert "src/vaelab/exp_note.py" in original.data.tags["vaelab.uncommitted"]
    baseline = original.data.tags["dvc.baseline_rev"]
    experiment = f"refs/exps/{baseline[:2]}/{baseline[2:]}/exp-seed-4"
    in_commit = run(repo, "git", "ls-tree", "-r", "--name-only", experiment).split()
    assert "src/vaelab/evaluate.py" in in_commit and "src/vaelab/exp_note.py" not in in_commit
    threads = int(original.data.tags["torch.threads"])
    other = 1 if threads > 1 else 2  # torch takes no more threads than there are cores
    tamper(repo, original.info.run_id, "train.lr", "0.002")
    before = snapshot(repo)

    done = reproduce_cmd(repo, "exp-seed-4", "--threads", str(other))

    assert done.returncode == reproduce.DIFFERS, done.stdout + done.stderr
    out = done.stdout
    restored = "reproduce: from the run's recorded diff, as it trained with them (DVC commits "
    assert f"{restored}an experiment with `git add -u`): src/vaelab/exp_note.py\n" in out, out
    assert "reproduce: differs (largest absolute difference):" in out, out
    assert "  epoch/train/loss" in out and "  eval/test/neg_elbo" in out
    assert "weights (sha256)" in out
    assert "param train.lr: 0.001 in the commit's params.yaml, 0.002 in the run" in out
    assert f"torch.threads {threads} -> {other}" in out
    assert snapshot(repo) == before
    original = client_for(repo).get_run(original.info.run_id)
    assert original.data.tags[VERDICT_TAG] == "differs"
    compared = comparison_of(repo, original.data.tags[REPRODUCED_BY_TAG])
    assert compared["verdict"] == "differs"
    assert compared["params"] == {"train.lr": ["0.001", "0.002"]}
    assert compared["environment"]["torch.threads"] == [str(threads), str(other)]
    assert compared["max_abs_difference"]["epoch/train/loss"] > 0
    new = client_for(repo).get_run(original.data.tags[REPRODUCED_BY_TAG])
    assert new.data.params["train.lr"] == "0.002" and new.data.params["evaluate.seed"] == "4"


def _fake_run(repo: Path, like, *, name: str, **tags: str | None) -> str:
    """A FINISHED run with ``like``'s tags, ``tags`` changed (None: removed)."""
    store = client_for(repo)
    copied = {k: v for k, v in like.data.tags.items() if not k.startswith("mlflow.")}
    copied |= {k: v for k, v in tags.items() if v is not None}
    for key in [k for k, v in tags.items() if v is None]:
        copied.pop(key, None)
    run_id = store.create_run(like.info.experiment_id, run_name=name, tags=copied).info.run_id
    store.set_terminated(run_id, "FINISHED")
    return run_id


def test_bad_input_is_one_line_and_changes_nothing(reproduced_copy, monkeypatch):
    from vaelab.tracking.sweeps import start_sweep

    repo = reproduced_copy
    (like,) = runs(repo)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    for name in ("DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    _fake_run(repo, like, name="twin")
    _fake_run(repo, like, name="twin")
    foreign = _fake_run(repo, like, name="foreign", **{"git.commit": "f" * 40})
    ghost = _fake_run(repo, like, name="ghost", **{"dvc.exp_name": "ghost-exp"})
    old = _fake_run(repo, like, name="old", **{"torch.threads": None, "vaelab.uncommitted": None})
    start_sweep("vaelab", "a-sweep", {"train.seed": "1,2"})
    cases = {
        "twim": r"no run with the id or name 'twim' .* Did you mean 'twin'\?",
        "twin": r"2 runs are named 'twin': [0-9a-f]{32} \(FINISHED, started .*; .*Give one's id",
        "a-sweep": r"is a sweep run, not a training run",
        foreign: rf"commit {'f' * 12}, which is not in this repository: fetch it",
        ghost: r"DVC experiment 'ghost-exp' .* not in this repository: `dvc exp pull origin",
        old: r"lacks the tags vaelab.uncommitted, torch.threads\. Record it again",
    }
    before = snapshot(repo)
    for wanted, message in cases.items():
        with pytest.raises(VaelabError, match=message) as caught:
            reproduce.main(["--params", "params.yaml", wanted])
        assert "\n" not in str(caught.value), str(caught.value)
        assert snapshot(repo) == before, wanted

    def data_gone(*cmd, **kwargs):  # the data neither in the cache nor fetchable
        if "--pull" in cmd:
            raise VaelabError("`dvc repro --pull prepare` failed\nERROR: no remote, no network")
        return real_run(*cmd, **kwargs)

    real_run = reproduce._run
    monkeypatch.setattr(reproduce, "_run", data_gone)
    with pytest.raises(VaelabError, match=r"neither in this repository's DVC cache nor fetchable"):
        reproduce.main(["--params", "params.yaml", like.info.run_id])
    assert snapshot(repo) == before

    def interrupted(*cmd, **kwargs):  # Ctrl-C while the pipeline runs
        if "--force" in cmd:
            raise KeyboardInterrupt
        return real_run(*cmd, **kwargs)

    monkeypatch.setattr(reproduce, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(["--params", "params.yaml", like.info.run_id])
    assert snapshot(repo) == before  # the clone is gone too


def test_a_nan_against_a_number_is_a_difference_wherever_it_is():
    from vaelab.tracking.reproduction import _largest_difference

    nan = float("nan")
    for a, b in (([0.0, nan], [0.0, 5.0]), ([nan, 1.0], [5.0, 1.0])):
        steps = list(enumerate(a)), list(enumerate(b))
        assert _largest_difference(*steps) == float("inf")
    assert _largest_difference([(1, nan), (2, 3.0)], [(1, nan), (2, 3.5)]) == 0.5


def test_the_verdict_lines_name_each_differing_metric_largest_first():
    from vaelab.tracking.reproduction import Comparison

    comparison = Comparison(
        "a" * 32,
        "b" * 32,
        {
            "epoch/train/loss": 1e-6,
            "eval/test/neg_elbo": 0.25,
            "eval/x": 0.0,
            "eval/y": float("inf"),
        },
        ("1" * 64, "2" * 64),
        {"device": ("cpu", "cuda:0")},
        {},
    )
    lines = reproduce.verdict_lines(comparison, 75)
    assert lines[0].endswith("in 1 min 15 s")
    assert lines[1:] == [
        "reproduce: differs (largest absolute difference):",
        f"  {'eval/y':<34} missing",
        f"  {'eval/test/neg_elbo':<34} 0.25",
        f"  {'epoch/train/loss':<34} 1e-06",
        f"  {'weights (sha256)':<34} 111111111111 vs 222222222222",
        "reproduce: likely cause: device cpu -> cuda:0",
    ]
    same = Comparison("a" * 32, "b" * 32, {"k": 0.0}, ("1" * 64, "1" * 64))
    assert not same.environment and same.identical
    assert reproduce.verdict_lines(same, 5)[1].startswith("reproduce: identical: 1 metrics")
