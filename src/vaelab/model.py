"""The VAE and its loss, in pure torch (no logging; ``save``/``load`` are its only I/O).

Architecture: by default the course tutorial's MLP (after A. Van de Kleut's post),
encoder 784-512-(mu, logvar), decoder latent-512-784, ReLU hidden layers; deeper MLPs and a small
conv net are options (``VAE``). The decoder returns logits; images are ``sigmoid(logits)``.
The loss is the per-image negative ELBO of Kingma & Welling (2014), eq. 3 / eq. 10, with the
closed-form Gaussian KL of their Appendix B, or with k posterior samples per image the ELBO's
k-sample average or the IWAE bound of Burda, Grosse & Salakhutdinov (2016), eq. 8
(``per_image_objective``).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.files import atomic_write_bytes

IMAGE_SHAPE = (1, 28, 28)
PIXELS = 784
# -log N(x; mu, 1) = 0.5 * (x - mu)^2 + 0.5 * log(2 pi) per pixel; the Gaussian recon term below
# omits the constant, as the tutorial does: PIXELS * GAUSSIAN_CONST_PER_PIXEL ~= 720.4 nats/image.
GAUSSIAN_CONST_PER_PIXEL = 0.5 * math.log(2 * math.pi)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _mlp(widths: list[int], activation: str, last_activation: bool) -> nn.Sequential:
    """Linear layers widths[0] -> widths[1] -> ...; an activation after each but maybe the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Gaussian encoder q(z|x) = N(mu, diag(exp(logvar))) and a decoder returning logits.

    arch "mlp": encoder 784-hidden[0]-...-hidden[-1]-(mu, logvar), decoder mirrored
        latent-hidden[-1]-...-hidden[0]-784. hidden=(512,) with relu is the tutorial's model;
        hidden=(200, 200) with tanh and latent 50 is the IWAE paper's one-stochastic-layer VAE.
    arch "conv": hidden gives the channels of 1 or 2 stride-2 convolutions (kernel 4, padding 1:
        28 -> 14 -> 7), then a Linear to (mu, logvar); the decoder mirrors it with transposed
        convolutions.
    """

    def __init__(
        self,
        latent_dims: int = 2,
        hidden: tuple[int, ...] = (512,),
        arch: str = "mlp",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.latent_dims = latent_dims
        self.hidden = tuple(hidden)
        self.arch = arch
        self.activation = activation
        act = ACTIVATIONS[activation]
        # Layers are created encoder, head, decoder: the tutorial's order, so that a seed gives
        # the tutorial model the same initial weights as before these options existed.
        if arch == "mlp":
            self.encoder = _mlp([PIXELS, *hidden], activation, last_activation=True)
            # mu and logvar from one Linear: the tutorial's two parallel heads, fused.
            self.enc_head = nn.Linear(hidden[-1], 2 * latent_dims)
            # The last decoder layer maps to 784 logits, no activation.
            self.decoder = _mlp([latent_dims, *reversed(hidden), PIXELS], activation, False)
        elif arch == "conv":
            if not 1 <= len(hidden) <= 2:
                raise ValueError(f"conv takes 1 or 2 channel counts, got {list(hidden)}")
            side = 28 // 2 ** len(hidden)  # 14 or 7
            channels = [1, *hidden]
            enc: list[nn.Module] = []
            for n_in, n_out in itertools.pairwise(channels):  # (B, c, s, s) -> (B, c', s/2, s/2)
                enc += [nn.Conv2d(n_in, n_out, kernel_size=4, stride=2, padding=1), act()]
            self.encoder = nn.Sequential(*enc, nn.Flatten())  # -> (B, hidden[-1] * side^2)
            features = hidden[-1] * side * side
            self.enc_head = nn.Linear(features, 2 * latent_dims)
            dec: list[nn.Module] = [
                nn.Linear(latent_dims, features),
                act(),
                nn.Unflatten(1, (hidden[-1], side, side)),
            ]
            backwards = channels[::-1]  # [c_last, ..., c_first, 1]
            for i, (n_in, n_out) in enumerate(itertools.pairwise(backwards)):
                dec.append(nn.ConvTranspose2d(n_in, n_out, kernel_size=4, stride=2, padding=1))
                if i < len(backwards) - 2:
                    dec.append(act())
            self.decoder = nn.Sequential(*dec)  # -> (B, 1, 28, 28) logits
        else:
            raise ValueError(f"unknown arch {arch!r}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 28, 28) in [0, 1] -> mu, logvar, each (B, latent)."""
        if self.arch == "mlp":
            x = x.flatten(start_dim=1)  # (B, 784)
        h = self.encoder(x)  # (B, features)
        mu, logvar = self.enc_head(h).chunk(2, dim=1)  # (B, 2*latent) -> 2 x (B, latent)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) -> logits (B, 1, 28, 28); ``torch.sigmoid`` gives the image."""
        return self.decoder(z).view(-1, *IMAGE_SHAPE)

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior samples through the decoder: returns (logits, mu, logvar).

        One sample per image: the noise is ``eps`` (B, latent) when given (distributed training
        draws it for the whole global batch), else drawn from ``generator`` or the global RNG;
        logits (B, 1, 28, 28). k samples per image: ``eps`` (B, k, latent), all B*k latent points
        decoded in one batched pass; logits (B*k, 1, 28, 28), image b's samples at rows
        b*k .. b*k + k - 1.
        """
        mu, logvar = self.encode(x)
        if eps is not None and eps.dim() == 3:
            z = posterior_samples(mu, logvar, eps)  # (B, k, latent)
            return self.decode(z.flatten(end_dim=1)), mu, logvar
        # Reparameterisation (Kingma & Welling 2014, sec. 2.4): z = mu + sigma * eps, eps ~ N(0,I)
        if eps is None and generator is None:
            eps = torch.randn_like(mu)  # the global RNG; also traceable by torch.compile
        elif eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mu, logvar

    def config(self) -> dict[str, int | str | list[int]]:
        """The constructor's arguments, as plain types (saved beside the weights)."""
        return {
            "latent_dims": self.latent_dims,
            "hidden": list(self.hidden),
            "arch": self.arch,
            "activation": self.activation,
        }


