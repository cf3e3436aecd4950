"""Stage ``evaluate``: what the model is worth on held-out data -> metrics.json.

- negative ELBO, recon and KL on the test and training sets (the loss's own convention);
- importance-weighted NLL of the test set (Burda et al. 2016) with its standard error, beside the
  ELBO of the same samples' convention, so the gap is visible;
- active units, and a linear probe (logistic regression) from latent means to the digit;
- the test negative ELBO per digit.

    python -m vaelab.evaluate --params params.yaml --data-dir data/MNIST --model models/vae.pt \
        --history reports/train_history.csv --metrics reports/metrics.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from vaelab import device as device_mod
from vaelab import history as history_mod
from vaelab import params as params_mod
from vaelab.data import evaluation_images, load_split
from vaelab.errors import run_stage
from vaelab.files import atomic_write_bytes
from vaelab.model import (
    GAUSSIAN_CONST_PER_PIXEL,
    PIXELS,
    VAE,
    ElboTerms,
    dataset_elbo,
    elbo_means,
    images_to_float,
    importance_weighted_log_px,
    load,
    log_px_given_z_fn,
    per_image_terms,
)
from vaelab.params import Params

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016), sec. 5.2: Cov_x(E_q[z_d]) > 0.01


@torch.inference_mode()
def importance_weighted_nll(
    model: VAE,
    images: torch.Tensor,
    *,
    likelihood: str,
    samples: int,
    generator: torch.Generator,
    terms: ElboTerms | None = None,
    batch_size: int = 100,
) -> dict[str, float]:
    """-log p(x) by importance sampling with K = ``samples``, in nats per image, with its standard
    error over images; plus the negative ELBO in the same convention (the Gaussian's constant
    784/2 log 2 pi included) and the gap between them. The ELBO comes from ``terms``, the images'
    per-image terms when the caller has them (else drawn here from ``generator``)."""
    model.eval()
    constant = PIXELS * GAUSSIAN_CONST_PER_PIXEL if likelihood == "gaussian" else 0.0
    if terms is None:
        terms = per_image_terms(model, images, likelihood, generator)
    log_px = []
    # On a terminal only, as training's bar: about a minute at K = 1000, far more at K = 5000.
    bar = tqdm(
        total=len(images), desc=f"IW-NLL, K={samples}", unit="image", leave=False, disable=None
    )
    for start in range(0, len(images), batch_size):
        x = images_to_float(images[start : start + batch_size])
        mu, logvar = model.encode(x)
        log_px.append(
            importance_weighted_log_px(
                mu, logvar, log_px_given_z_fn(model, x, likelihood), samples, generator
            )
        )
        bar.update(len(x))
    bar.close()
    nll = -torch.cat(log_px)
    neg_elbo = terms.recon.double() + terms.kl.double() + constant  # as elbo_means sums
    return {
        "nll": nll.mean().item(),
        "nll_stderr": (nll.std() / len(nll) ** 0.5).item(),
        "neg_elbo": neg_elbo.mean().item(),
        "gap": (neg_elbo.mean() - nll.mean()).item(),
        "samples": samples,
    }


@torch.inference_mode()
def latent_means(model: VAE, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """E_q[z|x] of every image, (N, latent)."""
    model.eval()
    return torch.cat(
        [
            model.encode(images_to_float(images[i : i + batch_size]))[0]
            for i in range(0, len(images), batch_size)
        ]
    )


def active_units(means: torch.Tensor) -> int:
    """Latent dimensions whose posterior mean varies across images: Var_x(mu_d) > 0.01."""
    return int((means.double().var(dim=0, unbiased=False) > ACTIVE_UNIT_THRESHOLD).sum())


def probe_accuracy(
    train_means: torch.Tensor,
    train_labels: torch.Tensor,
    test_means: torch.Tensor,
    test_labels: torch.Tensor,
) -> float:
    """Test accuracy of a multinomial logistic regression from latent means to the digit, fit
    on the training set (L-BFGS, full batch, standardised features, small L2)."""
    # Arithmetic outside inference mode turns the (inference-mode) means into normal tensors,
    # which autograd accepts.
    centre, scale = train_means.mean(0), train_means.std(0).clamp_min(1e-6)
    train_x = ((train_means - centre) / scale).double().cpu()
    test_x = ((test_means - centre) / scale).double().cpu()
    train_y, test_y = train_labels.cpu(), test_labels.cpu()
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = train_x @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, train_y) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (test_x @ weight + bias).argmax(1)
    return (predicted == test_y).double().mean().item()


def per_class_neg_elbo(terms: ElboTerms, labels: torch.Tensor) -> dict[str, float]:
    """Mean negative ELBO of each label's images, from the set's per-image ``terms``: weighted
    by the label counts, the values average to the set's own mean."""
    neg_elbo = (terms.recon.double() + terms.kl.double()).cpu()  # as elbo_means sums
    labels = labels.cpu()
    return {str(int(c)): neg_elbo[labels == c].mean().item() for c in labels.unique().sort()[0]}


