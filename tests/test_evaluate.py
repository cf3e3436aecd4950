"""Evaluation metrics: the importance-weighted NLL, active units, the probe, per-digit ELBO."""

from __future__ import annotations

import math
import re

import pytest
import torch

from vaelab import evaluate as ev
from vaelab import model as m


def _seeded_vae(seed: int, **config) -> m.VAE:
    """A VAE whose initial weights come from ``seed``, whatever the global RNG holds."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return m.VAE(**config)


def _log_normal(z, mu, var):
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (z - mu) ** 2 / var).sum(-1)


def test_one_sample_iw_estimate_is_the_single_sample_elbo():
    torch.manual_seed(0)
    vae = m.VAE(latent_dims=3, hidden=(16,))
    x = torch.rand(6, 1, 28, 28)
    mu, logvar = vae.encode(x)
    log_lik = m.log_px_given_z_fn(vae, x, "bernoulli")
    got = m.importance_weighted_log_px(mu, logvar, log_lik, 1, torch.Generator().manual_seed(5))
    # The same z, by hand: log p(x|z) + log p(z) - log q(z|x).
    eps = torch.randn((1, 6, 3), generator=torch.Generator().manual_seed(5))
    z = mu + (0.5 * logvar).exp() * eps
    bce = (
        torch.nn.functional.binary_cross_entropy_with_logits(vae.decode(z[0]), x, reduction="none")
        .flatten(1)
        .sum(1)
    )
    expected = (
        -bce
        + _log_normal(z[0], 0 * z[0], torch.ones_like(z[0]))
        - _log_normal(z[0], mu, logvar.exp())
    )
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-3)


def test_iw_bound_rises_with_k_and_is_above_the_elbo():
    torch.manual_seed(1)
    vae = m.VAE(latent_dims=2, hidden=(32,))
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    x = m.images_to_float(images)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        log_lik = m.log_px_given_z_fn(vae, x, "bernoulli")
        means = [
            m.importance_weighted_log_px(mu, logvar, log_lik, k, torch.Generator().manual_seed(k))
            .mean()
            .item()
            for k in (1, 10, 100)
        ]
        elbo = -m.per_image_terms(vae, images, "bernoulli").neg_elbo.mean().item()
    assert means == sorted(means), means
    assert means[-1] > elbo


def test_iw_estimate_converges_to_a_closed_form_log_likelihood():
    """Linear-Gaussian model: z ~ N(0, I_2), x|z ~ N(Wz + b, I_5), so p(x) = N(b, WW^T + I)."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    exact = torch.distributions.MultivariateNormal(b, w @ w.T + torch.eye(5)).log_prob(x)

    def log_lik(z):  # (S, B, 2) -> (S, B)
        return torch.distributions.Normal(z @ w.T + b, 1.0).log_prob(x).sum(-1)

    # The true posterior: N(S W^T (x - b), S), S = (I + W^T W)^-1. As a proposal every weight is
    # p(x) exactly, so any K gives the exact answer.
    cov = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + w.T @ w)
    post_mu = (x - b) @ w @ cov.T
    # Diagonal proposal: only exact when cov is diagonal, so use the diagonal of the precision.
    diag_var = 1 / torch.diagonal(torch.eye(2, dtype=torch.float64) + w.T @ w)
    mismatched = m.importance_weighted_log_px(
        post_mu,
        diag_var.log().expand_as(post_mu),
        log_lik,
        20_000,
        torch.Generator().manual_seed(3),
        chunk=2000,
    )
    torch.testing.assert_close(mismatched, exact, atol=0.02, rtol=0)
    rough = m.importance_weighted_log_px(
        post_mu, diag_var.log().expand_as(post_mu), log_lik, 1, torch.Generator().manual_seed(3)
    )
    assert (rough - exact).abs().max() > 0.02, "K=1 is visibly off: the test can fail"


def test_active_units_count_a_dead_dimension_as_inactive():
    vae = _seeded_vae(5, latent_dims=3, hidden=(32,))
    with torch.no_grad():
        vae.enc_head.weight[:3] *= 50  # mu rows: make the live dimensions vary strongly
        vae.enc_head.weight[2].zero_()  # mu of dimension 2 no longer depends on x
    g = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8, generator=g)
    means = ev.latent_means(vae, images)
    assert means[:, :2].var(0).min() > 0.01 and means[:, 2].var() < 1e-12
    assert ev.active_units(means) == 2


