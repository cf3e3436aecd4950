"""DDP: `python -m vaelab.train` with train.nproc: 2 runs itself under torchrun (gloo on the CPU)
and must give the single-process run's model (same seed, same global batch) up to float
reduction order, with one MLflow run holding one value per epoch."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import N_TRAIN, write_fake_mnist
from tests.services import free_port
from tests.test_faults import TIMING, client, env_for, train_args, train_cmd, write_params
from vaelab import distributed
from vaelab import params as params_mod
from vaelab.data import prepare_custom
from vaelab.errors import VaelabError
from vaelab.history import metrics as history_metrics
from vaelab.history import read as read_history

# Under `pytest -n 2 --dist loadgroup` (make test) these tests run in one worker, which builds
# their shared fixtures once.
pytestmark = pytest.mark.xdist_group("distributed")

# Max |difference| of any weight after 2 epochs (20 steps): reduction order only moves the last
# float bits, then Adam's normalised steps carry them; measured 3e-8 here.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[int, Path]]:
    """Fake data and two uninterrupted trainings of 2 epochs through `python -m vaelab.train`,
    with 1 and 2 processes (same seed and global batch): (data dir, {nproc: output folder})."""
    folder = tmp_path_factory.mktemp("ddp")
    write_fake_mnist(folder / "custom")
    prepare_custom(folder / "MNIST", folder / "custom", log=lambda message: None)
    results = {}
    for nproc in (1, 2):
        out = folder / f"nproc{nproc}"
        out.mkdir()
        params = write_params(out / "params.yaml", nproc=nproc, batch_size=32)
        done = subprocess.run(
            train_cmd(params, folder / "MNIST", out),
            cwd=folder,
            env=env_for(out / "mlflow.db"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        results[nproc] = out
    return folder / "MNIST", results


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "vae.pt", weights_only=True)["state_dict"]


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_gloo_processes_match_one_process(uninterrupted):
    _, results = uninterrupted
    worst = largest_difference(weights(results[1]), weights(results[2]))
    print(f"max |weight difference| 1 vs 2 processes: {worst:.3g}")
    assert worst < TOLERANCE, worst
    history_one, history_two = (
        read_history(results[1] / "history.csv"),
        read_history(results[2] / "history.csv"),
    )
    for row_one, row_two in zip(history_one, history_two, strict=True):
        assert row_two["epoch/train/images"] == N_TRAIN  # both ranks together: the whole data set
        assert row_two["epoch/train/neg_elbo"] == pytest.approx(
            row_one["epoch/train/neg_elbo"], rel=1e-4
        )
    store = client(results[2] / "mlflow.db")
    (run,) = store.search_runs([store.get_experiment_by_name("vaelab").experiment_id])
    assert run.data.tags["world_size"] == "2" and run.data.params["train.nproc"] == "2"
    assert run.data.tags["train.images_per_epoch"] == str(N_TRAIN)
    for key in history_metrics("val"):
        assert [m.step for m in store.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert not (results[2] / "checkpoint.pt").exists()


def start_ddp_training(tmp_path, fake_mnist, **train) -> tuple[subprocess.Popen, Path]:
    """`python -m vaelab.train` with train.nproc: 2 and 500 epochs (and ``train``), returned
    once rank 0 has written epoch 1 (training is under way and far from its end)."""
    prepare_custom(tmp_path / "MNIST", fake_mnist, log=lambda message: None)
    out = tmp_path / "out"
    out.mkdir()
    params = write_params(out / "params.yaml", nproc=2, batch_size=32, epochs=500, **train)
    process = subprocess.Popen(
        train_cmd(params, tmp_path / "MNIST", out),
        cwd=tmp_path,
        env=env_for(out / "mlflow.db"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "history.csv").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    return process, out


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The torchrun worker of ``rank`` among the launcher's descendants (its RANK variable)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "vaelab.train" in child.cmdline() and child.environ().get("RANK") == str(rank):
                return child
    pytest.fail(f"no process of rank {rank} under the launcher")


def killed_run(out: Path):
    store = client(out / "mlflow.db")
    (run,) = store.search_runs([store.get_experiment_by_name("vaelab").experiment_id])
    return run


def test_ctrl_c_stops_every_rank_and_marks_the_run_killed(tmp_path, fake_mnist):
    """SIGINT to `python -m vaelab.train` (what Ctrl-C or DVC sends) is passed to torchrun and
    its ranks; the stage ends with the one-line message and exit 2, the run KILLED. Restarts are
    on (train.max_restarts, 3 by default) and do not bring it back: a restarted group would
    resume the 500 epochs and run on."""
    assert params_mod.defaults().train.max_restarts > 0
    process, out = start_ddp_training(tmp_path, fake_mnist)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "resuming after epoch" not in stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted (SIGINT): the training processes stopped"), last
    assert "error: interrupted after epoch" in stderr and "marked KILLED" in stderr  # rank 0's
    run = killed_run(out)
    assert run.info.status == "KILLED", run.data.tags.get("vaelab.error")
    assert "vaelab.restarts" not in run.data.tags
    assert not (out / "vae.pt").exists()


@pytest.mark.parametrize("rank", [1, 0])
def test_a_signal_that_reaches_one_rank_stops_both_at_the_same_step(tmp_path, fake_mnist, rank):
    """The race behind a FAILED run after Ctrl-C, made certain: only one rank is signalled, so
    it is always "first". Without the stop agreement rank 1 left while rank 0 waited in the
    step's all-reduce, and rank 0's gloo error ("Connection closed by peer") marked the run
    FAILED. With it both ranks stop between the same two steps and the run is KILLED (and
    torchrun's restart, which a signal to one rank does not prevent, stops at once)."""
    process, out = start_ddp_training(tmp_path, fake_mnist, max_restarts=1)
    rank_process(process, rank).send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    run = killed_run(out)
    assert run.info.status == "KILLED", run.data.tags.get("vaelab.error")
    assert run.data.tags["vaelab.error"].startswith("KeyboardInterrupt")
    assert "error: interrupted after epoch" in stderr and "marked KILLED" in stderr
    assert "Connection closed" not in stderr
    assert not (out / "vae.pt").exists()


def test_the_global_batch_must_divide_among_the_processes(tmp_path):
    params = write_params(tmp_path / "params.yaml", nproc=3, batch_size=32)
    with pytest.raises(VaelabError, match=r"'train.batch_size' is 32, which does not divide"):
        params_mod.load(params)


@pytest.mark.parametrize(("batch", "world"), [(7, 3), (2, 3), (8, 2)])
def test_rank_losses_average_to_the_global_batch_gradient(batch, world):
    """DDP averages the ranks' gradients; with the divisor B_global / world each rank's loss
    makes that average the gradient of the whole batch's mean, also for uneven slices (7 over
    3 ranks) and an empty one (2 images over 3 ranks)."""
    from vaelab import model as m

    torch.manual_seed(0)
    vae = m.VAE(latent_dims=2, hidden=(8,))
    x, eps = torch.rand(batch, 1, 28, 28), torch.randn(batch, 2)

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        params = list(vae.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]

    full = gradients(m.training_loss(m.elbo_terms(x, *vae(x, eps=eps), "bernoulli"), 0.5))
    divisor = torch.tensor(batch / world)
    per_rank = []
    for xs, es in zip(x.tensor_split(world), eps.tensor_split(world), strict=True):
        loss = m.training_loss(m.elbo_terms(xs, *vae(xs, eps=es), "bernoulli"), 0.5, divisor)
        assert torch.isfinite(loss)
        per_rank.append(gradients(loss))
    for i, expected in enumerate(full):
        average = sum(g[i] for g in per_rank) / world
        torch.testing.assert_close(average, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("batch", "world"), [(7, 3), (2, 3)])
def test_iwae_rank_losses_average_to_the_global_batch_gradient(batch, world):
    """The same with k = 3 IWAE samples per image: noise (B, k, latent) split on the batch
    dimension as EpochPlan.batch splits it, uneven and empty slices included. In float64, so
    the comparison sees the algebra, not the threads' summation order (float32 with 2 threads
    differed by up to 6e-6)."""
    from vaelab import model as m

    torch.manual_seed(0)
    vae = m.VAE(latent_dims=2, hidden=(8,)).double()
    x = torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    eps = torch.randn(batch, 3, 2, dtype=torch.float64)
    params = list(vae.parameters())

    def loss_of(xs: torch.Tensor, es: torch.Tensor, divisor: float) -> torch.Tensor:
        per_image, _ = m.per_image_objective(
            xs, *vae(xs, eps=es), es, likelihood="bernoulli", objective="iwae", kl_weight=1.0
        )
        return per_image.sum() / divisor

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]

    full = gradients(loss_of(x, eps, batch))
    per_rank = [
        gradients(loss_of(xs, es, batch / world))
        for xs, es in zip(x.tensor_split(world), eps.tensor_split(world), strict=True)
    ]
    for i, expected in enumerate(full):
        average = sum(g[i] for g in per_rank) / world
        torch.testing.assert_close(average, expected, rtol=1e-10, atol=1e-12)


