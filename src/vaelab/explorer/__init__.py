"""The interactive latent explorer: one self-contained HTML page (``latent_explorer.html``).

Point anywhere in the latent plane and the page shows the digit the model's decoder draws there;
click a test point for its image, its reconstruction, its label and its negative ELBO. The page
runs the decoder itself: its layers (Linear, transposed convolution, the activation) are written
out in the page's JavaScript and its weights embedded as float16, so the image under the pointer
is the model's decode of exactly that point, for ``mlp`` and ``conv`` alike. Everything is inline
(no script, style, font or image is fetched): it works from ``file://`` and inside the MLflow UI's
sandboxed artifact iframe.

The page is made of three files beside this one, read with ``importlib.resources`` (package
data, so they ship with the package; vaelab.imports counts them as this module's code, so
editing the JavaScript re-runs ``plot``):
- ``page.html``: the page, a ``str.format`` template with ``{title}``, ``{style}``, ``{data}`` and
  ``{script}``;
- ``explorer.css``: its style;
- ``explorer.js``: its code. Shapes: a layer's input and output are flat Float32Arrays in torch's
  (C, H, W) order; the ``shape`` layer tracks (C, side) for the transposed convolutions.
"""

from __future__ import annotations

import base64
import html
import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vaelab.files import atomic_write_bytes
from vaelab.model import VAE, images_to_float, per_image_terms

# Test images whose pixels the page embeds (the first ones of the test set), so a click shows
# the image. 784 bytes each, 4/3 of that in base64: 1000 images are ~1 MB, beside ~1.1 MB of the
# default decoder's float16 weights, under the 3 MB the page is allowed; all 10,000 would be 10 MB.
CLICKABLE = 1000
# The per-image negative ELBO is one posterior sample, as evaluate's per-image terms are; a fixed
# seed makes the page a function of the model and the data.
ELBO_SEED = 0
MAX_BYTES = 3_000_000  # the promise for the default model (tests/test_explorer.py checks it)


def _asset(name: str) -> str:
    """One of the page's files beside this module (see the module docstring)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def _b64(array: np.ndarray) -> str:
    """Little-endian bytes of ``array`` in base64 (the page reads them with DataView, LE)."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _transposed_convolution(layer: nn.ConvTranspose2d) -> dict:
    """The page's ``convT`` layer spec (without its weights); refuses what the page cannot run."""
    (k, k2), (stride, stride2), (pad, pad2) = layer.kernel_size, layer.stride, layer.padding
    plain = layer.groups == 1 and layer.dilation == (1, 1) and layer.output_padding == (0, 0)
    if k != k2 or stride != stride2 or pad != pad2 or not plain:
        raise ValueError(f"the explorer page cannot run {layer}")
    return {
        "op": "convT",
        "cin": layer.in_channels,
        "cout": layer.out_channels,
        "k": k,
        "stride": stride,
        "pad": pad,
    }


def decoder_layers(model: VAE) -> tuple[list[dict], np.ndarray]:
    """The decoder as the page runs it: a list of layer specs and the float16 weights they index.

    Each Linear and ConvTranspose2d gives ``w``/``b``, offsets (in values) into the weights;
    Linear weights are (out, in) row-major, ConvTranspose2d (in, out, k, k), as torch holds them.
    Unflatten only names the (channels, side, side) layout the next layer reads; the flat order is
    torch's (C, H, W). An unknown layer raises: the page must decode what the model decodes.
    """
    layers: list[dict] = []
    chunks: list[np.ndarray] = []
    size = 0

    def add(tensor: torch.Tensor) -> int:
        nonlocal size
        flat = tensor.detach().cpu().float().numpy().ravel().astype("<f2")
        chunks.append(flat)
        size += len(flat)
        return size - len(flat)

    for layer in model.decoder:
        if isinstance(layer, nn.Linear):
            spec = {"op": "linear", "in": layer.in_features, "out": layer.out_features}
            layers.append(spec | {"w": add(layer.weight), "b": add(layer.bias)})
        elif isinstance(layer, nn.ConvTranspose2d):
            spec = _transposed_convolution(layer)
            layers.append(spec | {"w": add(layer.weight), "b": add(layer.bias)})
        elif isinstance(layer, nn.Unflatten):
            channels, side, side2 = layer.unflattened_size
            layers.append({"op": "shape", "channels": channels, "side": side})
        elif isinstance(layer, nn.ReLU | nn.Tanh):
            layers.append({"op": type(layer).__name__.lower()})
        else:
            raise ValueError(f"the explorer page cannot run {layer}")
    return layers, np.concatenate(chunks)


