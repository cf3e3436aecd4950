"""Stage ``evaluate``: what the model is worth on held-out data -> metrics.json.

On each held-out split, the validation split (``data.validation`` > 0; its sections ``val*``,
the numbers to choose with) and the test set (``test*`` and ``latent``, reported and never chosen
on: docs/comparing.md, "How vaelab chooses"):
- negative ELBO, recon and KL (the loss's own convention), and per digit;
- importance-weighted NLL (Burda et al. 2016) with its standard error, beside the ELBO of the
  same samples' convention, so the gap is visible;
- active units, and the accuracy of a linear probe (logistic regression, fit on the training
  images) from latent means to the digit.
And the negative ELBO of the training images (the validation ones are not among them).

    python -m vaelab.evaluate --params params.yaml --data-dir data/MNIST --model models/vae.pt \
        --history reports/train_history.csv --metrics reports/metrics.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vaelab import device as device_mod
from vaelab import history as history_mod
from vaelab import params as params_mod
from vaelab.data import evaluation_images, hold_out, load_split
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
    label: str = "test",
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
        total=len(images),
        desc=f"{label} IW-NLL, K={samples}",
        unit="image",
        leave=False,
        disable=None,
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


def fit_probe(
    train_means: torch.Tensor, train_labels: torch.Tensor, classes: int = 10
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression from latent means to the digit, fit on the training
    set (L-BFGS, full batch, standardised features, small L2); returns means -> predicted labels.
    """
    # Arithmetic outside inference mode turns the (inference-mode) means into normal tensors,
    # which autograd accepts.
    centre, scale = train_means.mean(0), train_means.std(0).clamp_min(1e-6)
    train_x = ((train_means - centre) / scale).double().cpu()
    train_y = train_labels.cpu()
    classes = max(classes, int(train_y.max()) + 1)
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

    def predict(means: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ((((means - centre) / scale).double().cpu()) @ weight + bias).argmax(1)

    return predict


def probe_accuracy(
    train_means: torch.Tensor,
    train_labels: torch.Tensor,
    test_means: torch.Tensor,
    test_labels: torch.Tensor,
) -> float:
    """Accuracy on ``test_*`` of the probe ``fit_probe`` fits on ``train_*``."""
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = fit_probe(train_means, train_labels, classes)(test_means)
    return (predicted == test_labels.cpu()).double().mean().item()


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


@dataclass(frozen=True)
class Split:
    """A labelled set of images: uint8 (N, 28, 28) and labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


def heldout_metrics(
    model: VAE,
    params: Params,
    split: Split,
    name: str,
    probe: Callable[[torch.Tensor], torch.Tensor],
) -> dict:
    """One held-out split's sections of metrics.json, ``name`` = "test" or "val": ``<name>``
    (ELBO), ``<name>_iw`` (IW-NLL), ``<name>_latent`` (active units, probe accuracy) and
    ``<name>_per_digit``. The split's per-image ELBO terms are drawn once and serve its ELBO, the
    per-digit values and the IW estimate's ELBO, so those agree exactly."""
    device = next(model.parameters()).device
    likelihood, seed = params.loss.likelihood, params.evaluate.seed
    images = split.images.to(device)
    terms = per_image_terms(model, images, likelihood, metric_generator(seed, name, device))
    means = latent_means(model, images)
    return {
        name: elbo_means(terms),
        f"{name}_iw": importance_weighted_nll(
            model,
            images,
            likelihood=likelihood,
            samples=params.evaluate.iw_samples,
            generator=metric_generator(seed, f"{name}_iw", device),
            terms=terms,
            label=name,
        ),
        f"{name}_latent": {
            "dims": model.latent_dims,
            "active_units": active_units(means),
            "probe_accuracy": (probe(means) == split.labels.cpu()).double().mean().item(),
        },
        f"{name}_per_digit": per_class_neg_elbo(terms, split.labels),
    }


def evaluate(
    model: VAE,
    params: Params,
    *,
    train: Split,
    test: Split,
    history: list[dict[str, float]],
    validation: Split | None = None,
) -> dict:
    """Metrics in nats per image under the model's own likelihood (see the module docstring):
    every held-out metric on the test set and, with a validation split, on it too (``val*``
    sections, the ones to choose with; the test set's are reported, not chosen on).

    ``train``: the images trained on (the validation images are not among them)."""
    device = next(model.parameters()).device
    likelihood, seed = params.loss.likelihood, params.evaluate.seed
    last = history[-1]
    train_images = train.images.to(device)
    probe = fit_probe(latent_means(model, train_images), train.labels)
    metrics = {
        # The final model on the whole training set, for the generalisation gap ...
        "train": dataset_elbo(
            model, train_images, likelihood, metric_generator(seed, "train", device)
        ),
        # ... and the running average over the last training epoch, as the history logs it.
        "train_last_epoch": {k: last[f"epoch/train/{k}"] for k in ("neg_elbo", "recon", "kl")},
    }
    if validation is not None:
        metrics |= heldout_metrics(model, params, validation, "val", probe)
    metrics |= heldout_metrics(model, params, test, "test", probe)
    # The test set's latent section keeps its first name, "latent" (eval/latent/*).
    metrics["latent"] = metrics.pop("test_latent")
    if validation is not None:
        del metrics["val_latent"]["dims"]  # the model's, said once under "latent"
    metrics["epochs"] = int(last["epoch"])
    # Which epoch's weights were evaluated: the best one with train.keep: best.
    metrics["model_epoch"] = model_epoch(history, params.train.keep)
    metrics["images"] = {"train": len(train.images), "test": len(test.images)}
    if validation is not None:
        metrics["images"]["val"] = len(validation.images)
    return metrics


def model_epoch(history: list[dict[str, float]], keep: str) -> int:
    """The epoch whose weights the model holds: the history's best epoch with ``keep`` best,
    else its last."""
    last = history[-1]
    return int(last["train.best_epoch"]) if keep == "best" else int(last["epoch"])


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
    binarize = params.data.binarize
    train_file = load_split(args.data_dir, train=True)
    train, held_out = hold_out(*train_file, params.data.validation, args.data_dir)
    test = load_split(args.data_dir, train=False)
    validation = None
    if params.data.validation:
        validation = Split(evaluation_images(held_out[0], binarize, "val"), held_out[1])
    metrics = evaluate(
        model,
        params,
        train=Split(evaluation_images(train[0], binarize, "train"), train[1]),
        test=Split(evaluation_images(test[0], binarize, "test"), test[1]),
        history=history_mod.read(args.history),
        validation=validation,
    )
    atomic_write_bytes(args.metrics, (json.dumps(metrics, indent=2) + "\n").encode())
    for name in ("val", "test") if validation is not None else ("test",):
        iw = metrics[f"{name}_iw"]
        latent = metrics["latent" if name == "test" else "val_latent"]
        print(
            f"evaluate: {name} -ELBO {metrics[name]['neg_elbo']:.3f} nats/image "
            f"(recon {metrics[name]['recon']:.3f}, KL {metrics[name]['kl']:.3f}); "
            f"IW-NLL (K={iw['samples']}) {iw['nll']:.2f} +- {iw['nll_stderr']:.2f} vs -ELBO "
            f"{iw['neg_elbo']:.2f}; {latent['active_units']}/{model.latent_dims} active units; "
            f"probe accuracy {latent['probe_accuracy']:.3f}"
        )
    print(f"evaluate: -> {args.metrics}")


if __name__ == "__main__":
    run_stage(main)
