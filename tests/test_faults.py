"""Faults at run time: kill -9, Ctrl-C, divergence, an unreachable store, two writers, bad
checkpoints. Each runs the real `python -m vaelab.train` in a subprocess on the fake MNIST."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import PROJECT, TINY, write_fake_mnist
from vaelab import params as params_mod
from vaelab.data import prepare_custom
from vaelab.errors import VaelabError
from vaelab.history import metrics as history_metrics
from vaelab.history import read as read_history
from vaelab.training import train_model

# Under `pytest -n 2 --dist loadgroup` (make test) these tests run in one worker, which builds
# their shared fixtures once.
pytestmark = pytest.mark.xdist_group("faults")

TIMING = {"epoch_seconds", "images_per_second"}


def write_params(path: Path, **train) -> Path:
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for section, values in TINY.items():
        raw[section].update(values)
    raw["train"].update(train)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_args(params: Path, data_dir: Path, out: Path) -> list[str]:
    """The train stage's arguments, its outputs in ``out``."""
    outputs = {
        "model": "vae.pt",
        "history": "history.csv",
        "run-info": "run.json",
        "checkpoint": "checkpoint.pt",
    }
    paths = [("params", params), ("data-dir", data_dir)]
    paths += [(name, out / file) for name, file in outputs.items()]
    return [arg for name, path in paths for arg in (f"--{name}", str(path))]


def train_cmd(params: Path, data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vaelab.train", *train_args(params, data_dir, out)]


def env_for(store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "MLFLOW_DISABLE_TELEMETRY": "true"}


def client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}")


# `python -m vaelab.train` that signals itself right after writing the checkpoint of a given
# epoch: the signal arrives at that state on any machine, however fast (a signal sent from
# outside "after epoch 3" could land after the last epoch). argv: EPOCH SIGNAL TRAIN-ARGS...
SIGNAL_AFTER_CHECKPOINT = """
import os, signal, sys
from vaelab import checkpoints, train
from vaelab.errors import run_stage
epoch, signum, argv = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3:]
write = checkpoints.save
def write_then_signal(path, state, **bound):
    write(path, state, **bound)
    if state["epoch"] == epoch:
        os.kill(os.getpid(), signum)
checkpoints.save = write_then_signal
run_stage(lambda: train.main(argv))
"""


def signalled_train_cmd(epoch: int, how: str, params: Path, data_dir: Path, out: Path):
    """``train_cmd`` that receives signal ``how`` once the checkpoint of ``epoch`` is written."""
    return [
        sys.executable,
        "-c",
        SIGNAL_AFTER_CHECKPOINT,
        str(epoch),
        how,
        *train_args(params, data_dir, out),
    ]


def assert_steps_once(store: Path, run_id: str, epochs: int) -> None:
    for key in history_metrics("val"):
        steps = [m.step for m in client(store).get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)