def test_probe_reads_separable_latents_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=g)
    centres = torch.randn(10, 4, generator=g) * 5
    means = centres[labels] + torch.randn(2000, 4, generator=g) * 0.3
    accuracy = ev.probe_accuracy(means[:1500], labels[:1500], means[1500:], labels[1500:])
    assert accuracy > 0.98
    noise = torch.randn(2000, 4, generator=g)
    chance = ev.probe_accuracy(noise[:1500], labels[:1500], noise[1500:], labels[1500:])
    assert chance < 0.2


def test_per_digit_neg_elbo_groups_by_label():
    vae = _seeded_vae(7, latent_dims=2, hidden=(16,))
    g = torch.Generator().manual_seed(8)
    images = torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(30) % 3
    terms = m.per_image_terms(vae, images, "gaussian", torch.Generator().manual_seed(0))
    per_digit = ev.per_class_neg_elbo(terms, labels)
    assert set(per_digit) == {"0", "1", "2"}
    for digit in range(3):
        expected = terms.neg_elbo[labels == digit].double().mean().item()
        assert per_digit[str(digit)] == pytest.approx(expected, rel=1e-6)


def test_gaussian_iw_nll_is_the_exact_log_likelihood_constant_included():
    """A decoder that ignores z (zero last-layer weights, bias b) and q(z|x) = p(z) (zero encoder
    head): every importance weight is p(x) = N(x; sigmoid(b), I) exactly, so the estimate is the
    closed-form log-likelihood for any K, with the Gaussian's 784/2 log 2 pi in it."""
    vae = _seeded_vae(0, latent_dims=2, hidden=(16,))
    bias = torch.linspace(-3, 3, m.PIXELS)
    with torch.no_grad():
        vae.enc_head.weight.zero_()  # mu = 0, logvar = 0: q(z|x) = N(0, I) = p(z)
        vae.enc_head.bias.zero_()
        vae.decoder[-1].weight.zero_()
        vae.decoder[-1].bias.copy_(bias)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8, generator=g)
    pixels = images.double().flatten(1) / 255
    exact = torch.distributions.Normal(torch.sigmoid(bias.double()), 1.0).log_prob(pixels).sum(1)

    got = ev.importance_weighted_nll(
        vae, images, likelihood="gaussian", samples=5, generator=torch.Generator().manual_seed(2)
    )
    assert got["nll"] == pytest.approx(-exact.mean().item(), abs=1e-3)
    assert got["nll_stderr"] == pytest.approx(exact.std().item() / 12**0.5, rel=1e-4)
    # KL(q || p) = 0 and the reconstruction term is -log p(x|z) = -log p(x): the ELBO is exact.
    assert got["neg_elbo"] == pytest.approx(-exact.mean().item(), abs=1e-3)
    assert got["gap"] == pytest.approx(0.0, abs=1e-3)


def _near_deterministic_vae() -> m.VAE:
    """logvar = -40 for every image: z = mu + 2e-9 eps, so each ELBO term is a function of mu
    alone and can be computed without the sampler."""
    vae = _seeded_vae(3, latent_dims=2, hidden=(16,))
    with torch.no_grad():
        vae.enc_head.weight[2:].zero_()  # rows 2..3 of the head are logvar (chunk order)
        vae.enc_head.bias[2:].fill_(-40.0)
        vae.enc_head.weight[:2] *= 20  # spread the means: some variance to count as active
    return vae.eval()