# vaelab.train under `python -m torch.distributed.run SCRIPT`, the rank RANK killing itself
# (SIGKILL) on the first start once every rank has passed the barrier after the checkpoint of
# epoch EPOCH, i.e. at the start of the next epoch. argv: EPOCH RANK TRAIN-ARGS...
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from vaelab import distributed, train
from vaelab.errors import run_stage
epoch, rank, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
barrier, passed = distributed.barrier, []
def barrier_then_kill(world):
    barrier(world)
    passed.append(world)
    if len(passed) == epoch and world.rank == rank and distributed.restart_count() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
distributed.barrier = barrier_then_kill
run_stage(lambda: train.main(argv))
"""
# The same, but on rank 1 the checkpoint reads otherwise than on rank 0: HOW is "own-path" (its
# own path on a node, where the file is not) or "other-code" (a node running other code).
# argv: HOW TRAIN-ARGS...
RANK_1_READS_OTHERWISE = """
import os, sys
from vaelab import checkpoints, train
from vaelab.errors import run_stage
how, argv = sys.argv[1], sys.argv[2:]
if os.environ["RANK"] == "1" and how == "own-path":  # a machine's local path, not shared
    at = argv.index("--checkpoint") + 1
    argv[at] = argv[at] + ".node1"
elif os.environ["RANK"] == "1":
    config = checkpoints.training_config
    checkpoints.training_config = lambda *a, **k: config(*a, **k) | {"code.vaelab.model": "0"}
