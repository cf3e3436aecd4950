"""The training loop: deterministic on CPU, learns, and refuses impossible settings."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import N_TRAIN
from vaelab.data import load_split, training_data
from vaelab.device import resolve as resolve_device
from vaelab.errors import VaelabError
from vaelab.history import columns as history_columns
from vaelab.optim import kl_weights
from vaelab.training import train_model

TIMING = {"epoch_seconds", "images_per_second"}


def _train(params, data_dir):
    """Train as the stage does: on the training file less its validation split, the held-out
    pass on the validation split (the test set with data.validation: 0)."""
    train_x, heldout_x = training_data(data_dir, params.data.validation)
    return train_model(params, train_x, heldout_x, device=torch.device("cpu"))


def test_seeded_cpu_runs_are_bit_identical(tiny_params, fake_data_dir):
    model_a, history_a = _train(tiny_params, fake_data_dir)
    model_b, history_b = _train(tiny_params, fake_data_dir)
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in history_a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in history_b
    ]
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    other = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, seed=1))
    _, history_c = _train(other, fake_data_dir)
    assert history_c[-1]["epoch/train/neg_elbo"] != history_a[-1]["epoch/train/neg_elbo"]


def test_history_has_one_row_per_epoch_and_the_loss_falls(tiny_params, fake_data_dir):
    longer = dataclasses.replace(tiny_params.train, epochs=4)
    params = dataclasses.replace(tiny_params, train=longer)
    _, history = _train(params, fake_data_dir)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert all(set(row) == set(history_columns("val")) for row in history)
    for row in history:
        assert row["epoch/train/neg_elbo"] == pytest.approx(
            row["epoch/train/recon"] + row["epoch/train/kl"]
        )
        assert row["epoch/train/loss"] == pytest.approx(row["epoch/train/neg_elbo"])  # beta = 1
    assert history[-1]["epoch/val/neg_elbo"] < 0.8 * history[0]["epoch/val/neg_elbo"]


def test_beta_weights_only_the_kl_in_the_objective(tiny_params, fake_data_dir):
    weighted = dataclasses.replace(tiny_params.loss, beta=0.25)
    params = dataclasses.replace(tiny_params, loss=weighted)
    _, history = _train(params, fake_data_dir)
    row = history[0]
    assert row["epoch/train/loss"] == pytest.approx(
        row["epoch/train/recon"] + 0.25 * row["epoch/train/kl"]
    )


def test_batch_larger_than_the_data_set_is_refused(tiny_params, fake_data_dir):
    params = dataclasses.replace(
        tiny_params, train=dataclasses.replace(tiny_params.train, batch_size=N_TRAIN + 1)
    )
    with pytest.raises(VaelabError, match=rf"'train.batch_size' is {N_TRAIN + 1}.*{N_TRAIN} im"):
        _train(params, fake_data_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(VaelabError, match="'train.device' is 'cuda'.*'auto' or 'cpu'"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_stage_reports_user_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: [\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaelab.train",
            "--params",
            str(bad),
            "--data-dir",
            str(tmp_path),
            "--model",
            str(tmp_path / "m.pt"),
            "--history",
            str(tmp_path / "h.csv"),
            "--run-info",
            str(tmp_path / "r.json"),
            "--checkpoint",
            str(tmp_path / "c.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}: not valid YAML at line")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_compiled_step_trains_like_the_eager_one(tiny_params, fake_data_dir, objective):
    """train.compile on the CPU (torch.compile's default mode; CUDA graphs need a GPU): the
    ELBO with one sample, and IWAE with k = 2 over two epochs of the burda schedule (the
    learning rate changes between them)."""
    import torch._inductor.config

    base = tiny_params
    if objective == "iwae":
        base = dataclasses.replace(
            tiny_params,
            loss=dataclasses.replace(tiny_params.loss, objective="iwae", samples=2),
            train=dataclasses.replace(tiny_params.train, lr_schedule="burda"),
        )
    epochs = dataclasses.replace(base.train, epochs=1 if objective == "elbo" else 2)
    eager = dataclasses.replace(base, train=epochs)
    compiled = dataclasses.replace(base, train=dataclasses.replace(epochs, compile=True))
    _, eager_history = _train(eager, fake_data_dir)
    # Compiled code draws its own random numbers unless told to use eager's generator.
    with torch._inductor.config.patch(fallback_random=True):
        _, compiled_history = _train(compiled, fake_data_dir)
    # Same seed, same noise, same maths; only kernel fusion and summation order differ.
    for key in ("epoch/train/loss", "epoch/train/neg_elbo", "epoch/val/neg_elbo"):
        for got, expected in zip(compiled_history, eager_history, strict=True):
            assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    assert [r["epoch/train/lr"] for r in compiled_history] == [
        r["epoch/train/lr"] for r in eager_history
    ]


def test_benchmark_smoke(fake_data_dir, tmp_path):
    """`python -m vaelab.bench` end to end on the fake MNIST: the table's shape, not its speed."""
    report = tmp_path / "benchmark.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaelab.bench",
            "--data-dir",
            str(fake_data_dir),
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--sweep",
            "64",
            "--device",
            "cpu",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows] == ["loop", "reference", "vaelab", "vaelab"]
    assert [row.split("|")[2].strip() for row in rows[1:]] == ["64", "32", "64"]
    payload = json.loads(report.with_suffix(".json").read_text())
    assert payload["machine"]["torch"] == torch.__version__
    assert payload["rows"][0]["ratio"] == 1.0
    for row in payload["rows"]:
        assert row["images_per_second"] > 0 and row["epochs"] == 2
        assert row["test_neg_elbo"] > 0