def _direct_terms(vae: m.VAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image 0.5 * SSE and KL of the near-deterministic VAE, in float64, written out."""
    x = images.double().unsqueeze(1) / 255
    with torch.no_grad():
        mu = vae.encode(x.float())[0]
        mean = torch.sigmoid(vae.decode(mu)).double()
    recon = 0.5 * (x - mean).pow(2).flatten(1).sum(1)
    # -0.5 * sum(1 + logvar - mu^2 - exp(logvar)) with logvar = -40
    kl = 0.5 * (39 + mu.double().pow(2) + math.exp(-40)).sum(1)
    return recon, kl


def evaluate(vae, params, train, test, last, val=None) -> dict:
    """``ev.evaluate`` on (images, labels) pairs, with a one-row history ``last``."""
    return ev.evaluate(
        vae,
        params,
        train=ev.Split(*train),
        test=ev.Split(*test),
        history=[last],
        validation=None if val is None else ev.Split(*val),
    )


def test_evaluate_reports_each_set_s_own_values(tiny_params):
    """evaluate()'s numbers against a direct computation: the test and validation ELBOs from
    their own images, the training ELBO from the training images, per-digit means by label, the
    IW bound's ELBO in the same convention with the Gaussian constant, counts and active units.
    The three sets are drawn from three distributions, so a metric of the wrong set shows."""
    vae = _near_deterministic_vae()
    g = torch.Generator().manual_seed(4)
    train = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=g)
    # A different distribution (mostly dark): its ELBO differs clearly from the training set's.
    test = (torch.rand(30, 28, 28, generator=g).pow(4) * 255).to(torch.uint8)
    # A third (mostly bright) for the validation split.
    val = (torch.rand(20, 28, 28, generator=g).pow(0.25) * 255).to(torch.uint8)
    train_labels, test_labels = torch.arange(50) % 10, torch.arange(30) % 3
    val_labels = torch.arange(20) % 4
    last = {
        "epoch": 2,
        "epoch/train/neg_elbo": 9.0,
        "epoch/train/recon": 5.0,
        "epoch/train/kl": 4.0,
    }

    metrics = evaluate(
        vae, tiny_params, (train, train_labels), (test, test_labels), last, (val, val_labels)
    )

    for split, images in (("test", test), ("train", train), ("val", val)):
        recon, kl = _direct_terms(vae, images)
        assert metrics[split]["recon"] == pytest.approx(recon.mean().item(), rel=1e-5), split
        assert metrics[split]["kl"] == pytest.approx(kl.mean().item(), rel=1e-5), split
        assert metrics[split]["neg_elbo"] == pytest.approx((recon + kl).mean().item(), rel=1e-5)
    recon, kl = _direct_terms(vae, test)
    train_recon, train_kl = _direct_terms(vae, train)
    val_recon, val_kl = _direct_terms(vae, val)
    assert abs((recon + kl).mean() - (train_recon + train_kl).mean()) > 1.0, "sets tell apart"
    assert abs((recon + kl).mean() - (val_recon + val_kl).mean()) > 1.0, "sets tell apart"
    assert abs((val_recon + val_kl).mean() - (train_recon + train_kl).mean()) > 1.0
    assert metrics["val_per_digit"] == {
        str(d): pytest.approx((val_recon + val_kl)[val_labels == d].mean().item(), rel=1e-5)
        for d in range(4)
    }
    assert metrics["test_per_digit"] == {
        str(d): pytest.approx((recon + kl)[test_labels == d].mean().item(), rel=1e-5)
        for d in range(3)
    }
    constant = m.PIXELS * 0.5 * math.log(2 * math.pi)
    assert metrics["test_iw"]["neg_elbo"] == pytest.approx(
        (recon + kl).mean().item() + constant, rel=1e-6
    )
    assert metrics["val_iw"]["neg_elbo"] == pytest.approx(
        (val_recon + val_kl).mean().item() + constant, rel=1e-6
    )
    assert metrics["test_iw"]["samples"] == tiny_params.evaluate.iw_samples
    assert metrics["val_iw"]["samples"] == tiny_params.evaluate.iw_samples
    with torch.no_grad():
        means = vae.encode(test.float().unsqueeze(1) / 255)[0].double()
        val_means = vae.encode(val.float().unsqueeze(1) / 255)[0].double()
    assert metrics["latent"]["dims"] == 2
    assert metrics["latent"]["active_units"] == int((means.var(0, unbiased=False) > 0.01).sum())
    assert metrics["latent"]["active_units"] >= 1
    assert metrics["val_latent"]["active_units"] == int(
        (val_means.var(0, unbiased=False) > 0.01).sum()
    )
    assert metrics["train_last_epoch"] == {"neg_elbo": 9.0, "recon": 5.0, "kl": 4.0}
    assert metrics["epochs"] == metrics["model_epoch"] == 2
    assert metrics["images"] == {"train": 50, "val": 20, "test": 30}


def test_each_metric_draws_from_its_own_generator():
    """Seeded from evaluate.seed and the metric's name: the same pair gives the same draws, any
    other name or seed others, so adding or reordering a metric moves no other metric."""
    cpu = torch.device("cpu")

    def draws(seed: int, metric: str) -> torch.Tensor:
        return torch.randn(5, generator=ev.metric_generator(seed, metric, cpu))

    assert torch.equal(draws(0, "test"), draws(0, "test"))
    assert not torch.equal(draws(0, "test"), draws(0, "train"))
    assert not torch.equal(draws(0, "test"), draws(1, "test"))


def test_evaluate_shares_the_test_set_s_terms_among_its_metrics(tiny_params):
    """The test ELBO is the mean of one draw of per-image terms (the "test" generator's); the
    per-digit values are that draw grouped, so weighted by the digit counts they average back
    to the test value exactly; the IW estimate's ELBO is the same draw plus the constant."""
    vae = _seeded_vae(9, latent_dims=2, hidden=(16,))
    g = torch.Generator().manual_seed(10)
    train = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (36, 28, 28), dtype=torch.uint8, generator=g)
    train_labels, test_labels = torch.arange(40) % 10, torch.arange(36) % 4
    last = {
        "epoch": 1,
        "epoch/train/neg_elbo": 9.0,
        "epoch/train/recon": 5.0,
        "epoch/train/kl": 4.0,
    }

    metrics = evaluate(vae, tiny_params, (train, train_labels), (test, test_labels), last)

    seed = tiny_params.evaluate.seed
    own = m.per_image_terms(vae, test, "gaussian", ev.metric_generator(seed, "test", "cpu"))
    assert metrics["test"]["neg_elbo"] == pytest.approx(own.neg_elbo.double().mean().item())
    counts = torch.bincount(test_labels)
    weighted = sum(counts[d].item() * metrics["test_per_digit"][str(d)] for d in range(4))
    assert weighted / len(test) == pytest.approx(metrics["test"]["neg_elbo"], rel=1e-12)
    constant = m.PIXELS * 0.5 * math.log(2 * math.pi)
    assert metrics["test_iw"]["neg_elbo"] == pytest.approx(
        metrics["test"]["neg_elbo"] + constant, rel=1e-12
    )


def test_the_probe_is_fit_on_the_training_set_not_the_test_set(tiny_params):
    """Three brightness levels, each its own cluster of latent means. The training labels name
    the levels 0, 1, 2; the test labels name them 1, 2, 0. A probe fit on the training set reads
    the training names, so it gets every test image wrong; one fit on the test set's own means
    and labels would score near 1."""
    vae = _near_deterministic_vae()
    levels = torch.tensor([20, 128, 235], dtype=torch.uint8)

    def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        level = torch.arange(n) % 3
        noise = torch.randint(0, 4, (n, 28, 28), generator=torch.Generator().manual_seed(seed))
        return (levels[level].view(n, 1, 1) + noise.to(torch.uint8)), level

    train, train_level = images(60, 1)
    test, test_level = images(30, 2)
    val, val_level = images(21, 3)
    means = ev.latent_means(vae, torch.cat([train, test]))
    # The fit itself can separate the levels: on the test set's own labels it scores 1.
    assert ev.probe_accuracy(means[60:], test_level, means[60:], test_level) == 1.0
    last = {"epoch": 1} | {f"epoch/train/{k}": 1.0 for k in ("neg_elbo", "recon", "kl")}

    # The test labels shifted by one, the validation labels by two: fit on either, the probe
    # would score 1 there.
    metrics = evaluate(
        vae,
        tiny_params,
        (train, train_level),
        (test, (test_level + 1) % 3),
        last,
        (val, (val_level + 2) % 3),
    )

    assert metrics["latent"]["probe_accuracy"] == 0.0
    assert metrics["val_latent"]["probe_accuracy"] == 0.0
    # And with the training names, every held-out image is read right.
    same = evaluate(vae, tiny_params, (train, train_level), (test, test_level), last)
    assert same["latent"]["probe_accuracy"] == 1.0


def test_active_units_count_variances_above_0_01():
    """Latent means with known variances (Burda et al. 2016, sec. 5.2: active when
    Var_x(E_q[z_d]) > 0.01): +-sqrt(v) alternating has population variance v exactly."""
    variances = torch.tensor([0.002, 0.008, 0.0125, 0.05, 0.2, 1.5], dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(500)  # (1000,)
    means = (signs[:, None] * variances.sqrt()[None, :] + 3.0).float()  # any offset
    assert ev.active_units(means) == 4  # 0.0125, 0.05, 0.2, 1.5


def test_the_iw_gap_is_the_negative_elbo_minus_the_nll_and_positive():
    """A random model, whose posterior is far from its approximation: the K = 200 importance-
    weighted bound is well above the ELBO, so -ELBO - NLL (the gap) is clearly positive."""
    vae = _seeded_vae(11, latent_dims=2, hidden=(16,))
    g = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8, generator=g)
    got = ev.importance_weighted_nll(
        vae, images, likelihood="gaussian", samples=200, generator=torch.Generator().manual_seed(1)
    )
    assert got["nll"] < got["neg_elbo"]
    assert got["gap"] > 0.1
    assert got["gap"] == pytest.approx(got["neg_elbo"] - got["nll"], rel=1e-9)


def test_the_training_numbers_come_from_the_history_s_last_row(tiny_params):
    """train_last_epoch and epochs are the last epoch's, not the first's."""
    vae = _seeded_vae(9, latent_dims=2, hidden=(16,))
    g = torch.Generator().manual_seed(10)
    train = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8, generator=g)
    history = [
        {"epoch": e, "epoch/train/neg_elbo": 10.0 * e, "epoch/train/recon": 6.0 * e}
        | {"epoch/train/kl": 4.0 * e}
        for e in (1, 2, 3)
    ]
    metrics = ev.evaluate(
        vae,
        tiny_params,
        train=ev.Split(train, torch.arange(20) % 2),
        test=ev.Split(test, torch.arange(10) % 2),
        history=history,
    )
    assert metrics["epochs"] == 3
    assert metrics["train_last_epoch"] == {"neg_elbo": 30.0, "recon": 18.0, "kl": 12.0}