run_stage(lambda: train.main(argv))
"""


def torchrun(tmp_path: Path, script: str, *args: str, max_restarts: int) -> list[str]:
    """torchrun with 2 gloo processes on this machine running ``script`` with ``args`` (its
    environment needs distributed.RESTARTABLE, as docs/scale.md says for torchrun by hand)."""
    path = tmp_path / "worker.py"
    path.write_text(script)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*run, f"--max-restarts={max_restarts}", str(path), *args]


def the_run(store: Path):
    found = client(store).search_runs(["1"])
    assert len(found) == 1, [r.info.run_id for r in found]
    return found[0]


def without_timing(out: Path) -> list[dict]:
    rows = read_history(out / "history.csv")
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parametrize("rank", [1, 0])
def test_a_lost_process_is_restarted_and_resumes_bit_identical(tmp_path, uninterrupted, rank):
    """SIGKILL of one rank early in epoch 2: torchrun restarts both (--max-restarts 1), every
    rank resumes from epoch 1's checkpoint, and the stage ends well: the same weights, bit for
    bit, and history as the uninterrupted 2-process run, one MLflow run with each epoch logged
    once, tagged with the restart."""
    data_dir, results = uninterrupted
    out, store = tmp_path / "out", tmp_path / "mlflow.db"
    out.mkdir()
    params = write_params(out / "params.yaml", nproc=2, batch_size=32, max_restarts=1)
    args = train_args(params, data_dir, out)
    done = subprocess.run(
        torchrun(tmp_path, KILL_AFTER_CHECKPOINT, "1", str(rank), *args, max_restarts=1),
        env=env_for(store) | distributed.RESTARTABLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "train: resuming after epoch 1 from" in done.stdout, done.stdout
    expected = weights(results[2])
    got = weights(out)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert without_timing(out) == without_timing(results[2])
    run = the_run(store)
    assert run.info.status == "RUNNING"  # record completes it, as after any train stage
    assert "vaelab.error" not in run.data.tags
    assert run.data.tags["vaelab.restarts"] == "1"
    assert run.data.tags["vaelab.resumed_after_epoch"] == "1"
    for key in history_metrics("val"):
        assert [m.step for m in client(store).get_metric_history(run.info.run_id, key)] == [1, 2]
    assert not (out / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, uninterrupted) -> Path:
    """A 2-process training whose rank 0 was killed early in epoch 2, not restarted: its
    folder holds epoch 1's checkpoint and the store with the run (left RUNNING)."""
    data_dir, _ = uninterrupted
    folder = tmp_path_factory.mktemp("checkpointed")
    out = folder / "out"
    out.mkdir()
    params = write_params(out / "params.yaml", nproc=2, batch_size=32, max_restarts=0)
    done = subprocess.run(
        torchrun(
            folder,
            KILL_AFTER_CHECKPOINT,
            "1",
            "0",
            *train_args(params, data_dir, out),
            max_restarts=0,
        ),
        env=env_for(folder / "mlflow.db") | distributed.RESTARTABLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    return folder


def copy_of(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of ``folder``: (outputs, store)."""
    shutil.copytree(folder, tmp_path / "copy")
    return tmp_path / "copy" / "out", tmp_path / "copy" / "mlflow.db"


def test_a_checkpoint_of_two_processes_resumes_on_one(tmp_path, uninterrupted, checkpointed):
    """The global batch is the same whatever the processes: a run checkpointed by 2 processes
    finishes on 1 (a node lost for good), in the same MLflow run, within float reduction order
    of the uninterrupted 2-process and 1-process runs."""
    data_dir, results = uninterrupted
    out, store = copy_of(checkpointed, tmp_path)
    params = write_params(out / "params.yaml", nproc=1, batch_size=32)
    done = subprocess.run(
        train_cmd(params, data_dir, out), env=env_for(store), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "train: resuming after epoch 1 from" in done.stdout
    for nproc in (2, 1):
        worst = largest_difference(weights(out), weights(results[nproc]))
        print(f"max |weight difference| 2 then 1 process vs {nproc} throughout: {worst:.3g}")
        assert worst < TOLERANCE, (nproc, worst)
    run = the_run(store)
    for key in history_metrics("val"):
        assert [m.step for m in client(store).get_metric_history(run.info.run_id, key)] == [1, 2]
    # Tagged where it finished; the first attempt's processes kept beside (vaelab.tracking.run).
    assert run.data.tags["world_size"] == "1"
    assert "world_size=2" in run.data.tags["vaelab.earlier_environment"]


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("own-path", "rank 1 finds no checkpoint at {checkpoint}.node1. Every process"),
        ("other-code", "rank 1 starts fresh (the code of vaelab.model changed since"),
    ],
)
def test_ranks_that_read_the_checkpoint_otherwise_are_refused_on_every_rank(
    tmp_path, uninterrupted, checkpointed, how, said
):
    """Rank 0 would resume from epoch 1; rank 1 does not see the file (several machines, each
    given a local path of its own: the message names rank 1's) or runs other code: every rank
    stops with the reason before training, nothing is overwritten, and torchrun's restart stops
    at once too."""
    data_dir, _ = uninterrupted
    out, store = copy_of(checkpointed, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    params = out / "params.yaml"
    params.write_text(params.read_text().replace("max_restarts: 0", "max_restarts: 1"))
    before[params.name] = params.read_bytes()
    done = subprocess.run(
        torchrun(
            tmp_path,
            RANK_1_READS_OTHERWISE,
            how,
            *train_args(params, data_dir, out),
            max_restarts=1,
        ),
        env=env_for(store) | distributed.RESTARTABLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    refusal = f"error: the 2 processes do not agree on the checkpoint {out / 'checkpoint.pt'}: "
    # Every rank refuses and exits with the message; but torchrun stops the other rank (SIGTERM)
    # as soon as one has exited with an error, which on busy cores can come before the other
    # rank's line is written: one or two lines of each attempt.
    first = [e for e in errors if e.startswith(refusal)]
    assert len(first) in (1, 2) and errors[: len(first)] == first, errors
    said = said.format(checkpoint=out / "checkpoint.pt")
    assert "rank 0 resumes after epoch 1 of MLflow run" in errors[0] and said in errors[0]
    # The one restart: each process stops at once, with the reason.
    again = "error: not restarted after a final failure: the 2 processes do not agree"
    later = errors[len(first) :]
    assert len(later) in (1, 2) and all(e.startswith(again) for e in later), errors
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".stopped"} == before
    assert "epoch   2/2" not in done.stdout


def test_a_diverging_run_is_not_restarted(tmp_path, uninterrupted):
    """Divergence is final: the run is FAILED with the reason, and the restarted processes stop
    at once instead of training into the same NaN again."""
    data_dir, _ = uninterrupted
    out, store = tmp_path / "out", tmp_path / "mlflow.db"
    out.mkdir()
    params = write_params(out / "params.yaml", nproc=2, batch_size=32, lr=1e30, max_restarts=1)
    done = subprocess.run(
        train_cmd(params, data_dir, out),
        env=env_for(store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    diverged = "error: the training loss became NaN or infinite at epoch 1"
    again = "error: not restarted after a final failure: the training loss became NaN"
    # Both processes of the first start, then both of the restart, then the launcher.
    assert [e.startswith(diverged) for e in errors[:2]] == [True, True], errors
    assert [e.startswith(again) for e in errors[2:4]] == [True] * 2, errors
    assert errors[4:] == [
        "error: the 2 training processes failed (torchrun exit code 1); their messages are above."
    ]
    run = the_run(store)
    assert run.info.status == "FAILED" and "NaN or infinite" in run.data.tags["vaelab.error"]


def test_each_launched_rank_gets_its_share_of_the_cores_unless_the_user_set_it(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 in every worker when --nproc_per_node > 1 and the variable
    is unset (torch/distributed/run.py); the environment `launch` hands it says each process's
    share instead (cores // processes, at least 1), on a simulated 16-core machine here, and
    keeps a value the user set."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)))
    shares = {n: distributed.launch_environment(n)["OMP_NUM_THREADS"] for n in (2, 3, 16, 32)}
    assert shares == {2: "8", 3: "5", 16: "1", 32: "1"}
    assert distributed.launch_environment(2).items() >= distributed.RESTARTABLE.items()
    monkeypatch.delattr(distributed.os, "sched_getaffinity")  # macOS, Windows: os.cpu_count
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 16)
    assert distributed.launch_environment(4)["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.launch_environment(2)["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in distributed.RESTARTABLE  # the launcher's own is untouched


# Under torchrun: writes this rank's OMP_NUM_THREADS and torch.get_num_threads() to
# ARGV[1]/threads.RANK.
RANK_THREADS = """
import os, sys
from pathlib import Path
import torch
seen = f"{os.environ.get('OMP_NUM_THREADS')} {torch.get_num_threads()}"
Path(sys.argv[1], "threads." + os.environ["RANK"]).write_text(seen)
"""


def test_torchrun_keeps_the_share_launch_hands_it(tmp_path, monkeypatch):
    """What each rank sees when `launch` starts 2 processes on a simulated 16-core machine:
    OMP_NUM_THREADS 8 (torchrun alone gives 1), and the threads torch makes of 8 in a fresh
    process, which MKL caps at the physical cores (2 here, where torchrun's 1 gave 1). torchrun
    runs a script in place of vaelab.train, with launch's own options."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)))
    script = tmp_path / "threads.py"
    script.write_text(RANK_THREADS)
    launch_command = distributed.launch_command

    def running_the_script(nproc: int, argv: list[str], max_restarts: int = 0) -> list[str]:
        command = launch_command(nproc, argv, max_restarts)
        module = command.index("vaelab.train")  # "-m vaelab.train" -> the script
        return [*command[: module - 1], str(script), *command[module + 1 :]]

    monkeypatch.setattr(distributed, "launch_command", running_the_script)
    distributed.launch(2, [str(tmp_path)])
    torch_of_8 = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=os.environ | {"OMP_NUM_THREADS": "8"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    seen = {p.name: p.read_text() for p in tmp_path.glob("threads.*") if p.suffix != ".py"}
    assert seen == {"threads.0": f"8 {torch_of_8}", "threads.1": f"8 {torch_of_8}"}


# Two gloo processes joined through a file store (no torchrun: a few seconds), each printing what
# distributed.all_true gives for the flags of ARGV[3:] (one per rank, 1 or 0), then what
# training.check_diverged makes of an epoch whose steps were all finite while rank 0 alone
# evaluated the test set, to NaN: rank 1 has no test numbers, as in the training loop.
# argv: RANK STORE-FILE FLAGS...
TWO_RANKS_AGREE = """
import sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from vaelab import distributed, training
from vaelab.errors import VaelabError
rank, store, cases = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
world = distributed.World(rank=rank, size=2, local_rank=rank, local_size=2)
cpu = torch.device("cpu")
for flags in cases:
    print("all_true", flags, distributed.all_true(flags[rank] == "1", world, cpu), flush=True)
test = {"neg_elbo": float("nan")} if rank == 0 else {}
result = training.EpochResult(loss=100.0, recon=90.0, kl=10.0, first_bad_step=-1, images=333)
plan = SimpleNamespace(world=world, device=cpu, n_batches=11)
try:
    training.check_diverged(result, test, epoch=2, plan=plan, lr=1e-3, cfg_lr=1e-3)
    print("check_diverged passed", flush=True)
except VaelabError as error:
    print("check_diverged raised", error, flush=True)
dist.destroy_process_group()
"""


def test_a_nan_test_elbo_on_rank_0_stops_every_rank(tmp_path):
    """A flag false on one rank is false on every rank (a MIN all-reduce; a SUM would call
    1 + 0 true), so rank 0's non-finite test ELBO reaches rank 1 and both raise the divergence
    error after the epoch (the end-to-end divergence test stops inside a step instead)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS_AGREE)
    cases = {"01": "False", "10": "False", "00": "False", "11": "True"}  # rank 0's flag first
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "store"), *cases],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for process in ranks:
            stdout, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr[-3000:]
            outputs.append(stdout.splitlines())
    finally:
        for process in ranks:
            process.kill()
    for rank, lines in enumerate(outputs):
        assert lines[: len(cases)] == [f"all_true {k} {v}" for k, v in cases.items()], rank
        assert lines[len(cases)].startswith(
            "check_diverged raised the test ELBO became NaN or infinite after epoch 2: training "
            "diverged. The checkpoint of epoch 1 is kept."
        ), (rank, lines)


def test_torchrun_by_hand_without_its_own_stores_is_warned_about(monkeypatch):
    """What the processes see of torchrun: restarts on and the agent's store shared (the
    default) gives the warning; restarts off, or stores of its own, none."""
    for name in ("TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.unrestartable_warning() is None  # no torchrun
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert distributed.unrestartable_warning() is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in distributed.unrestartable_warning()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what RESTARTABLE leads to
    assert distributed.unrestartable_warning() is None
    assert distributed.launch_command(2, ["--params", "p.yaml"], 3)[4:7] == [
        "--nproc_per_node=2",
        "--max-restarts=3",
        "-m",
    ]


# Two machines, simulated: two torchrun agents on this machine join one c10d rendezvous as two
# nodes of one process each, started as docs/scale.md says for several machines (its two
# variables set where torchrun starts: OMP_NUM_THREADS = 2 cores / 2 processes on this machine).
NODE_ENVIRONMENT = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
NODE_TIMEOUT_S = 240  # both agents together; ~20 s idle, ~30 s with a restart


@dataclass(frozen=True)
class TwoNodes:
    """What two nodes left: each node's folder (its data, params, outputs and agent.log, as a
    machine of its own holds), the folder both see (the checkpoint) and the MLflow store."""

    nodes: tuple[Path, Path]
    shared: Path
    store: Path

    def rank_0(self) -> tuple[Path, Path]:
        """(rank 0's node, the other node). Which agent gets rank 0 is the c10d rendezvous's
        choice (it sorts the nodes by host name, then agent pid), so it is read from where the
        model was written; the other node must have written nothing of its own."""
        written = [node for node in self.nodes if (node / "out" / "vae.pt").exists()]
        assert len(written) == 1, f"models written on {written}\n{self.logs()}"
        (main,) = written
        (other,) = (node for node in self.nodes if node != main)
        assert list((other / "out").iterdir()) == [], self.logs()
        return main, other

    def logs(self) -> str:
        return "\n".join(
            f"--- {node.name}'s torchrun:\n{(node / 'agent.log').read_text()[-4000:]}"
            for node in self.nodes
        )


def train_on_two_nodes(folder: Path, data_dir: Path, *program: str, max_restarts: int) -> TwoNodes:
    """Train 2 epochs on two torchrun nodes in ``folder``: each node runs ``program`` (after
    torchrun's options: ``-m vaelab.train`` or a script, then its arguments) followed by the
    train stage's arguments with its own copy of the data and params and its own outputs, and
    the checkpoint in ``folder``/shared. Fails with both agents' output unless both end well;
    never outlives NODE_TIMEOUT_S (both process groups are killed on the way out)."""
    shared = folder / "shared"
    shared.mkdir()
    store = folder / "mlflow.db"
    # A port taken meanwhile leaves both agents waiting to join: the timeout below, with the logs.
    port = free_port()
    agents: list[subprocess.Popen] = []
    nodes = tuple(folder / f"node{n}" for n in (0, 1))
    try:
        for node in nodes:
            (node / "out").mkdir(parents=True)
            shutil.copytree(data_dir, node / "MNIST")
            params = write_params(
                node / "params.yaml", nproc=2, batch_size=32, max_restarts=max_restarts
            )
            args = train_args(params, node / "MNIST", node / "out")
            args[args.index("--checkpoint") + 1] = str(shared / "checkpoint.pt")
            torchrun_node = [
                *(sys.executable, "-m", "torch.distributed.run"),
                *("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d"),
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=vaelab-two-nodes",
                f"--max-restarts={max_restarts}",
            ]
            with (node / "agent.log").open("w") as log:
                agents.append(
                    subprocess.Popen(
                        [*torchrun_node, *program, *args],
                        cwd=node,
                        env=env_for(store) | NODE_ENVIRONMENT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + NODE_TIMEOUT_S
        for agent in agents:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        late = TwoNodes(nodes, shared, store)
        pytest.fail(f"two nodes still running after {NODE_TIMEOUT_S} s\n{late.logs()}")
    finally:
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
    result = TwoNodes(nodes, shared, store)
    codes = [agent.returncode for agent in agents]
    assert codes == [0, 0], f"torchrun exit codes {codes}\n{result.logs()}"
    return result


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, uninterrupted) -> TwoNodes:
    """One uninterrupted training of 2 epochs on two torchrun nodes (same params, seed and
    global batch as the 2-process run of ``uninterrupted``)."""
    data_dir, _ = uninterrupted
    folder = tmp_path_factory.mktemp("two-nodes")
    return train_on_two_nodes(folder, data_dir, "-m", "vaelab.train", max_restarts=0)


def test_two_torchrun_nodes_train_as_two_processes_on_one_machine(uninterrupted, two_nodes):
    """torchrun started by hand on two nodes gives the weights of `python -m vaelab.train` with
    train.nproc: 2 (within float reduction order; measured: bit for bit), one MLflow run (rank
    0's), the user's OMP_NUM_THREADS in the processes (rank 0's torch.threads tag; on its own,
    with one process a node, it would take both cores) and nothing written by the other node."""
    _, results = uninterrupted
    main, _ = two_nodes.rank_0()
    worst = largest_difference(weights(main / "out"), weights(results[2]))
    print(f"max |weight difference| 2 nodes vs 2 processes on one: {worst:.3g}")
    assert worst < TOLERANCE, worst
    run = the_run(two_nodes.store)
    assert run.data.tags["world_size"] == "2", run.data.tags
    assert run.data.tags["torch.threads"] == NODE_ENVIRONMENT["OMP_NUM_THREADS"]
    assert "vaelab.restarts" not in run.data.tags
    for key in history_metrics("val"):
        steps = client(two_nodes.store).get_metric_history(run.info.run_id, key)
        assert [m.step for m in steps] == [1, 2], key
    assert list(two_nodes.shared.iterdir()) == []  # the finished run leaves no checkpoint


def test_a_process_lost_on_the_other_node_is_restarted_and_resumes_bit_identical(
    tmp_path, uninterrupted, two_nodes
):
    """SIGKILL of rank 1, on the node without rank 0, early in epoch 2, both agents with
    --max-restarts 1: its torchrun restarts it, the other one restarts rank 0 for the new
    rendezvous, both resume from epoch 1's checkpoint on the shared folder, and the run ends
    as the uninterrupted two-node run: the same weights bit for bit, the same history, one
    MLflow run with each epoch logged once, tagged with the restart although rank 0's torchrun
    did not count it (distributed.group_restart_count)."""
    data_dir, _ = uninterrupted
    script = tmp_path / "worker.py"
    script.write_text(KILL_AFTER_CHECKPOINT)
    killed = train_on_two_nodes(tmp_path, data_dir, str(script), "1", "1", max_restarts=1)
    main, other = killed.rank_0()
    log = (main / "agent.log").read_text()
    assert "exitcode: -9" in (other / "agent.log").read_text(), killed.logs()
    # The user's TORCH_DISABLE_SHARE_RDZV_TCP_STORE reached the processes (else rank 0 warns).
    assert "warning: torchrun may restart these processes" not in log, log
    assert f"train: resuming after epoch 1 from {killed.shared / 'checkpoint.pt'}" in log, log
    expected, got = weights(two_nodes.rank_0()[0] / "out"), weights(main / "out")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert without_timing(main / "out") == without_timing(two_nodes.rank_0()[0] / "out")
    run = the_run(killed.store)
    assert run.info.status == "RUNNING"  # record completes it, as after any train stage
    assert "vaelab.error" not in run.data.tags
    assert run.data.tags["vaelab.restarts"] == "1"
    assert run.data.tags["vaelab.resumed_after_epoch"] == "1"
    for key in history_metrics("val"):
        steps = client(killed.store).get_metric_history(run.info.run_id, key)
        assert [m.step for m in steps] == [1, 2], key
    assert list(killed.shared.iterdir()) == []


def test_ranks_whose_torchruns_counted_a_restart_differently_stop_together(
    tmp_path, uninterrupted
):
    """A restart after a final failure as two machines' torchruns see it when rank 1 on node 1
    failed first: rank 1 with TORCHELASTIC_RESTART_COUNT=1, rank 0 with 0 (its torchrun
    restarted healthy processes for the new rendezvous without counting it). Two `python -m
    vaelab.train` processes with that environment, joined without torchrun (a few seconds):
    both stop with the failure's message before training, and the message stays. Going by
    each rank's own count, rank 0 removed the message and waited alone for rank 1, which had
    stopped (or, had rank 0 removed it first, both trained again). The restart's tag, which
    rank 0's own count also left out, is checked on real torchrun nodes above."""
    data_dir, _ = uninterrupted
    out = tmp_path / "out"
    out.mkdir()
    params = write_params(out / "params.yaml", nproc=2, batch_size=32, max_restarts=1)
    stopped = out / "checkpoint.pt.stopped"
    reason = "the training loss became NaN or infinite at epoch 1, step 3 (rank 1 saw it)."
    stopped.write_text(reason)
    machine = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    machine |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    machine |= {"TORCHELASTIC_MAX_RESTARTS": "1", "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            train_cmd(params, data_dir, out),
            env=env_for(tmp_path / "mlflow.db")
            | machine
            | {"RANK": rank, "TORCHELASTIC_RESTART_COUNT": rank},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in ("0", "1")
    ]
    try:
        outputs = [process.communicate(timeout=120) for process in processes]
    except subprocess.TimeoutExpired:
        pytest.fail("a rank still runs after 120 s: it did not stop with the other")
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert [process.returncode for process in processes] == [2, 2], outputs
    for _, stderr in outputs:
        last = stderr.strip().splitlines()[-1]
        assert last == f"error: not restarted after a final failure: {reason}", stderr
    assert stopped.read_text() == reason
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt.stopped", "params.yaml"]