def test_kl_warmup_weights_rise_linearly_step_by_step():
    cpu = torch.device("cpu")
    torch.testing.assert_close(
        kl_weights(0.5, warmup_epochs=0, epoch=3, n_batches=4, device=cpu), torch.full((4,), 0.5)
    )
    torch.testing.assert_close(
        kl_weights(1.0, warmup_epochs=2, epoch=1, n_batches=4, device=cpu),
        torch.tensor([0.125, 0.25, 0.375, 0.5]),
    )
    torch.testing.assert_close(
        kl_weights(1.0, warmup_epochs=2, epoch=2, n_batches=4, device=cpu),
        torch.tensor([0.625, 0.75, 0.875, 1.0]),
    )
    torch.testing.assert_close(
        kl_weights(2.0, warmup_epochs=2, epoch=3, n_batches=4, device=cpu), torch.full((4,), 2.0)
    )


def test_kl_warmup_weights_the_kl_below_beta_while_it_lasts(tiny_params, fake_data_dir):
    warm = dataclasses.replace(tiny_params.train, epochs=3, kl_warmup_epochs=2)
    _, history = _train(dataclasses.replace(tiny_params, train=warm), fake_data_dir)
    first, last = history[0], history[-1]
    assert first["epoch/train/recon"] < first["epoch/train/loss"] < first["epoch/train/neg_elbo"]
    assert last["epoch/train/loss"] == pytest.approx(last["epoch/train/neg_elbo"])


