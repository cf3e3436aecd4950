"""The maths: KL, likelihoods, the batch-size-invariant loss, and the model's public API."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from vaelab import model as m


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu = torch.randn(3, 4)
    logvar = torch.randn(3, 4) * 0.5
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(0.0, 1.0)
    z = q.sample((200_000,))  # (S, 3, 4)
    log_ratio = (q.log_prob(z) - prior.log_prob(z)).sum(-1)  # (S, 3)
    mc, stderr = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(len(z))
    closed = m.kl_to_standard_normal(mu, logvar)
    assert closed.shape == (3,)
    assert torch.all((closed - mc).abs() < 4 * stderr + 1e-3), (closed, mc, stderr)
    # ... and torch's own analytic KL agrees to float precision.
    reference = torch.distributions.kl_divergence(q, prior).sum(-1)
    torch.testing.assert_close(closed, reference)


def test_gaussian_recon_is_half_sum_of_squares_per_image():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(5, 1, 28, 28)).astype(np.float32)
    logits = rng.normal(size=(5, 1, 28, 28)).astype(np.float32)
    expected = 0.5 * ((x - 1 / (1 + np.exp(-logits))) ** 2).reshape(5, -1).sum(1)
    got = m.reconstruction_nll(torch.from_numpy(x), torch.from_numpy(logits), "gaussian")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_bernoulli_recon_is_binary_cross_entropy_per_image():
    rng = np.random.default_rng(1)
    x = (rng.uniform(size=(4, 1, 28, 28)) > 0.5).astype(np.float32)
    logits = rng.normal(size=(4, 1, 28, 28)).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(4, -1).sum(1)
    got = m.reconstruction_nll(torch.from_numpy(x), torch.from_numpy(logits), "bernoulli")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def _fixed_terms(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 1, 28, 28, generator=g)
    logits = torch.randn(n, 1, 28, 28, generator=g)
    mu, logvar = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    return x, logits, mu, logvar


def test_loss_is_batch_size_invariant():
    x, logits, mu, logvar = _fixed_terms(64)
    whole = m.training_loss(m.elbo_terms(x, logits, mu, logvar, "gaussian"), beta=1.0)
    for size in (1, 8, 16):
        parts = [
            m.training_loss(
                m.elbo_terms(
                    x[i : i + size],
                    logits[i : i + size],
                    mu[i : i + size],
                    logvar[i : i + size],
                    "gaussian",
                ),
                beta=1.0,
            )
            for i in range(0, 64, size)
        ]
        torch.testing.assert_close(torch.stack(parts).mean(), whole)


def test_tutorial_loss_is_batch_size_times_a_beta_of_one_over_batch_size():
    """The course's loss: 0.5*SSE summed over the batch + KL averaged over it."""
    x, logits, mu, logvar = _fixed_terms(64)
    x_hat = torch.sigmoid(logits)
    kl_mean = (-0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)).mean()
    tutorial = 0.5 * ((x - x_hat) ** 2).sum() + kl_mean
    ours = m.training_loss(m.elbo_terms(x, logits, mu, logvar, "gaussian"), beta=1 / 64)
    torch.testing.assert_close(tutorial, 64 * ours)
    true_elbo = m.training_loss(m.elbo_terms(x, logits, mu, logvar, "gaussian"), beta=1.0)
    assert not torch.isclose(tutorial / 64, true_elbo)


def test_encode_decode_shapes_and_sampling():
    vae = m.VAE(latent_dims=3, hidden=(16,))
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    assert vae.decode(mu).shape == (5, 1, 28, 28)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(vae(x, g1)[0], vae(x, g2)[0])
    assert not torch.equal(vae(x, g1)[0], vae(x, g2.manual_seed(1))[0])


def test_save_load_round_trip(tmp_path):
    vae = m.VAE(latent_dims=4, hidden=(8,))
    m.save(vae, tmp_path / "vae.pt")
    loaded = m.load(tmp_path / "vae.pt")
    assert not loaded.training
    assert (loaded.latent_dims, loaded.hidden) == (4, (8,))
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


