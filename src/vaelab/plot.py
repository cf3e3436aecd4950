"""Stage ``plot``: the five figures and the latent explorer page in reports/figures/.

    python -m vaelab.plot --params params.yaml --data-dir data/MNIST --model models/vae.pt \
        --history reports/train_history.csv --out reports/figures

With more than two latent dimensions, the 2-D plots use the first two and hold the rest at 0;
the explorer (``vaelab.explorer``) shows the two whose test means vary most, the rest at 0.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from vaelab import history
from vaelab import params as params_mod
from vaelab.data import evaluation_images, load_split
from vaelab.errors import run_stage
from vaelab.explorer import write_explorer
from vaelab.history import heldout_split
from vaelab.model import VAE, images_to_float, load
from vaelab.params import PlotParams

FIGURES = (
    "loss_curve.png",
    "latent_line.png",
    "latent_scatter.png",
    "latent_grid.png",
    "reconstructions.png",
    "latent_explorer.html",  # interactive, for a browser or the MLflow UI; not a dvc plot
)


def _plane_to_latent(points: torch.Tensor, latent_dims: int) -> torch.Tensor:
    """(N, 2) points of the first two latent coordinates -> (N, latent), the rest at 0."""
    z = torch.zeros(len(points), latent_dims)
    z[:, :2] = points
    return z


@torch.inference_mode()
def _decode_images(model: VAE, z: torch.Tensor) -> np.ndarray:
    """(N, latent) -> (N, 28, 28) images in [0, 1]."""
    return torch.sigmoid(model.decode(z)).squeeze(1).numpy()


def _dims_note(model: VAE) -> str:
    extra = model.latent_dims - 2
    return f" (z1, z2; other {extra} dims at 0)" if extra else ""


def loss_curve(history: list[dict[str, float]], likelihood: str, path: Path, plt) -> None:
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["epoch/train/neg_elbo"] for r in history], "o-", label="train (epoch mean)")
    split = heldout_split(history)  # the validation split, else the test set
    label = {"val": "validation", "test": "test"}[split]
    ax.plot(epochs, [r[f"epoch/{split}/neg_elbo"] for r in history], "s-", label=label)
    if "train.best_epoch" in history[-1]:  # the epoch of the lowest validation -ELBO
        ax.axvline(history[-1]["train.best_epoch"], color="grey", linestyle=":", label="best")
    note = ", without the constant 720.4" if likelihood == "gaussian" else ""
    ax.set(
        xlabel="epoch",
        ylabel=f"negative ELBO (nats / image{note})",
        title=f"Negative ELBO per epoch ({likelihood} likelihood)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latent_line(model: VAE, cfg: PlotParams, path: Path, plt) -> None:
    """The tutorial's strip: decode evenly spaced points from line_start to line_end."""
    start, end = torch.tensor(cfg.line_start), torch.tensor(cfg.line_end)
    t = torch.linspace(0, 1, cfg.line_count).unsqueeze(1)  # (count, 1)
    points = start + t * (end - start)  # (count, 2)
    images = _decode_images(model, _plane_to_latent(points, model.latent_dims))
    cols = min(5, cfg.line_count)  # the tutorial's 2 x 5 grid for 10 points
    rows = math.ceil(cfg.line_count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.0 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, (z1, z2) in zip(axes.flat, images, points.tolist(), strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"({z1:.2f}, {z2:.2f})", fontsize=7)
    fig.suptitle(f"Decoded along a line in latent space{_dims_note(model)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latent_scatter(model: VAE, images, labels, path: Path, plt) -> None:
    with torch.inference_mode():
        mu, _ = model.encode(images_to_float(images))
    mu = mu.numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10")
    for digit in range(10):
        chosen = labels.numpy() == digit
        ax.scatter(
            mu[chosen, 0],
            mu[chosen, 1],
            s=2,
            alpha=0.6,
            color=cmap(digit),
            label=str(digit),
            rasterized=True,
        )
    ax.set(xlabel="z1", ylabel="z2")
    note = f", first 2 of {model.latent_dims} coordinates" if model.latent_dims > 2 else ""
    ax.set_title(f"Test-set posterior means by digit ({len(mu)} images{note})", fontsize=10)
    ax.legend(title="digit", markerscale=5, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latent_grid(model: VAE, size: int, path: Path, plt) -> None:
    """Kingma & Welling (2014), fig. 4: an evenly spaced grid on the unit square mapped through
    the inverse Gaussian CDF, so the grid covers the prior's mass evenly."""
    quantiles = (torch.arange(size) + 0.5) / size  # cell centres, avoids icdf(0) = -inf
    values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")  # row 0 = largest z2 (top)
    points = torch.stack([z1.flatten(), z2.flatten()], dim=1)  # (size*size, 2)
    images = _decode_images(model, _plane_to_latent(points, model.latent_dims))
    mosaic = images.reshape(size, size, 28, 28).transpose(0, 2, 1, 3).reshape(size * 28, -1)
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, extent=(0, size, 0, size))
    ticks = np.arange(size) + 0.5
    labels = [f"{v:.1f}" for v in values.tolist()]
    step = max(1, size // 10)
    ax.set_xticks(ticks[::step], labels[::step])
    ax.set_yticks(ticks[::step], labels[::step])
    ax.set(xlabel="z1", ylabel="z2")
    ax.set_title(
        f"Decoded latent manifold, {size}x{size} Gaussian quantiles{_dims_note(model)}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reconstructions(model: VAE, images, count: int, path: Path, plt) -> None:
    x = images_to_float(images[:count])
    with torch.inference_mode():
        mu, _ = model.encode(x)
        decoded = torch.sigmoid(model.decode(mu))  # decoded from the posterior mean
    fig, axes = plt.subplots(2, count, figsize=(1.2 * count, 2.8), squeeze=False)
    for i in range(count):
        for row, batch in enumerate((x, decoded)):
            axes[row, i].imshow(batch[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    axes[0, 0].set_title("test", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction (decode(mu))", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    params = params_mod.load(args.params)
    model = load(args.model)  # plots are cheap: CPU
    test_images, test_labels = load_split(args.data_dir, train=False)
    test_images = evaluation_images(test_images, params.data.binarize, "test")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = params.plot
    loss_curve(
        history.read(args.history), params.loss.likelihood, args.out / "loss_curve.png", plt
    )
    latent_line(model, cfg, args.out / "latent_line.png", plt)
    latent_scatter(model, test_images, test_labels, args.out / "latent_scatter.png", plt)
    latent_grid(model, cfg.grid_size, args.out / "latent_grid.png", plt)
    count = min(cfg.recon_count, len(test_images))
    reconstructions(model, test_images, count, args.out / "reconstructions.png", plt)
    line = (cfg.line_start, cfg.line_end)
    write_explorer(
        model,
        test_images,
        test_labels,
        params.loss.likelihood,
        line,
        args.out / "latent_explorer.html",
    )
    print(f"plot: {len(FIGURES) - 1} figures and the explorer page -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
