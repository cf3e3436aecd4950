"""The interactive latent explorer: one self-contained HTML page (``latent_explorer.html``).

Point anywhere in the latent plane and the page shows the digit the model's decoder draws there;
click a test point for its image, its reconstruction, its label and its negative ELBO. The page
runs the decoder itself: its layers (Linear, transposed convolution, the activation) are written
out in the page's JavaScript and its weights embedded as float16, so the image under the pointer
is the model's decode of exactly that point, for ``mlp`` and ``conv`` alike. Everything is inline
(no script, style, font or image is fetched): it works from ``file://`` and inside the MLflow UI's
sandboxed artifact iframe.
"""

from __future__ import annotations

import base64
import html
import json
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


def _b64(array: np.ndarray) -> str:
    """Little-endian bytes of ``array`` in base64 (the page reads them with DataView, LE)."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


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
            layers.append(
                {
                    "op": "linear",
                    "in": layer.in_features,
                    "out": layer.out_features,
                    "w": add(layer.weight),
                    "b": add(layer.bias),
                }
            )
        elif isinstance(layer, nn.ConvTranspose2d):
            (k, k2), (stride, stride2), (pad, pad2) = (
                layer.kernel_size,
                layer.stride,
                layer.padding,
            )
            plain = (
                layer.groups == 1 and layer.dilation == (1, 1) and layer.output_padding == (0, 0)
            )
            if k != k2 or stride != stride2 or pad != pad2 or not plain:
                raise ValueError(f"the explorer page cannot run {layer}")
            layers.append(
                {
                    "op": "convT",
                    "cin": layer.in_channels,
                    "cout": layer.out_channels,
                    "k": k,
                    "stride": stride,
                    "pad": pad,
                    "w": add(layer.weight),
                    "b": add(layer.bias),
                }
            )
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


@torch.inference_mode()
def explorer_html(
    model: VAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    likelihood: str,
    line: tuple[tuple[float, float], tuple[float, float]],
) -> str:
    """The explorer page for ``model`` and a test set (uint8 ``images`` (N, 28, 28), ``labels``
    (N,)), as one HTML string. It embeds: the decoder's layers and float16 weights; the posterior
    means of all N test images in the plane's two coordinates (float32) and their labels; for the
    first ``CLICKABLE`` test images their pixels (uint8), full posterior means (float32, decoded
    in the page into the reconstruction) and negative ELBO (nats per image, one posterior sample
    seeded with ``ELBO_SEED``; Gaussian likelihood without the constant 720.4, as training logs
    it); the line from ``line[0]`` to ``line[1]`` in the plane's coordinates; the tab10 colours of
    latent_scatter.png; the page's CSS and JavaScript.
    """
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
    extra = model.latent_dims - 2
    names = [f"z{d + 1}" for d in dims]
    if extra:
        held = f"the other {extra} coordinates at 0"
        title = f"{names[0]} and {names[1]} (largest variance of the test means), {held}"
    else:
        title = "z1 and z2"
    data = {
        "title": f"Latent explorer: {title}",
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
    # "<" escaped: no "</script>" can end the data early, whatever a title holds.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return _PAGE.format(
        title=html.escape(data["title"]), style=_STYLE, data=payload, script=_SCRIPT
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


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1 id="title">{title}</h1>
<p class="note">Move the pointer over the plane: the decoder's image of that latent point, decoded
in this page from the model's own weights (float16). Small dots: every test image's posterior
mean; ringed discs: the test images embedded in this page, click one. Dashed: plot.line_start to
plot.line_end.</p>
<div class="row">
  <div class="planebox">
    <canvas id="plane" width="600" height="560"></canvas>
    <canvas id="overlay" width="600" height="560"></canvas>
    <canvas id="hover" width="112" height="112"></canvas>
    <div id="legend"></div>
  </div>
  <div class="side">
    <div>decoded at <span id="ztext">(move the pointer over the plane)</span></div>
    <canvas id="decoded" width="280" height="280"></canvas>
    <div id="picked">no test point chosen</div>
    <div class="pair">
      <figure><canvas id="original" width="140" height="140"></canvas>
        <figcaption>test image</figcaption></figure>
      <figure><canvas id="recon" width="140" height="140"></canvas>
        <figcaption>reconstruction, decode(mean)</figcaption></figure>
    </div>
  </div>
</div>
<script id="explorer-data" type="application/json">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_STYLE = """
body { font: 14px sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; }
.note { max-width: 960px; color: #555; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.planebox { position: relative; }
#overlay { position: absolute; left: 0; top: 0; cursor: crosshair; }
#hover { position: absolute; display: none; pointer-events: none; border: 1px solid #444; }
canvas { image-rendering: pixelated; }
#decoded, #original, #recon { border: 1px solid #999; }
#legend span { display: inline-block; margin-right: 10px; }
#legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; }
.pair { display: flex; gap: 12px; }
figure { margin: 0; }
figcaption { font-size: 12px; color: #555; }
"""

# The page's code. Shapes: a layer's input and output are flat Float32Arrays in torch's (C, H, W)
# order; `shape` tracks (C, side) for the transposed convolutions.
_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("explorer-data").textContent);

function bytes(b64) {
  const text = atob(b64), out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}
function float32s(b64) {
  const raw = bytes(b64), view = new DataView(raw.buffer), out = new Float32Array(raw.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}
// IEEE 754 half precision -> float32 (no Float16Array needed).
function float16s(b64) {
  const raw = bytes(b64), view = new DataView(raw.buffer), out = new Float32Array(raw.length / 2);
  for (let i = 0; i < out.length; i++) {
    const h = view.getUint16(2 * i, true), sign = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f, f = h & 0x3ff;
    out[i] = e === 0 ? sign * f * 2 ** -24
      : e === 31 ? (f ? NaN : sign * Infinity) : sign * (1 + f / 1024) * 2 ** (e - 15);
  }
  return out;
}

const W = float16s(D.weights);
const means = float32s(D.means);          // (count, 2): the plane's coordinates
const labels = bytes(D.labels);           // (count,)
const pixels = bytes(D.pixels);           // (clickable, 784)
const fullMeans = float32s(D.fullMeans);  // (clickable, latentDims)
const negElbo = float32s(D.negElbo);      // (clickable,)

// The model's decoder: z (latentDims,) -> image (784,) in [0, 1] = sigmoid(logits).
function decode(z) {
  let x = Float32Array.from(z), channels = 0, side = 0;
  for (const L of D.layers) {
    if (L.op === "linear") {
      const y = new Float32Array(L.out);
      for (let o = 0; o < L.out; o++) {
        let s = W[L.b + o];
        const row = L.w + o * L.in;
        for (let i = 0; i < L.in; i++) s += W[row + i] * x[i];
        y[o] = s;
      }
      x = y;
    } else if (L.op === "relu") {
      x = x.map(v => (v > 0 ? v : 0));
    } else if (L.op === "tanh") {
      x = x.map(Math.tanh);
    } else if (L.op === "shape") {
      channels = L.channels; side = L.side;
    } else if (L.op === "convT") {
      // torch's ConvTranspose2d:
      //   out[co, iy*s - p + ky, ix*s - p + kx] += x[ci, iy, ix] * w[ci, co, ky, kx]
      const k = L.k, s = L.stride, p = L.pad, out = (side - 1) * s - 2 * p + k;
      const y = new Float32Array(L.cout * out * out);
      const area = out * out;
      for (let co = 0; co < L.cout; co++) y.fill(W[L.b + co], co * area, (co + 1) * area);
      for (let at = 0; at < L.cin * side * side; at++) {
        const ci = Math.floor(at / (side * side)), iy = Math.floor(at / side) % side;
        const ix = at % side, v = x[at];
        if (v === 0) continue;
        for (let co = 0; co < L.cout; co++) {
          const wb = L.w + (ci * L.cout + co) * k * k, yb = co * area;
          for (let ky = 0; ky < k; ky++) {
            const oy = iy * s - p + ky;
            if (oy < 0 || oy >= out) continue;
            for (let kx = 0; kx < k; kx++) {
              const ox = ix * s - p + kx;
              if (ox >= 0 && ox < out) y[yb + oy * out + ox] += v * W[wb + ky * k + kx];
            }
          }
        }
      }
      x = y; channels = L.cout; side = out;
    }
  }
  return x.map(v => 1 / (1 + Math.exp(-v)));
}

// The plane's axes: plot box in canvas pixels, latent ranges D.x, D.y. The plane fits the
// window's width (the MLflow UI's artifact pane is narrow); the side panel wraps below it.
const plane = document.getElementById("plane"), overlay = document.getElementById("overlay");
plane.width = overlay.width = Math.max(360, Math.min(600, window.innerWidth - 40));
plane.height = overlay.height = plane.width - 40;
const box = {left: 56, top: 12, width: plane.width - 56 - 12, height: plane.height - 12 - 44};
function toPixel(z1, z2) {
  return [box.left + (z1 - D.x[0]) / (D.x[1] - D.x[0]) * box.width,
          box.top + (D.y[1] - z2) / (D.y[1] - D.y[0]) * box.height];
}
function toLatent(px, py) {
  return [D.x[0] + (px - box.left) / box.width * (D.x[1] - D.x[0]),
          D.y[1] - (py - box.top) / box.height * (D.y[1] - D.y[0])];
}
function inside(px, py) {
  return px >= box.left && px <= box.left + box.width
    && py >= box.top && py <= box.top + box.height;
}
function ticks(range) {
  const span = range[1] - range[0], raw = span / 6, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = [];
  for (let t = Math.ceil(range[0] / step) * step; t <= range[1]; t += step) {
    out.push(+t.toFixed(6));
  }
  return out;
}

function drawPlane() {
  const g = plane.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, plane.width, plane.height);
  g.strokeStyle = "#eee"; g.fillStyle = "#333"; g.font = "11px sans-serif";
  for (const t of ticks(D.x)) {
    const [px] = toPixel(t, 0);
    g.beginPath(); g.moveTo(px, box.top); g.lineTo(px, box.top + box.height); g.stroke();
    g.textAlign = "center"; g.fillText(String(t), px, box.top + box.height + 14);
  }
  for (const t of ticks(D.y)) {
    const [, py] = toPixel(0, t);
    g.beginPath(); g.moveTo(box.left, py); g.lineTo(box.left + box.width, py); g.stroke();
    g.textAlign = "right"; g.fillText(String(t), box.left - 4, py + 4);
  }
  g.textAlign = "center";
  g.fillText(D.axisNames[0], box.left + box.width / 2, plane.height - 8);
  g.save(); g.translate(14, box.top + box.height / 2); g.rotate(-Math.PI / 2);
  g.fillText(D.axisNames[1], 0, 0); g.restore();
  g.strokeStyle = "#888"; g.strokeRect(box.left, box.top, box.width, box.height);
  g.save(); g.beginPath(); g.rect(box.left, box.top, box.width, box.height); g.clip();
  g.globalAlpha = 0.5;
  for (let i = 0; i < D.count; i++) {
    const [px, py] = toPixel(means[2 * i], means[2 * i + 1]);
    g.fillStyle = D.colors[labels[i]]; g.fillRect(px - 1, py - 1, 2, 2);
  }
  g.globalAlpha = 1; g.lineWidth = 0.8; g.strokeStyle = "#333";
  for (let i = 0; i < D.clickable; i++) {
    const [px, py] = toPixel(means[2 * i], means[2 * i + 1]);
    g.fillStyle = D.colors[labels[i]];
    g.beginPath(); g.arc(px, py, 3, 0, 2 * Math.PI); g.fill(); g.stroke();
  }
  const [a, b] = [toPixel(...D.line[0]), toPixel(...D.line[1])];
  g.lineWidth = 2; g.strokeStyle = "#000"; g.setLineDash([6, 4]);
  g.beginPath(); g.moveTo(...a); g.lineTo(...b); g.stroke(); g.setLineDash([]);
  for (const [px, py] of [a, b]) { g.beginPath(); g.arc(px, py, 4, 0, 2 * Math.PI); g.stroke(); }
  g.restore();
  const legend = document.getElementById("legend");
  const keys = D.colors.map((c, d) => `<span><i style="background:${c}"></i>${d}</span>`);
  legend.innerHTML = "digit: " + keys.join("");
}

// A 28x28 image, values in [0, 1], drawn enlarged without smoothing.
const cell = document.createElement("canvas"); cell.width = 28; cell.height = 28;
function show(canvas, image) {
  const g = cell.getContext("2d"), data = g.createImageData(28, 28);
  for (let i = 0; i < 784; i++) {
    const v = Math.round(Math.min(1, Math.max(0, image[i])) * 255);
    data.data.set([v, v, v, 255], 4 * i);
  }
  g.putImageData(data, 0, 0);
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = false;
  target.drawImage(cell, 0, 0, canvas.width, canvas.height);
}

// The full latent point of a plane point: the plane's coordinates, the others at 0.
function latentPoint(z1, z2) {
  const z = new Float32Array(D.latentDims);
  z[D.dims[0]] = z1; z[D.dims[1]] = z2;
  return z;
}

const hover = document.getElementById("hover"), ztext = document.getElementById("ztext");
let selected = null;
function drawOverlay(marker) {
  const g = overlay.getContext("2d");
  g.clearRect(0, 0, overlay.width, overlay.height);
  if (selected !== null) {
    const [px, py] = toPixel(means[2 * selected], means[2 * selected + 1]);
    g.lineWidth = 2; g.strokeStyle = "#000";
    g.beginPath(); g.arc(px, py, 7, 0, 2 * Math.PI); g.stroke();
  }
  if (marker) {
    g.lineWidth = 1; g.strokeStyle = "rgba(0,0,0,0.4)";
    g.beginPath(); g.moveTo(marker[0], box.top); g.lineTo(marker[0], box.top + box.height);
    g.moveTo(box.left, marker[1]); g.lineTo(box.left + box.width, marker[1]); g.stroke();
  }
}
function pointer(event) {
  const r = overlay.getBoundingClientRect();
  return [event.clientX - r.left, event.clientY - r.top];
}
overlay.addEventListener("mousemove", event => {
  const [px, py] = pointer(event);
  if (!inside(px, py)) { hover.style.display = "none"; drawOverlay(null); return; }
  const [z1, z2] = toLatent(px, py);
  const image = decode(latentPoint(z1, z2));
  show(document.getElementById("decoded"), image);
  show(hover, image);
  hover.style.display = "block";
  hover.style.left = `${px + 16}px`; hover.style.top = `${py + 16}px`;
  ztext.textContent = `${D.axisNames[0]} = ${z1.toFixed(3)}, ${D.axisNames[1]} = ${z2.toFixed(3)}`;
  window.explorer.pointerPixel = [px, py];  // where the event landed, in canvas pixels
  window.explorer.pointer = [z1, z2];
  drawOverlay([px, py]);
});
overlay.addEventListener("mouseleave", () => { hover.style.display = "none"; drawOverlay(null); });
overlay.addEventListener("click", event => {
  const [px, py] = pointer(event);
  let best = null, bestDistance = 8;  // pixels: a click picks a ringed point within reach
  for (let i = 0; i < D.clickable; i++) {
    const [qx, qy] = toPixel(means[2 * i], means[2 * i + 1]);
    const distance = Math.hypot(qx - px, qy - py);
    if (distance < bestDistance) { best = i; bestDistance = distance; }
  }
  if (best === null) return;
  selected = best;
  const original = pixels.subarray(784 * best, 784 * (best + 1));
  show(document.getElementById("original"), Float32Array.from(original, v => v / 255));
  const mean = fullMeans.subarray(D.latentDims * best, D.latentDims * (best + 1));
  show(document.getElementById("recon"), decode(mean));
  const note = D.likelihood === "gaussian" ? ", without the Gaussian constant 720.4" : "";
  document.getElementById("picked").textContent =
    `test image ${best}: digit ${labels[best]}, negative ELBO ${negElbo[best].toFixed(2)} nats` +
    ` (one posterior sample${note})`;
  window.explorer.selected = best;
  drawOverlay(null);
});

drawPlane();
window.explorer = {box, x: D.x, y: D.y, dims: D.dims, toPixel, toLatent, selected: null,
                   pointer: null, pointerPixel: null, ready: true};
"""
