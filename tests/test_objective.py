"""The training objectives (loss.objective, loss.samples), the learning-rate schedule
(train.lr_schedule) and the decoder's output bias (model.output_bias)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from vaelab import model as m
from vaelab import params as params_mod
from vaelab.errors import VaelabError
from vaelab.optim import learning_rate, make_train_step
from vaelab.training import set_output_bias, train_model


def binary_batch(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 28, 28) binary images: a fixed random pattern per image, darker at the edges."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, 1, 28, 28, generator=g) * 0.6, generator=g)


def tiny_vae(seed: int, dtype=torch.float32, **kwargs) -> m.VAE:
    torch.manual_seed(seed)
    return m.VAE(**{"latent_dims": 3, "hidden": (16,), "activation": "tanh", **kwargs}).to(dtype)


def objective(vae, x, eps, objective_name: str, likelihood: str = "bernoulli", beta=1.0):
    logits, mu, logvar = vae(x, eps=eps)
    per_image, terms = m.per_image_objective(
        x, logits, mu, logvar, eps, likelihood=likelihood, objective=objective_name, kl_weight=beta
    )
    return per_image, terms


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_with_one_sample_both_objectives_train_exactly_as_the_elbo_step(likelihood):
    """k = 1: iwae and elbo give the ELBO's values and gradients, and three optimiser steps of
    make_train_step end on the same weights, bit for bit, as the ELBO step written with
    model.training_loss (the code every run used before the objectives existed)."""
    x = binary_batch(8, seed=1)
    eps = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    vae = tiny_vae(0)
    elbo_value, _ = objective(vae, x, eps, "elbo", likelihood, beta=0.5)
    iwae_value, _ = objective(vae, x, eps, "iwae", likelihood, beta=0.5)
    logits, mu, logvar = vae(x, eps=eps)
    reference = m.training_loss(m.elbo_terms(x, logits, mu, logvar, likelihood), 0.5, None)
    assert torch.equal(elbo_value.mean(), reference) and torch.equal(iwae_value, elbo_value)

    def trained(objective_name: str | None) -> dict[str, torch.Tensor]:
        net = tiny_vae(0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        divisor, weight = torch.tensor(8.0), torch.tensor(0.5)
        if objective_name is None:  # the ELBO step as it was written before
            for _ in range(3):
                logits, mu, logvar = net(x, eps=eps)
                loss = m.training_loss(m.elbo_terms(x, logits, mu, logvar, likelihood), weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            step = make_train_step(
                net, opt, likelihood=likelihood, objective=objective_name, compile=False
            )
            for _ in range(3):
                step(x, eps, weight, divisor)
        return copy.deepcopy(net.state_dict())

    before = trained(None)
    for name in ("elbo", "iwae"):
        after = trained(name)
        assert all(torch.equal(before[k], after[k]) for k in before), name


def test_the_k_sample_elbo_averages_k_single_sample_elbos():
    """elbo with eps (B, k, latent): the mean over j of the one-sample loss with eps[:, j]."""
    x, vae = binary_batch(6, seed=3), tiny_vae(1)
    eps = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(4))
    k_sample, _ = objective(vae, x, eps, "elbo", beta=0.3)
    singles = torch.stack([objective(vae, x, eps[:, j], "elbo", beta=0.3)[0] for j in range(4)])
    torch.testing.assert_close(k_sample, singles.mean(dim=0), rtol=1e-5, atol=1e-4)


def test_the_iwae_bound_lies_between_the_elbo_and_a_larger_k_estimate():
    """Burda et al. (2016), theorem 1: ELBO <= L_k <= L_k' <= log p(x) in expectation. On a fixed
    model and batch, averaged over 200 noise draws (each of an image's estimates from the same
    draws, so the differences are paired), against evaluate's own importance-weighted estimator
    (vaelab.model.importance_weighted_log_px) with K = 2000 as the larger k'."""
    x, vae = binary_batch(8, seed=5), tiny_vae(2)
    with torch.no_grad():  # a narrow, off-centre posterior: large gaps between the bounds
        vae.enc_head.bias[3:] -= 3.0
    draws = torch.Generator().manual_seed(6)
    bounds = {1: [], 5: [], 50: []}
    with torch.no_grad():
        for _ in range(200):
            eps = torch.randn(8, 50, 3, generator=draws)
            elbo, _ = objective(vae, x, eps[:, 0], "elbo")
            bounds[1].append(-elbo)
            for k in (5, 50):
                bounds[k].append(-objective(vae, x, eps[:, :k], "iwae")[0])
        mu, logvar = vae.encode(x)
        log_px = m.importance_weighted_log_px(
            mu, logvar, m.log_px_given_z_fn(vae, x, "bernoulli"), 2000, draws
        ).float()
    mean = {k: torch.stack(v).mean(dim=0) for k, v in bounds.items()}  # (8,) per image
    spread = {k: torch.stack(v).std(dim=0) / math.sqrt(200) for k, v in bounds.items()}
    for image in range(8):
        low, mid, high = mean[1][image], mean[5][image], mean[50][image]
        margin = 3 * max(spread[k][image] for k in bounds)
        assert low + margin < mid < high - margin, (image, low, mid, high)
        assert high < log_px[image] + margin, (image, high, log_px[image])