@dataclass
class ElboTerms:
    """Per-image terms in nats, each of shape (B,): neg_elbo = recon + kl."""

    recon: torch.Tensor
    kl: torch.Tensor

    @property
    def neg_elbo(self) -> torch.Tensor:
        return self.recon + self.kl


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per image, (B, latent) -> (B,).

    Kingma & Welling (2014), Appendix B: -0.5 * sum(1 + logvar - mu^2 - exp(logvar)).
    """
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_nll(x: torch.Tensor, logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x|z) per image in nats, (..., 1, 28, 28) -> (...), e.g. (B, 1, 28, 28) -> (B,).

    gaussian: unit-variance Gaussian around sigmoid(logits), 0.5 * SSE (the tutorial's loss; the
    constant 784 * 0.5 * log(2 pi) is left out). bernoulli: binary cross-entropy on the logits.
    """
    if likelihood == "gaussian":
        return 0.5 * (x - torch.sigmoid(logits)).pow(2).flatten(start_dim=-3).sum(dim=-1)
    if likelihood == "bernoulli":
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return bce.flatten(start_dim=-3).sum(dim=-1)
    raise ValueError(f"unknown likelihood {likelihood!r}")


def elbo_terms(
    x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, likelihood: str
) -> ElboTerms:
    return ElboTerms(reconstruction_nll(x, logits, likelihood), kl_to_standard_normal(mu, logvar))