def reference_run(folder: Path, params: Path) -> tuple[Path, Path, Path]:
    """Fake data and a reference run of ``params`` with nothing going wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    write_fake_mnist(folder / "custom")
    data_dir = folder / "MNIST"
    prepare_custom(data_dir, folder / "custom", log=lambda message: None)
    out = folder / "reference"
    out.mkdir()
    subprocess.run(
        train_cmd(params, data_dir, out),
        env=env_for(folder / "ref.db"),
        check=True,
        capture_output=True,
    )
    return data_dir, params, out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Fake data, params and a reference run of 20 epochs with nothing going wrong."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return reference_run(folder, write_params(folder / "params.yaml", epochs=20))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_resume_after_interruption_is_bit_identical(tmp_path, uninterrupted, how):
    check_resume(tmp_path, uninterrupted, how)


def test_resume_keeps_the_schedule_the_objective_and_the_trained_bias(tmp_path):
    """IWAE (k = 2) with the burda schedule (rates change after epochs 1 and 4) and the
    data_mean output bias, stopped after epoch 3 and resumed for epochs 4 to 6: the same weights,
    history and learning rates as the run that was not stopped (the bias is set before the
    checkpoint's weights are restored, so it does not overwrite them)."""
    params = write_params(tmp_path / "params.yaml", epochs=6, lr_schedule="burda")
    raw = yaml.safe_load(params.read_text())
    raw["loss"].update(objective="iwae", samples=2)
    raw["model"]["output_bias"] = "data_mean"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    check_resume(tmp_path, reference_run(tmp_path / "reference-run", params), "SIGTERM", epochs=6)


def check_resume(tmp_path: Path, uninterrupted, how: str, epochs: int = 20) -> None:
    data_dir, params, reference = uninterrupted
    out, store = tmp_path / "interrupted", tmp_path / "store.db"
    out.mkdir()
    interrupted = subprocess.run(
        signalled_train_cmd(3, how, params, data_dir, out),
        env=env_for(store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    stderr = interrupted.stderr
    assert interrupted.returncode != 0
    assert (out / "checkpoint.pt").exists() and not (out / "vae.pt").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
    (run,) = client(store).search_runs(["1"])
    if how != "SIGKILL":  # a signal it can catch: a clean stop, one line saying how to resume
        assert interrupted.returncode == 2
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted after epoch 3;")
        assert "resume" in stderr.splitlines()[-1]
        assert "Traceback" not in stderr
        assert run.info.status == "KILLED"

    resumed = subprocess.run(
        train_cmd(params, data_dir, out), env=env_for(store), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "train: resuming after epoch" in resumed.stdout
    assert not (out / "checkpoint.pt").exists()
    expected = torch.load(reference / "vae.pt", weights_only=True)["state_dict"]
    got = torch.load(out / "vae.pt", weights_only=True)["state_dict"]
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    strip = [
        {k: v for k, v in r.items() if k not in TIMING} for r in read_history(out / "history.csv")
    ]
    assert strip == [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_history(reference / "history.csv")
    ]
    (again,) = client(store).search_runs(["1"])  # the same run continued, no new one
    assert again.info.run_id == run.info.run_id
    assert_steps_once(store, run.info.run_id, epochs)


def test_changed_params_start_fresh_saying_why(tmp_path, fake_data_dir):
    params = write_params(tmp_path / "params.yaml", epochs=25)
    out, store = tmp_path / "out", tmp_path / "store.db"
    out.mkdir()
    killed = subprocess.run(
        signalled_train_cmd(2, "SIGKILL", params, fake_data_dir, out),
        env=env_for(store),
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    write_params(params, epochs=3, lr=0.002)
    result = subprocess.run(
        train_cmd(params, fake_data_dir, out),
        env=env_for(store),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "starting fresh: the params changed" in result.stdout
    assert "train.lr: 0.001 -> 0.002" in result.stdout
    assert len(read_history(out / "history.csv")) == 3


def test_a_checkpoint_that_is_not_tensors_is_refused_and_kept(tmp_path, fake_data_dir):
    out, store = tmp_path / "out", tmp_path / "store.db"
    out.mkdir()
    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"version": 1, "payload": Exploit()}, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    result = subprocess.run(
        train_cmd(write_params(tmp_path / "p.yaml"), fake_data_dir, out),
        env=env_for(store),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "not a usable vaelab checkpoint" in result.stderr and "Delete it" in result.stderr
    assert not marker.exists()
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not (out / "vae.pt").exists()


def test_divergence_stops_naming_epoch_and_step(tmp_path, fake_data_dir, tiny_params):
    from vaelab.data import training_data

    huge = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, lr=1e30))
    train_x, test_x = training_data(fake_data_dir, tiny_params.data.validation)
    states = []
    with pytest.raises(VaelabError, match=r"NaN or infinite at epoch 1, step 2 of 11: "):
        train_model(huge, train_x, test_x, device=torch.device("cpu"), on_state=states.append)
    assert states == [], "no state of the diverged epoch is handed out to be saved"


def test_divergence_in_the_last_step_of_an_epoch_is_caught(fake_data_dir, tiny_params):
    """One batch per epoch: the only step's loss is computed before its update, so the broken
    model shows in no loss of the epoch; the epoch must still end in the divergence error, not
    in a saved model that outputs NaN."""
    from vaelab.data import training_data

    train_x, test_x = training_data(fake_data_dir, tiny_params.data.validation)
    one_step = dataclasses.replace(tiny_params.train, lr=1e30, batch_size=len(train_x), epochs=1)
    with pytest.raises(
        VaelabError, match=r"validation ELBO became NaN or infinite after epoch 1: "
    ):
        train_model(
            dataclasses.replace(tiny_params, train=one_step),
            train_x,
            test_x,
            device=torch.device("cpu"),
        )


def test_divergence_marks_the_run_failed_with_the_reason(tmp_path, fake_data_dir):
    out, store = tmp_path / "out", tmp_path / "store.db"
    out.mkdir()
    params = write_params(tmp_path / "params.yaml", lr=1e30)
    result = subprocess.run(
        train_cmd(params, fake_data_dir, out), env=env_for(store), capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (run,) = client(store).search_runs(["1"])
    assert run.info.status == "FAILED"
    assert "NaN or infinite at epoch 1" in run.data.tags["vaelab.error"]


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path, fake_data_dir):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    # A port bound but not listening: connections to it are refused, and while the socket is held
    # no other process can take the port and answer.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        uri = f"http://127.0.0.1:{port}"
        env = env_for(tmp_path / "unused.db") | {"MLFLOW_TRACKING_URI": uri}
        # Fast means before the first epoch (asserted below), not within some seconds; the
        # timeout only stops a hang (MLflow's own client retries for minutes).
        result = subprocess.run(
            train_cmd(write_params(tmp_path / "p.yaml"), fake_data_dir, out),
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert result.returncode == 2
    assert f"cannot reach the MLflow tracking server http://127.0.0.1:{port}" in result.stderr
    assert "epoch" not in result.stdout.replace("epochs", "")
    assert not (out / "vae.pt").exists() and not (tmp_path / "unused.db").exists()


def test_two_trainings_at_once_on_a_fresh_store_both_complete(tmp_path, fake_data_dir):
    store = tmp_path / "shared.db"
    processes = []
    for seed in (1, 2):
        out = tmp_path / f"out{seed}"
        out.mkdir()
        params = write_params(tmp_path / f"params{seed}.yaml", seed=seed, epochs=3)
        processes.append(
            subprocess.Popen(
                train_cmd(params, fake_data_dir, out),
                env=env_for(store),
                stderr=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
            )
        )
    for process in processes:
        _, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr
    runs = client(store).search_runs(["1"])
    assert sorted(r.data.params["train.seed"] for r in runs) == ["1", "2"]
    for run in runs:
        assert_steps_once(store, run.info.run_id, 3)


def test_a_checkpoint_of_the_last_epoch_finishes_the_stage(tmp_path, fake_data_dir, tiny_params):
    """Killed after the final checkpoint, before exiting: DVC has deleted the history; the
    rerun has no epoch left to train and must still write every output."""
    from vaelab.checkpoints import save as save_checkpoint
    from vaelab.checkpoints import training_config
    from vaelab.data import load_split

    out, store = tmp_path / "out", tmp_path / "store.db"
    out.mkdir()
    params_file = write_params(tmp_path / "params.yaml")
    params = params_mod.load(params_file)
    config = training_config(params, torch.device("cpu"))
    md5 = json.loads((fake_data_dir / "checksums.json").read_text())["files"]
    data_md5 = {name: entry["md5"] for name, entry in md5.items()}
    train_x, _ = load_split(fake_data_dir, train=True)
    test_x, _ = load_split(fake_data_dir, train=False)

    def keep(state):
        save_checkpoint(
            out / "checkpoint.pt", state, config=config, data_md5=data_md5, run_id="deleted"
        )

    model, history = train_model(
        params, train_x, test_x, device=torch.device("cpu"), on_state=keep
    )
    result = subprocess.run(
        train_cmd(params_file, fake_data_dir, out),
        env=env_for(store),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 2" in result.stdout
    assert len(read_history(out / "history.csv")) == 2
    saved = torch.load(out / "vae.pt", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
    (run,) = client(store).search_runs(["1"])  # its old run is gone: a new one with all epochs
    assert_steps_once(store, run.info.run_id, 2)


def test_a_checkpoint_from_another_device_or_code_is_not_resumed(tmp_path, tiny_params):
    from vaelab.checkpoints import load as load_checkpoint
    from vaelab.checkpoints import save as save_checkpoint
    from vaelab.checkpoints import training_config

    config = training_config(tiny_params, torch.device("cpu"))
    state = {"epoch": 1, "history": []}
    save_checkpoint(tmp_path / "c.pt", state, config=config, data_md5={"a": "1"}, run_id="run")
    assert load_checkpoint(tmp_path / "c.pt", config=config, data_md5={"a": "1"})[0]["epoch"] == 1
    cuda = config | {"device": "cuda"}
    assert (
        "device: cpu -> cuda"
        in load_checkpoint(tmp_path / "c.pt", config=cuda, data_md5={"a": "1"})[1]
    )
    edited = config | {"code.vaelab.model": "0" * 32}
    assert (
        "the code of vaelab.model changed"
        in load_checkpoint(tmp_path / "c.pt", config=edited, data_md5={"a": "1"})[1]
    )
    assert (
        "the data changed"
        in load_checkpoint(tmp_path / "c.pt", config=config, data_md5={"a": "2"})[1]
    )


def _train_stage_param_keys(params: params_mod.Params) -> list[str]:
    """Every params key the train stage reads, as dvc.yaml lists them (a whole section, or one
    key): the checkpoint must hold each of them, or a resume would mix two configurations."""
    listed = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["train"]["params"]
    flat = params_mod.flatten(params)
    return [k for k in flat for entry in listed if k == entry or k.startswith(f"{entry}.")]


def _another_value(value):
    """A different value of the same type (the base params below accept each one alone)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, list):
        return [_another_value(value[0]), *value[1:]]
    return {"none": "dynamic", "bernoulli": "gaussian", "elbo": "iwae", "constant": "burda"}.get(
        value,
        {"mlp": "conv", "relu": "tanh", "zero": "data_mean", "cpu": "auto", "last": "best"}.get(
            value, f"{value}-other"
        ),
    )


# The keys a checkpoint may resume across: how many processes share the global batch (a run
# checkpointed by 2 resumes on 1, tests/test_distributed.py) and how often torchrun restarts them.
RESUMABLE_ACROSS = {"train.nproc", "train.max_restarts"}


def test_a_checkpoint_is_not_resumed_when_any_param_train_reads_changed(tmp_path, tiny_params):
    """For each key of dvc.yaml's train params (loss.beta and loss.objective among them), a
    checkpoint written before the change is not resumed, and the reason names the key; but for
    the number of processes and restarts, which do not change the maths."""
    from vaelab.checkpoints import CheckpointFile

    base = dataclasses.replace(
        tiny_params, loss=dataclasses.replace(tiny_params.loss, likelihood="bernoulli")
    )
    checksums = {"files": {"a": {"md5": "1" * 32}}}
    path, cpu = tmp_path / "c.pt", torch.device("cpu")
    CheckpointFile.of(path, params=base, device=cpu, checksums=checksums).save(
        {"epoch": 1, "history": []}, "run"
    )
    assert CheckpointFile.of(path, params=base, device=cpu, checksums=checksums).load()[0]
    keys = _train_stage_param_keys(base)
    assert {"loss.beta", "loss.objective", "train.lr", "data.binarize"} <= set(keys)
    for key in keys:
        raw = dataclasses.asdict(base)
        section, name = key.split(".")
        raw[section][name] = _another_value(params_mod.flatten(base)[key])
        changed = params_mod.parse(raw)
        resume, why = CheckpointFile.of(
            path, params=changed, device=cpu, checksums=checksums
        ).load()
        if key in RESUMABLE_ACROSS:
            assert resume is not None and why == "", key
            continue
        assert resume is None, key
        assert f"{key}: " in why, (key, why)