def test_the_iwae_gradient_matches_finite_differences():
    """Reparameterised gradient of the IWAE loss (fixed noise, float64) against a central
    difference along a random direction in parameter space."""
    x = binary_batch(4, seed=7).double()
    vae = tiny_vae(3, dtype=torch.float64, latent_dims=2, hidden=(5,))
    eps = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    params = list(vae.parameters())
    loss = objective(vae, x, eps, "iwae")[0].sum()
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction, strict=True)).item()
    h = 1e-6

    def loss_at(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * h * d)
            value = objective(vae, x, eps, "iwae")[0].sum().item()
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * h * d)
        return value

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * h)
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_k_samples_are_one_batched_decoder_pass():
    """The k samples of every image go through the decoder as one (B*k, latent) batch."""
    vae, x = tiny_vae(4), binary_batch(5, seed=10)
    shapes = []
    vae.decoder.register_forward_hook(lambda module, args, out: shapes.append(args[0].shape))
    vae(x, eps=torch.randn(5, 7, 3))
    assert shapes == [torch.Size([35, 3])]


def test_the_burda_schedule_at_every_stage_boundary(tiny_params):
    """Stage i = 0..7 covers epochs (3**i - 1)/2 + 1 .. (3**(i+1) - 1)/2 at lr * 10**(-i/7);
    after epoch 3280 the last rate stays; constant is train.lr throughout."""
    burda = dataclasses.replace(tiny_params.train, lr=1e-3, lr_schedule="burda")
    for stage in range(8):
        first, last = (3**stage - 1) // 2 + 1, (3 ** (stage + 1) - 1) // 2
        expected = 1e-3 * 10 ** (-stage / 7)
        assert learning_rate(burda, first) == pytest.approx(expected, rel=1e-12), stage
        assert learning_rate(burda, last) == pytest.approx(expected, rel=1e-12), stage
    assert last == 3280
    assert learning_rate(burda, 5000) == pytest.approx(1e-3 * 10**-1, rel=1e-12)
    constant = dataclasses.replace(tiny_params.train, lr=3e-4)
    assert {learning_rate(constant, e) for e in (1, 2, 13, 3280)} == {3e-4}