@pytest.mark.parametrize(
    ("arch", "hidden", "activation"),
    [("mlp", (200, 200), "tanh"), ("conv", (32, 64), "relu"), ("conv", (8,), "tanh")],
)
def test_architectures_shapes_gradients_and_round_trip(tmp_path, arch, hidden, activation):
    vae = m.VAE(latent_dims=5, hidden=hidden, arch=arch, activation=activation)
    x = torch.rand(3, 1, 28, 28)
    logits, mu, logvar = vae(x, torch.Generator().manual_seed(0))
    assert logits.shape == (3, 1, 28, 28) and mu.shape == logvar.shape == (3, 5)
    m.training_loss(m.elbo_terms(x, logits, mu, logvar, "bernoulli"), 1.0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())
    m.save(vae, tmp_path / "vae.pt")
    loaded = m.load(tmp_path / "vae.pt")
    assert (loaded.arch, loaded.hidden, loaded.activation) == (arch, hidden, activation)
    torch.testing.assert_close(loaded.decode(mu.detach()), vae.decode(mu.detach()))


def test_mlp_layer_sizes_are_the_papers():
    """The IWAE paper's VAE: 784-200-200-50 encoder, 50-200-200-784 decoder, tanh."""
    vae = m.VAE(latent_dims=50, hidden=(200, 200), activation="tanh")

    def linears(module: nn.Module) -> list[tuple[int, int]]:
        return [
            (x.in_features, x.out_features) for x in module.modules() if isinstance(x, nn.Linear)
        ]

    assert linears(vae.encoder) + linears(vae.enc_head) == [(784, 200), (200, 200), (200, 100)]
    assert linears(vae.decoder) == [(50, 200), (200, 200), (200, 784)]
    assert sum(isinstance(x, nn.Tanh) for x in vae.modules()) == 4
    tutorial = m.VAE()  # 784-512-(2+2) / 2-512-784, ReLU
    assert sum(p.numel() for p in tutorial.parameters()) == (
        784 * 512 + 512 + 512 * 4 + 4 + 2 * 512 + 512 + 512 * 784 + 784
    )


def test_a_model_saved_before_hidden_was_a_list_still_loads(tmp_path):
    new = m.VAE(latent_dims=2, hidden=(8,))
    renamed = {"encoder.0": "enc_hidden", "decoder.0": "dec_hidden", "decoder.2": "dec_out"}
    old_state = {}
    for key, value in new.state_dict().items():
        layer, tensor = key.rsplit(".", 1)
        old_state[f"{renamed.get(layer, layer)}.{tensor}"] = value
    torch.save(
        {"config": {"latent_dims": 2, "hidden_dims": 8}, "state_dict": old_state},
        tmp_path / "old.pt",
    )
    loaded = m.load(tmp_path / "old.pt")
    z = torch.randn(4, 2)
    torch.testing.assert_close(loaded.decode(z), new.decode(z))


class _Exploit:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_load_refuses_a_pickle_that_is_not_tensors(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"config": _Exploit(), "state_dict": {}}, path)  # a real checkpoint container
    with pytest.raises(pickle.UnpicklingError):
        m.load(path)
    assert "ran code" not in capsys.readouterr().out


def test_dataset_elbo_means_per_image():
    vae = m.VAE(latent_dims=2, hidden=(16,))
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    result = m.dataset_elbo(vae, images, "gaussian", torch.Generator().manual_seed(0), 7)
    # The same 8 chunks (7 x 7 + 1) with the same noise, summed by hand.
    noise = torch.Generator().manual_seed(0)
    recon, kl = [], []
    with torch.no_grad():
        for start in range(0, 50, 7):
            x = m.images_to_float(images[start : start + 7])
            terms = m.elbo_terms(x, *vae(x, noise), "gaussian")
            recon.append(terms.recon)
            kl.append(terms.kl)
    assert result["recon"] == pytest.approx(torch.cat(recon).mean().item(), rel=1e-5)
    assert result["kl"] == pytest.approx(torch.cat(kl).mean().item(), rel=1e-5)
    assert result["neg_elbo"] == pytest.approx(result["recon"] + result["kl"])