def metric_generator(seed: int, metric: str, device: torch.device) -> torch.Generator:
    """The generator of one metric's posterior samples, seeded from ``evaluate.seed`` and the
    metric's name: adding, removing or reordering a metric never changes another's draws."""
    digest = hashlib.sha256(f"{seed}/{metric}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def evaluate(
    model: VAE,
    params: Params,
    *,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    history: list[dict[str, float]],
    train_labels: torch.Tensor,
    test_labels: torch.Tensor,
) -> dict:
    """Metrics in nats per image under the model's own likelihood (see the module docstring).

    The test set's per-image ELBO terms are drawn once and serve the test ELBO, the per-digit
    values and the IW estimate's ELBO, so those agree exactly."""
    device = next(model.parameters()).device
    likelihood, seed = params.loss.likelihood, params.evaluate.seed
    last = history[-1]
    train_images, test_images = train_images.to(device), test_images.to(device)
    test_terms = per_image_terms(
        model, test_images, likelihood, metric_generator(seed, "test", device)
    )
    test_means = latent_means(model, test_images)
    return {
        "test": elbo_means(test_terms),
        # The final model on the whole training set, for the generalisation gap ...
        "train": dataset_elbo(
            model, train_images, likelihood, metric_generator(seed, "train", device)
        ),
        # ... and the running average over the last training epoch, as the history logs it.
        "train_last_epoch": {k: last[f"epoch/train/{k}"] for k in ("neg_elbo", "recon", "kl")},
        "test_iw": importance_weighted_nll(
            model,
            test_images,
            likelihood=likelihood,
            samples=params.evaluate.iw_samples,
            generator=metric_generator(seed, "test_iw", device),
            terms=test_terms,
        ),
        "latent": {
            "dims": model.latent_dims,
            "active_units": active_units(test_means),
            "probe_accuracy": probe_accuracy(
                latent_means(model, train_images), train_labels, test_means, test_labels
            ),
        },
        "test_per_digit": per_class_neg_elbo(test_terms, test_labels),
        "epochs": int(last["epoch"]),
        "images": {"train": len(train_images), "test": len(test_images)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)

    params = params_mod.load(args.params)
    device = device_mod.resolve(params.train.device)
    model = load(args.model, map_location=device)
    train_images, train_labels = load_split(args.data_dir, train=True)
    test_images, test_labels = load_split(args.data_dir, train=False)
    train_images = evaluation_images(train_images, params.data.binarize, "train")
    test_images = evaluation_images(test_images, params.data.binarize, "test")
    history = history_mod.read(args.history)
    metrics = evaluate(
        model,
        params,
        train_images=train_images,
        test_images=test_images,
        history=history,
        train_labels=train_labels,
        test_labels=test_labels,
    )
    atomic_write_bytes(args.metrics, (json.dumps(metrics, indent=2) + "\n").encode())
    iw, latent = metrics["test_iw"], metrics["latent"]
    print(
        f"evaluate: test -ELBO {metrics['test']['neg_elbo']:.3f} nats/image "
        f"(recon {metrics['test']['recon']:.3f}, KL {metrics['test']['kl']:.3f}); "
        f"IW-NLL (K={iw['samples']}) {iw['nll']:.2f} +- {iw['nll_stderr']:.2f} vs -ELBO "
        f"{iw['neg_elbo']:.2f}; {latent['active_units']}/{latent['dims']} active units; "
        f"probe accuracy {latent['probe_accuracy']:.3f} -> {args.metrics}"
    )


if __name__ == "__main__":
    run_stage(main)
