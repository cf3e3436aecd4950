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
