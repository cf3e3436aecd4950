"""Stage ``evaluate``: test-set (and train-set) negative ELBO, recon and KL -> metrics.json.

    python -m vaelab.evaluate --params params.yaml --data-dir data/MNIST --model models/vae.pt \
        --history reports/train_history.csv --metrics reports/metrics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vaelab import params as params_mod
from vaelab.data import atomic_write_bytes, load_split
from vaelab.errors import run_stage
from vaelab.model import VAE, dataset_elbo, load
from vaelab.params import Params
from vaelab.train import read_history, resolve_device


def evaluate(
    model: VAE,
    params: Params,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    history: list[dict[str, float]],
) -> dict:
    """Metrics in nats per image under the model's own likelihood (one posterior sample each)."""
    device = next(model.parameters()).device
    noise = torch.Generator(device=device).manual_seed(params.evaluate.seed)
    likelihood = params.loss.likelihood
    last = history[-1]
    return {
        "test": dataset_elbo(model, test_images.to(device), likelihood, noise),
        # The final model on the whole training set, for the generalisation gap ...
        "train": dataset_elbo(model, train_images.to(device), likelihood, noise),
        # ... and the running average over the last training epoch, as the history logs it.
        "train_last_epoch": {k: last[f"train/{k}"] for k in ("neg_elbo", "recon", "kl")},
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
    device = resolve_device(params.train.device)
    model = load(args.model, map_location=device)
    train_images, _ = load_split(args.data_dir, train=True)
    test_images, _ = load_split(args.data_dir, train=False)
    metrics = evaluate(model, params, train_images, test_images, read_history(args.history))
    atomic_write_bytes(args.metrics, (json.dumps(metrics, indent=2) + "\n").encode())
    print(
        f"evaluate: test -ELBO {metrics['test']['neg_elbo']:.3f} nats/image "
        f"(recon {metrics['test']['recon']:.3f}, KL {metrics['test']['kl']:.3f}) -> {args.metrics}"
    )


if __name__ == "__main__":
    run_stage(main)