def plane_dims(mu: torch.Tensor) -> list[int]:
    """The two latent coordinates the plane shows, in index order: z1, z2 with two dimensions,
    else the two whose test-set means vary most."""
    if mu.shape[1] == 2:
        return [0, 1]
    return sorted(torch.topk(mu.var(dim=0), 2).indices.tolist())


def _extent(values: np.ndarray) -> list[float]:
    """[low, high] of ``values`` with 5 % margins on each side."""
    low, high = float(values.min()), float(values.max())
    margin = 0.05 * max(high - low, 1e-3)
    return [low - margin, high + margin]


def _title(latent_dims: int, names: list[str]) -> str:
    """The page's title: which two latent coordinates the plane shows."""
    extra = latent_dims - 2
    if not extra:
        return "Latent explorer: z1 and z2"
    held = f"the other {extra} coordinates at 0"
    return (
        f"Latent explorer: {names[0]} and {names[1]} (largest variance of the test means), {held}"
    )


@torch.inference_mode()
def page_data(
    model: VAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    likelihood: str,
    line: tuple[tuple[float, float], tuple[float, float]],
) -> dict:
    """What the page embeds (its JSON data) for ``model`` and a test set (uint8 ``images``
    (N, 28, 28), ``labels`` (N,)): the decoder's layers and float16 weights; the posterior means
    of all N test images in the plane's two coordinates (float32) and their labels; for the first
    ``CLICKABLE`` test images their pixels (uint8), full posterior means (float32, decoded in the
    page into the reconstruction) and negative ELBO (nats per image, one posterior sample seeded
    with ``ELBO_SEED``; Gaussian likelihood without the constant 720.4, as training logs it); the
    line from ``line[0]`` to ``line[1]`` in the plane's coordinates; the tab10 colours of
    latent_scatter.png."""
    from matplotlib import colormaps, colors

    model = model.eval()
    mu = torch.cat(
        [
            model.encode(images_to_float(images[i : i + 2048]))[0]
            for i in range(0, len(images), 2048)
        ]
    )  # (N, latent)
    dims = plane_dims(mu)
    plane = mu[:, dims].numpy().astype("<f4")  # (N, 2)
    count = min(CLICKABLE, len(images))
    terms = per_image_terms(
        model, images[:count], likelihood, torch.Generator().manual_seed(ELBO_SEED)
    )
    layers, weights = decoder_layers(model)
    line_points = np.array(line, dtype=np.float64)  # (2, 2): start, end
    names = [f"z{d + 1}" for d in dims]
    return {
        "title": _title(model.latent_dims, names),
        "arch": model.arch,
        "latentDims": model.latent_dims,
        "dims": dims,
        "axisNames": names,
        "x": _extent(np.concatenate([plane[:, 0], line_points[:, 0]])),
        "y": _extent(np.concatenate([plane[:, 1], line_points[:, 1]])),
        "line": line_points.tolist(),
        "colors": [colors.to_hex(colormaps["tab10"](digit)) for digit in range(10)],
        "count": len(images),
        "means": _b64(plane),
        "labels": _b64(labels.numpy().astype(np.uint8)),
        "clickable": count,
        "pixels": _b64(images[:count].numpy().astype(np.uint8)),
        "fullMeans": _b64(mu[:count].numpy().astype("<f4")),
        "negElbo": _b64(terms.neg_elbo.numpy().astype("<f4")),
        "likelihood": likelihood,
        "layers": layers,
        "weights": _b64(weights),
    }


def explorer_html(
    model: VAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    likelihood: str,
    line: tuple[tuple[float, float], tuple[float, float]],
) -> str:
    """The explorer page (``page_data``'s data, the page's CSS and JavaScript) as one string."""
    data = page_data(model, images, labels, likelihood, line)
    # "<" escaped: no "</script>" can end the data early, whatever a title holds.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return _asset("page.html").format(
        title=html.escape(data["title"]),
        style=_asset("explorer.css"),
        data=payload,
        script=_asset("explorer.js"),
    )


def write_explorer(
    model: VAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    likelihood: str,
    line: tuple[tuple[float, float], tuple[float, float]],
    path: Path,
) -> int:
    """Write ``explorer_html(...)`` to ``path`` atomically; returns its size in bytes."""
    payload = explorer_html(model, images, labels, likelihood, line).encode("utf-8")
    atomic_write_bytes(path, payload)
    return len(payload)
