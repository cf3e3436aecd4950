"""DDP: `python -m vaelab.train` with train.nproc: 2 runs itself under torchrun (gloo on the CPU)
and must give the single-process run's model (same seed, same global batch) up to float
reduction order, with one MLflow run holding one value per epoch."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import N_TRAIN
from tests.test_faults import client, env_for, train_cmd, write_params
from vaelab import params as params_mod
from vaelab.data import prepare_custom
from vaelab.errors import VaelabError
from vaelab.history import METRICS as HISTORY_METRICS
from vaelab.history import read as read_history

# Max |difference| of any weight after 2 epochs (20 steps): reduction order only moves the last
# float bits, then Adam's normalised steps carry them; measured 3e-8 here.
TOLERANCE = 1e-4


def test_two_gloo_processes_match_one_process(tmp_path, fake_mnist):
    prepare_custom(tmp_path / "MNIST", fake_mnist, log=lambda message: None)
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        out.mkdir()
        params = write_params(out / "params.yaml", nproc=nproc, batch_size=32)
        done = subprocess.run(
            train_cmd(params, tmp_path / "MNIST", out),
            cwd=tmp_path,
            env=env_for(out / "mlflow.db"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        results[nproc] = out
    one = torch.load(results[1] / "vae.pt", weights_only=True)["state_dict"]
    two = torch.load(results[2] / "vae.pt", weights_only=True)["state_dict"]
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
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
    for key in HISTORY_METRICS:
        assert [m.step for m in store.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert not (results[2] / "checkpoint.pt").exists()


def start_ddp_training(tmp_path, fake_mnist) -> tuple[subprocess.Popen, Path]:
    """`python -m vaelab.train` with train.nproc: 2 and 500 epochs, returned once rank 0 has
    written epoch 1 (training is under way and far from its end)."""
    prepare_custom(tmp_path / "MNIST", fake_mnist, log=lambda message: None)
    out = tmp_path / "out"
    out.mkdir()
    params = write_params(out / "params.yaml", nproc=2, batch_size=32, epochs=500)
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
    its ranks; the stage ends with the one-line message and exit 2, the run KILLED."""
    process, out = start_ddp_training(tmp_path, fake_mnist)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted (SIGINT): the training processes stopped"), last
    assert "error: interrupted after epoch" in stderr and "marked KILLED" in stderr  # rank 0's
    run = killed_run(out)
    assert run.info.status == "KILLED", run.data.tags.get("vaelab.error")
    assert not (out / "vae.pt").exists()


@pytest.mark.parametrize("rank", [1, 0])
def test_a_signal_that_reaches_one_rank_stops_both_at_the_same_step(tmp_path, fake_mnist, rank):
    """The race behind a FAILED run after Ctrl-C, made certain: only one rank is signalled, so
    it is always "first". Without the stop agreement rank 1 left while rank 0 waited in the
    step's all-reduce, and rank 0's gloo error ("Connection closed by peer") marked the run
    FAILED. With it both ranks stop between the same two steps and the run is KILLED."""
    process, out = start_ddp_training(tmp_path, fake_mnist)
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