def test_output_bias_data_mean_is_the_logit_of_each_pixel_s_mean():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[:2, 0, 0] = 255  # pixel 0: mean 0.5 -> logit 0
    images[:, 0, 1] = 255  # pixel 1: mean 1 -> clipped to 0.999
    images[0, 5, 5] = 51  # pixel 145: mean 0.2 / 4 = 0.05
    vae = tiny_vae(5)
    set_output_bias(vae, images)
    bias = vae.decoder[-1].bias.detach().double().numpy()
    mean = np.clip(images.double().numpy().reshape(4, 784).mean(axis=0) / 255, 0.001, 0.999)
    np.testing.assert_allclose(bias, np.log(mean / (1 - mean)), rtol=1e-6, atol=1e-6)
    assert bias[0] == pytest.approx(0.0, abs=1e-6)
    assert bias[1] == pytest.approx(math.log(0.999 / 0.001), rel=1e-6)
    assert bias[145] == pytest.approx(math.log(0.05 / 0.95), rel=1e-6)


@pytest.mark.parametrize("output_bias", ["zero", "data_mean"])
def test_train_model_starts_from_the_chosen_output_bias(tiny_params, output_bias):
    """zero: the seeded VAE's own initial bias, as it always was; data_mean: the data's logits.
    Seen after one epoch at a learning rate too small to move them (Adam moves each weight by
    about lr per step)."""
    images = (torch.rand(96, 28, 28, generator=torch.Generator().manual_seed(11)) * 255).byte()
    params = dataclasses.replace(
        tiny_params,
        model=dataclasses.replace(tiny_params.model, output_bias=output_bias),
        train=dataclasses.replace(tiny_params.train, epochs=1, lr=1e-12),
    )
    vae, _ = train_model(params, images, images[:32], device=torch.device("cpu"))
    if output_bias == "zero":
        torch.manual_seed(tiny_params.train.seed)
        expected = m.VAE(**tiny_params.model.architecture()).decoder[-1].bias.double()
    else:
        mean = (images.double().reshape(96, 784).mean(dim=0) / 255).clamp(0.001, 0.999)
        expected = torch.log(mean / (1 - mean))
    torch.testing.assert_close(vae.decoder[-1].bias.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss": {"objective": "iwae", "beta": 0.5}}, "'loss.beta' is 0.5 with 'loss.objective'"),
        (
            {"loss": {"objective": "iwae"}, "train": {"kl_warmup_epochs": 2}},
            "'train.kl_warmup_epochs' is 2 with 'loss.objective' iwae",
        ),
        ({"loss": {"objective": "iwea"}}, "Did you mean 'iwae'"),
        ({"loss": {"samples": 0}}, "'loss.samples' is 0; expected an integer from 1"),
        ({"train": {"lr_schedule": "cosine"}}, "'train.lr_schedule' is 'cosine'"),
        ({"train": {"adam_betas": [0.9, 1.0]}}, "'train.adam_betas' is \\[0.9, 1.0\\]"),
        ({"model": {"output_bias": "mean"}}, "'model.output_bias' is 'mean'"),
    ],
)
def test_bad_objective_settings_are_refused_by_name(changes, message):
    raw = dataclasses.asdict(params_mod.defaults())
    for section, values in changes.items():
        raw[section].update(values)
    with pytest.raises(VaelabError, match=message):
        params_mod.parse(raw)


def test_the_iwae_benchmark_prints_the_time_of_each_k_against_k_1(fake_data_dir, capsys):
    """`python -m vaelab.bench --iwae-samples 3,1` on the fake data: one row per k, each timed in
    its own process, the ratio column each row's time over the k = 1 row's (not the first's)."""
    from vaelab import bench

    bench.main(["--data-dir", str(fake_data_dir), "--iwae-samples", "3,1", "--epochs", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "× time of k = 1" in rows[0]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]
    assert [(c[0], c[1]) for c in cells] == [("3", "20"), ("1", "20")]
    seconds = {c[0]: float(c[2]) for c in cells}
    # Seconds are printed with 2 decimals, and a fake-data epoch takes a few hundredths.
    assert float(cells[0][4]) == pytest.approx(seconds["3"] / seconds["1"], rel=0.3)
    assert float(cells[1][4]) == 1.0 and math.isfinite(float(cells[0][5]))
