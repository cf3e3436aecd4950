"""Evaluation metrics: the importance-weighted NLL, active units, the probe, per-digit ELBO."""

from __future__ import annotations

import math

import pytest
import torch

from vaelab import evaluate as ev
from vaelab import model as m


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
            .mean().item()
            for k in (1, 10, 100)
        ]  # fmt: skip
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
        post_mu, diag_var.log().expand_as(post_mu), log_lik, 20_000,
        torch.Generator().manual_seed(3), chunk=2000,
    )  # fmt: skip
    torch.testing.assert_close(mismatched, exact, atol=0.02, rtol=0)
    rough = m.importance_weighted_log_px(
        post_mu, diag_var.log().expand_as(post_mu), log_lik, 1, torch.Generator().manual_seed(3)
    )
    assert (rough - exact).abs().max() > 0.02, "K=1 is visibly off: the test can fail"


def test_active_units_count_a_dead_dimension_as_inactive():
    vae = m.VAE(latent_dims=3, hidden=(32,))
    with torch.no_grad():
        vae.enc_head.weight[:3] *= 50  # mu rows: make the live dimensions vary strongly
        vae.enc_head.weight[2].zero_()  # mu of dimension 2 no longer depends on x
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8)
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
    vae = m.VAE(latent_dims=2, hidden=(16,))
    images = torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    per_digit = ev.per_class_neg_elbo(vae, images, labels, "gaussian",
                                      torch.Generator().manual_seed(0))  # fmt: skip
    terms = m.per_image_terms(vae, images, "gaussian", torch.Generator().manual_seed(0))
    assert set(per_digit) == {"0", "1", "2"}
    for digit in range(3):
        expected = terms.neg_elbo[labels == digit].double().mean().item()
        assert per_digit[str(digit)] == pytest.approx(expected, rel=1e-6)