def training_loss(
    terms: ElboTerms, beta: float | torch.Tensor, divisor: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of recon + beta * KL: nats per image, independent of the batch size.

    beta = 1 is the negative ELBO. (The tutorial sums the recon over the batch but averages the KL,
    which is this loss times B with beta = 1/B.) With ``divisor`` the sum over the batch is divided
    by it instead of by the batch size (distributed training: see
    ``vaelab.optim.make_train_step``).
    """
    total = terms.recon + beta * terms.kl
    return total.mean() if divisor is None else total.sum() / divisor


def posterior_samples(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """k reparameterised samples per image: mu, logvar (B, latent), eps (B, k, latent) ->
    z = mu + sigma * eps, (B, k, latent)."""
    return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + z.pow(2)).sum(-1)


def per_image_objective(
    x: torch.Tensor,
    logits: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    *,
    likelihood: str,
    objective: str,
    kl_weight: float | torch.Tensor,
) -> tuple[torch.Tensor, ElboTerms]:
    """The training loss of each image, (B,), in nats, and its ELBO terms (recon averaged over
    the k samples), from ``VAE.forward``'s outputs for noise ``eps``.

    eps (B, latent), one sample: recon + kl_weight * KL for both objectives (with k = 1 the IWAE
    bound is the ELBO, Burda et al. 2016, sec. 3; the closed-form KL is its lower-variance
    estimator, the one the ELBO training always used).
    eps (B, k, latent), logits (B*k, 1, 28, 28):
      elbo: the mean of the k single-sample estimates, mean_j recon_j + kl_weight * KL (Burda et
        al.'s "VAE" with k samples: the same bound, a lower-variance gradient);
      iwae: -log (1/k) sum_j w_j, log w_j = log p(x|z_j) + log p(z_j) - log q(z_j|x) (their
        eq. 8), computed with logsumexp. The Gaussian likelihood leaves out the same constant
        (784 * 0.5 * log 2 pi) as its recon term, so the values compare with neg_elbo.
    """
    if eps.dim() == 2:
        terms = elbo_terms(x, logits, mu, logvar, likelihood)
        return terms.recon + kl_weight * terms.kl, terms
    batch, k = eps.shape[:2]
    targets = x.unsqueeze(1).expand(batch, k, *x.shape[1:]).flatten(end_dim=1)  # (B*k, ...)
    recon = reconstruction_nll(targets, logits, likelihood).view(batch, k)  # (B, k)
    terms = ElboTerms(recon.mean(dim=1), kl_to_standard_normal(mu, logvar))
    if objective == "elbo":
        return terms.recon + kl_weight * terms.kl, terms
    if objective != "iwae":
        raise ValueError(f"unknown objective {objective!r}")
    z = posterior_samples(mu, logvar, eps)  # the decoded points, (B, k, latent)
    log_q = log_normal(z, mu.unsqueeze(1), logvar.unsqueeze(1))  # (B, k)
    log_w = -recon + log_standard_normal(z) - log_q  # (B, k)
    return -(torch.logsumexp(log_w, dim=1) - math.log(k)), terms


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1], as torchvision's ToTensor scales."""
    return images.unsqueeze(1).float().div_(255)


@torch.inference_mode()
def per_image_terms(
    model: VAE,
    images: torch.Tensor,
    likelihood: str,
    generator: torch.Generator | None = None,
    batch_size: int = 2048,
) -> ElboTerms:
    """Recon and KL of every image of ``images`` (uint8, (N, 28, 28)), each (N,), in nats.

    One posterior sample per image; ``batch_size`` only bounds memory.
    """
    was_training = model.training
    model.eval()
    recon, kl = [], []
    for start in range(0, len(images), batch_size):
        x = images_to_float(images[start : start + batch_size])
        terms = elbo_terms(x, *model(x, generator), likelihood)
        recon.append(terms.recon)
        kl.append(terms.kl)
    model.train(was_training)
    return ElboTerms(torch.cat(recon), torch.cat(kl))


def dataset_elbo(
    model: VAE,
    images: torch.Tensor,
    likelihood: str,
    generator: torch.Generator | None = None,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Mean negative ELBO, recon and KL over ``images`` in nats per image (one host sync)."""
    return elbo_means(per_image_terms(model, images, likelihood, generator, batch_size))


def elbo_means(terms: ElboTerms) -> dict[str, float]:
    """Means of per-image terms, in float64: {"neg_elbo", "recon", "kl"} in nats per image."""
    recon, kl = torch.stack([terms.recon.double().mean(), terms.kl.double().mean()]).tolist()
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def importance_weighted_log_px(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    log_px_given_z: Callable[[torch.Tensor], torch.Tensor],
    samples: int,
    generator: torch.Generator | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per image, (B,), with q(z|x) = N(mu, exp(logvar))
    as the proposal (Burda, Grosse & Salakhutdinov 2016, eq. 8):

        log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K.

    ``log_px_given_z`` maps z (S, B, latent) to log p(x|z) (S, B). Samples are drawn ``chunk`` at
    a time and combined with a running logsumexp, so memory does not grow with K.
    """
    running = torch.full(mu.shape[:1], -math.inf, device=mu.device, dtype=torch.float64)
    std = (0.5 * logvar).exp()
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        eps = torch.randn(
            (count, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype
        )
        z = mu + std * eps  # (S, B, latent)
        log_w = log_px_given_z(z) + log_standard_normal(z) - log_normal(z, mu, logvar)  # (S, B)
        running = torch.logaddexp(running, torch.logsumexp(log_w.double(), dim=0))
    return running - math.log(samples)


def log_px_given_z_fn(
    model: VAE, x: torch.Tensor, likelihood: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """z (S, B, latent) -> log p(x|z) (S, B) in nats, the Gaussian with its constant included."""
    constant = PIXELS * GAUSSIAN_CONST_PER_PIXEL if likelihood == "gaussian" else 0.0

    def log_px_given_z(z: torch.Tensor) -> torch.Tensor:
        samples, batch = z.shape[:2]
        logits = model.decode(z.reshape(samples * batch, -1))  # (S*B, 1, 28, 28)
        # The images as a view (S, B, 1, 28, 28), not S copies: at K = 1000 copying them cost
        # about as much time as the likelihood itself.
        targets = x.expand(samples, *x.shape)
        nll = reconstruction_nll(targets, logits.view(samples, *x.shape), likelihood)
        return -(nll + constant)  # (S, B)

    return log_px_given_z


def save(model: VAE, path: Path) -> None:
    """Write {config, state_dict} atomically and fsynced, like every output; readable with
    ``torch.load(weights_only=True)``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"config": model.config(), "state_dict": state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# Layer names of the one-hidden-layer MLP as it was saved before ``hidden`` became a list.
_OLD_NAMES = {"enc_hidden": "encoder.0", "dec_hidden": "decoder.0", "dec_out": "decoder.2"}


def load(path: str | Path, map_location: str | torch.device = "cpu") -> VAE:
    """Rebuild a saved VAE in eval mode. Only tensors and plain containers are unpickled."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    config, state = dict(checkpoint["config"]), checkpoint["state_dict"]
    if "hidden_dims" in config:  # saved before model.hidden became a list (one-layer MLP)
        config["hidden"] = [config.pop("hidden_dims")]
        state = {
            _OLD_NAMES.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
            for k, v in state.items()
        }
    model = VAE(**config).to(map_location)
    model.load_state_dict(state)
    return model.eval()