# The importance-weighted NLL of 1000 random images with a random model (ten batches of 100), run
# in a subprocess whose stderr is the caller's choice (a terminal or a pipe).
IW_NLL_SCRIPT = """
import torch
from vaelab import evaluate, model
torch.manual_seed(0)
vae = model.VAE(latent_dims=2, hidden=(16,))
images = torch.randint(0, 256, (1000, 28, 28), dtype=torch.uint8)
evaluate.importance_weighted_nll(vae, images, likelihood="gaussian", samples=64,
                                 generator=torch.Generator().manual_seed(0))
print("done")
"""


def test_the_iw_nll_shows_images_done_and_time_left_on_a_terminal_only():
    """As training's bar: shown when stderr is a terminal (here a pseudo-terminal), with the
    images done out of all and the time left; nothing when stderr is a pipe or a file (DVC's
    logs, CI)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    primary, secondary = pty.openpty()
    # A terminal 120 columns wide (a fresh pseudo-terminal has 0, where tqdm draws nothing).
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    done = subprocess.run(
        [sys.executable, "-c", IW_NLL_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=secondary,
        timeout=120,
    )
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal is closed once everything has been read
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert done.returncode == 0 and done.stdout == b"done\n"
    text = shown.decode(errors="replace")
    assert "IW-NLL, K=64" in text and "0/1000" in text and "image" in text, text
    # Images done of all, elapsed < left, after a batch or more.
    assert re.search(r" [1-9]\d\d/1000 \[\d\d:\d\d<\d\d:\d\d", text), text
    piped = subprocess.run(
        [sys.executable, "-c", IW_NLL_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert piped.stdout == "done\n" and "IW-NLL" not in piped.stderr, piped.stderr