def test_dynamic_binarization_changes_between_epochs_and_the_test_set_does_not(
    tiny_params, fake_data_dir, monkeypatch
):
    import vaelab.training as train_module
    from vaelab.data import evaluation_images

    seen = []

    def recording_step_factory(model, optimizer, likelihood, compile, objective="elbo"):
        def step(x, eps, kl_weight, divisor):
            seen.append(x.clone())
            return torch.zeros(3)

        return step

    monkeypatch.setattr(train_module, "make_train_step", recording_step_factory)
    monkeypatch.setattr(train_module.torch, "randperm", lambda n, **kw: torch.arange(n))
    bern = dataclasses.replace(
        tiny_params,
        loss=dataclasses.replace(tiny_params.loss, likelihood="bernoulli"),
        data=dataclasses.replace(tiny_params.data, binarize="dynamic"),
        train=dataclasses.replace(tiny_params.train, batch_size=N_TRAIN),
    )
    _train(bern, fake_data_dir)
    epoch1, epoch2 = seen
    assert set(epoch1.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(epoch1, epoch2)
    test_x, _ = load_split(fake_data_dir, train=False)
    once, twice = (
        evaluation_images(test_x, "dynamic", "test"),
        evaluation_images(test_x, "static", "test"),
    )
    assert torch.equal(once, twice) and set(once.unique().tolist()) == {0, 255}
    # A binary sample keeps the intensities on average.
    assert abs(once.float().mean() - test_x.float().mean()) < 2.0


def test_an_epoch_is_the_plain_loop_including_the_smaller_last_batch(tiny_params, fake_data_dir):
    """train_model against the tutorial's loop written out plainly: for each batch of a seeded
    permutation, the mean over its images of 0.5 * SSE + KL, one Adam step. The fake training
    set does not divide by the batch size, so the last batch is smaller and must be averaged over
    its own size (with the full batch's divisor its gradient would shrink)."""
    params = dataclasses.replace(
        tiny_params, train=dataclasses.replace(tiny_params.train, epochs=1)
    )
    cfg = params.train
    model, _ = _train(params, fake_data_dir)

    images, _ = load_split(fake_data_dir, train=True)
    images = images[: len(images) - params.data.validation]  # the last ones are held out
    assert len(images) % cfg.batch_size != 0, "the fixture must leave a smaller last batch"
    torch.manual_seed(cfg.seed)  # initial weights, then the noise, from the global RNG
    from vaelab.model import VAE

    reference = VAE(**params.model.architecture())
    optimizer = torch.optim.Adam(reference.parameters(), lr=cfg.lr)
    permutation = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    for start in range(0, len(images), cfg.batch_size):
        x = images[permutation[start : start + cfg.batch_size]].unsqueeze(1).float() / 255
        eps = torch.randn(len(x), params.model.latent_dims)
        mu, logvar = reference.encode(x)
        mean = torch.sigmoid(reference.decode(mu + (0.5 * logvar).exp() * eps))
        sse = (x - mean).pow(2).flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)  # Kingma & Welling, App. B
        loss = (0.5 * sse + kl).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_main_gives_back_the_signal_handlers_it_found(tmp_path, fake_data_dir, monkeypatch):
    """`train.main` handles Ctrl-C/SIGTERM with a flag while it runs; called in-process (a test,
    a notebook) it must leave the caller's handlers in place, after success and after an error:
    else Ctrl-C would no longer stop pytest."""
    import signal

    from tests.test_faults import train_args, write_params
    from vaelab import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")

    def callers_int(signum, frame):  # stand-ins for whatever handlers the caller had
        pass

    def callers_term(signum, frame):
        pass

    def main(params) -> None:
        train.main(train_args(params, fake_data_dir, tmp_path))

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, callers_int)
        signal.signal(signal.SIGTERM, callers_term)
        main(write_params(tmp_path / "ok.yaml", epochs=1))
        assert (tmp_path / "vae.pt").exists()
        assert signal.getsignal(signal.SIGINT) is callers_int
        assert signal.getsignal(signal.SIGTERM) is callers_term
        bad = write_params(tmp_path / "bad.yaml", epochs=1, lr=1e30)  # diverges: main raises
        with pytest.raises(VaelabError, match="NaN or infinite"):
            main(bad)
        assert signal.getsignal(signal.SIGINT) is callers_int
        assert signal.getsignal(signal.SIGTERM) is callers_term
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_an_epoch_s_row_is_the_plain_loop_s_means_and_the_test_set_s_elbo(
    tiny_params, fake_data_dir
):
    """One epoch's history row against the plain loop written out: the training columns are the
    loop's per-image 0.5 * SSE and KL summed over every step and divided by the number of images
    (333: the last batch is smaller, so batches x batch size would be wrong); the held-out
    columns (epoch/val/*) are the trained model's ELBO on the held-out images, here a darker set
    than the training set, so that a pass over the wrong images shows (KL in closed form; recon
    is one noisy sample)."""
    params = dataclasses.replace(
        tiny_params, train=dataclasses.replace(tiny_params.train, epochs=1)
    )
    cfg = params.train
    images, _ = training_data(fake_data_dir, params.data.validation)
    g = torch.Generator().manual_seed(3)
    dark = (torch.rand(80, 28, 28, generator=g).pow(4) * 255).to(torch.uint8)
    model, history = train_model(params, images, dark, device=torch.device("cpu"))
    (row,) = history

    torch.manual_seed(cfg.seed)  # initial weights, then the noise, from the global RNG
    from vaelab.model import VAE

    reference = VAE(**params.model.architecture())
    optimizer = torch.optim.Adam(reference.parameters(), lr=cfg.lr)
    permutation = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    recon_sum, kl_sum = 0.0, 0.0
    for start in range(0, len(images), cfg.batch_size):
        x = images[permutation[start : start + cfg.batch_size]].unsqueeze(1).float() / 255
        eps = torch.randn(len(x), params.model.latent_dims)
        mu, logvar = reference.encode(x)
        mean = torch.sigmoid(reference.decode(mu + (0.5 * logvar).exp() * eps))
        recon = 0.5 * (x - mean).pow(2).flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)  # Kingma & Welling, App. B
        recon_sum += recon.sum().item()
        kl_sum += kl.sum().item()
        optimizer.zero_grad()
        (recon + kl).mean().backward()
        optimizer.step()
    n = len(images)
    assert row["epoch/train/recon"] == pytest.approx(recon_sum / n, rel=1e-5)
    assert row["epoch/train/kl"] == pytest.approx(kl_sum / n, rel=1e-5)
    assert row["epoch/train/loss"] == pytest.approx((recon_sum + kl_sum) / n, rel=1e-5)
    assert row["epoch/train/images"] == n

    def elbo_terms(images: torch.Tensor) -> tuple[float, float]:
        """Mean recon (one sample of this test's own noise) and KL (exact) of ``images``."""
        with torch.no_grad():
            x = images.unsqueeze(1).float() / 255
            mu, logvar = reference.encode(x)
            eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(99))
            mean = torch.sigmoid(reference.decode(mu + (0.5 * logvar).exp() * eps))
            recon = 0.5 * (x - mean).pow(2).flatten(1).sum(1)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return recon.double().mean().item(), kl.double().mean().item()

    test_recon, test_kl = elbo_terms(dark)
    train_recon, train_kl = elbo_terms(images)
    assert row["epoch/val/kl"] == pytest.approx(test_kl, rel=1e-4)
    assert row["epoch/val/recon"] == pytest.approx(test_recon, rel=0.02)
    assert row["epoch/val/neg_elbo"] == pytest.approx(test_recon + test_kl, rel=0.02)
    # The two sets are far apart, beyond those tolerances: the wrong set would fail above.
    assert abs(train_kl - test_kl) > 0.1 * test_kl
    assert abs(train_recon - test_recon) > 0.1 * test_recon
