"""Benchmark: the course tutorial's training loop against vaelab's, same data, model and device.

    python -m vaelab.bench --data-dir data/MNIST [--epochs 4] [--batch-size 64] [--device auto]
        [--sweep 64,256,1024] [--compile] [--report reports/benchmark.md]
    python -m vaelab.bench --data-dir data/MNIST --iwae-samples 1,5,50 [--epochs 2]

The second form times IWAE training (``loss.objective: iwae``) with k samples per image on the
burda presets' network (784-200-200-50 tanh, Bernoulli, dynamic binarisation, batch 20) against
k = 1, to show what the k samples cost: one batched decoder pass of B*k rows.

Each configuration runs in a fresh subprocess (so peak memory is its own) and prints one JSON line.
Times exclude the first (warm-up) epoch. The reference is the tutorial reproduced faithfully:
torchvision's MNIST with ToTensor, DataLoader(batch_size=64, shuffle=True), its model (two
separate mu/logvar heads, noise drawn on the CPU and moved), loss 0.5*SSE summed + KL averaged,
``.to(device)`` per batch, Adam 1e-3. vaelab runs ``vaelab.training.train_model`` with beta = 1/64,
which is the same objective up to a constant factor (tests/test_model.py checks the identity).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vaelab import device as device_mod
from vaelab import params as params_mod
from vaelab.data import load_split
from vaelab.errors import VaelabError, run_stage
from vaelab.files import atomic_write_bytes
from vaelab.model import dataset_elbo
from vaelab.training import train_model
from vaelab.tutorial import TUTORIAL_BATCH, TutorialVAE

# ----------------------------------------------------------------------------- the reference


def _memory_mb(device: torch.device) -> float:
    """RSS on the CPU; on CUDA the peak allocated since the last call (then reset)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(data_dir: Path, epochs: int, device: torch.device, seed: int) -> dict:
    import torchvision
    from torchvision import transforms

    torch.manual_seed(seed)
    mnist = torchvision.datasets.MNIST(
        str(data_dir.parent), train=True, download=False, transform=transforms.ToTensor()
    )
    train_images, _ = load_split(data_dir, train=True)  # verified; the reference must read these
    if not torch.equal(mnist.data, train_images):
        raise VaelabError(
            f"torchvision read other images than {data_dir / 'raw'} holds; remove "
            f"{data_dir / 'processed'} if it exists."
        )
    loader = torch.utils.data.DataLoader(mnist, batch_size=TUTORIAL_BATCH, shuffle=True)
    model = TutorialVAE(2).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    seconds, memory = [], []
    for _ in range(epochs):
        started = time.perf_counter()
        for x, _ in loader:
            x = x.to(device)
            optimizer.zero_grad()
            x_hat = model(x)
            loss = 0.5 * ((x - x_hat) ** 2).sum() + model.encoder.kl
            loss.backward()
            optimizer.step()
        _sync(device)
        seconds.append(time.perf_counter() - started)
        memory.append(_memory_mb(device))
    test_images, _ = load_split(data_dir, train=False)
    noise = torch.Generator(device=device).manual_seed(seed)
    test = dataset_elbo(model.to_vaelab(), test_images.to(device), "gaussian", noise)
    return {
        "images": len(mnist),
        "seconds": seconds,
        "memory_mb": memory,
        "test_neg_elbo": test["neg_elbo"],
        "eval_seconds": None,
    }


# ----------------------------------------------------------------------------- vaelab


def run_vaelab(
    data_dir: Path, epochs: int, batch_size: int, device: torch.device, seed: int, compile: bool
) -> dict:
    defaults = params_mod.defaults()
    params = dataclasses.replace(
        defaults,
        # The tutorial's protocol: all 60,000 training images, the test set after each epoch.
        data=dataclasses.replace(defaults.data, validation=0),
        # The tutorial's objective: beta = 1/64 whatever the batch size, so rows compare alike.
        loss=dataclasses.replace(defaults.loss, beta=1 / TUTORIAL_BATCH),
        train=dataclasses.replace(
            defaults.train, epochs=epochs, batch_size=batch_size, seed=seed, compile=compile
        ),
    )
    train_images, _ = load_split(data_dir, train=True)
    test_images, _ = load_split(data_dir, train=False)
    memory = []
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result
        model, history = train_model(
            params,
            train_images,
            test_images,
            device=device,
            on_epoch=lambda row: memory.append(_memory_mb(device)),
        )
    test_on_device = test_images.to(device)
    noise = torch.Generator(device=device).manual_seed(seed)
    _sync(device)
    started = time.perf_counter()
    test = dataset_elbo(model, test_on_device, "gaussian", noise)
    _sync(device)
    return {
        "images": len(train_images),
        "seconds": [r["epoch_seconds"] for r in history],
        "memory_mb": memory,
        "test_neg_elbo": test["neg_elbo"],
        "eval_seconds": time.perf_counter() - started,
    }


def run_iwae(data_dir: Path, epochs: int, samples: int, device: torch.device, seed: int) -> dict:
    """IWAE training with ``samples`` per image on the burda presets' network, batch 20."""
    raw = dataclasses.asdict(params_mod.defaults())
    raw["data"].update(binarize="dynamic", validation=0)  # the paper's 60,000 images
    raw["model"].update(latent_dims=50, hidden=[200, 200], activation="tanh")
    raw["loss"].update(likelihood="bernoulli", objective="iwae", samples=samples)
    raw["train"].update(epochs=epochs, batch_size=20, seed=seed, device=device.type)
    params = params_mod.parse(raw)
    train_images, _ = load_split(data_dir, train=True)
    test_images, _ = load_split(data_dir, train=False)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result
        _, history = train_model(params, train_images, test_images, device=device)
    return {
        "images": len(train_images),
        "seconds": [r["epoch_seconds"] for r in history],
        "loss": history[-1]["epoch/train/loss"],
    }


def iwae_markdown(runs: list[dict], info: dict[str, str], device: torch.device) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"GPU: {info['gpu']}; torch {info['torch']}; device {device}.",
        "",
    ]
    # The unit of the ratio column: k = 1 when it was timed, else the first k.
    unit = next((r for r in runs if r["samples"] == 1), runs[0])
    base = statistics.median(unit["seconds"][1:])
    lines += [
        f"| IWAE k | batch | s/epoch | images/s | × time of k = {unit['samples']} "
        "| last epoch's train loss |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        seconds = statistics.median(r["seconds"][1:])
        lines.append(
            f"| {r['samples']} | 20 | {seconds:.2f} | {r['images'] / seconds:,.0f} | "
            f"{seconds / base:.2f} | {r['loss']:.2f} |"
        )
    epochs = len(runs[0]["seconds"])
    lines += ["", f"Median over epochs 2..{epochs} (epoch 1 is warm-up), training only."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return info


def _worker(spec: dict) -> dict:
    device = torch.device(spec["device"])
    data_dir = Path(spec["data_dir"])
    if spec["loop"] == "reference":
        return run_reference(data_dir, spec["epochs"], device, spec["seed"])
    if spec["loop"] == "iwae":
        return run_iwae(data_dir, spec["epochs"], spec["samples"], device, spec["seed"])
    return run_vaelab(
        data_dir, spec["epochs"], spec["batch_size"], device, spec["seed"], spec["compile"]
    )


def _spawn(spec: dict) -> dict:
    label = f"{spec['loop']} batch {spec['batch_size']}" + (" compiled" if spec["compile"] else "")
    label += f" k = {spec['samples']}" if "samples" in spec else ""
    print(f"bench: running {label} ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "vaelab.bench", "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise VaelabError(f"benchmark worker for {label} failed (exit {result.returncode})")
    return spec | json.loads(result.stdout.strip().splitlines()[-1])


def summarise(run: dict, reference_rate: float | None) -> dict:
    timed = run["seconds"][1:]  # without the warm-up epoch
    seconds = statistics.median(timed)
    rate = run["images"] / seconds
    return {
        "loop": run["loop"] + (" (compiled)" if run["compile"] else ""),
        "batch": run["batch_size"],
        "seconds_per_epoch": seconds,
        "images_per_second": rate,
        "ratio": rate / reference_rate if reference_rate else 1.0,
        "memory_first_mb": run["memory_mb"][0],
        "memory_peak_mb": max(run["memory_mb"]),
        "memory_last_mb": run["memory_mb"][-1],
        "eval_seconds": run["eval_seconds"],
        "test_neg_elbo": run["test_neg_elbo"],
        "epochs": len(run["seconds"]),
    }


def markdown(rows: list[dict], info: dict[str, str], device: torch.device) -> str:
    memory = "GPU peak allocated per epoch" if device.type == "cuda" else "RSS"
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"GPU: {info['gpu']}; torch {info['torch']}, Python {info['python']}; device {device}.",
        "",
        f"| loop | batch | s/epoch | images/s | × reference | {memory} MB epoch 1 → last (peak)"
        " | test pass s | test −ELBO* |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        eval_s = "–" if r["eval_seconds"] is None else f"{r['eval_seconds']:.3f}"
        lines.append(
            f"| {r['loop']} | {r['batch']} | {r['seconds_per_epoch']:.2f} | "
            f"{r['images_per_second']:,.0f} | {r['ratio']:.2f} | {r['memory_first_mb']:,.0f} → "
            f"{r['memory_last_mb']:,.0f} ({r['memory_peak_mb']:,.0f}) | {eval_s} | "
            f"{r['test_neg_elbo']:.2f} |"
        )
    epochs = rows[0]["epochs"]
    lines += [
        "",
        f"Median over epochs 2..{epochs} (epoch 1 is warm-up). *Test negative ELBO (Gaussian, "
        f"nats/image, beta = 1) after {epochs} epochs of the tutorial's objective (beta = 1/64).",
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=TUTORIAL_BATCH,
        help="vaelab's batch for the head-to-head row",
    )
    parser.add_argument("--sweep", default="256,1024", help="more vaelab batch sizes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="add a train.compile=true row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="write the table here (+ .json beside it)")
    parser.add_argument(
        "--iwae-samples",
        help="instead: time IWAE training for these k, e.g. 1,5,50 (batch 20, burda network)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def bench_iwae(args: argparse.Namespace, base: dict, device: torch.device) -> None:
    """IWAE training time for each k of ``--iwae-samples`` against k = 1."""
    ks = [int(k) for k in args.iwae_samples.split(",") if k.strip()]
    runs = [_spawn(base | {"loop": "iwae", "batch_size": 20, "samples": k}) for k in ks]
    table = iwae_markdown(runs, machine(), device)
    print(table)
    if args.report:
        header = "# Benchmark: IWAE training time against k\n\n"
        atomic_write_bytes(args.report, (header + table).encode())
        print(f"bench: wrote {args.report}")


def bench_loops(args: argparse.Namespace, base: dict, device: torch.device) -> None:
    """The tutorial's loop, then vaelab's at the same batch (compiled too, with ``--compile``)
    and at the ``--sweep`` batch sizes; the ratios against the tutorial's."""
    sweep = [int(b) for b in args.sweep.split(",") if b.strip()]
    specs = [
        base | {"loop": "reference", "batch_size": TUTORIAL_BATCH},
        base | {"loop": "vaelab", "batch_size": args.batch_size},
    ]
    if args.compile:
        specs.append(base | {"loop": "vaelab", "batch_size": args.batch_size, "compile": True})
    specs += [base | {"loop": "vaelab", "batch_size": b} for b in sweep if b != args.batch_size]

    runs = [_spawn(spec) for spec in specs]
    reference_rate = summarise(runs[0], None)["images_per_second"]
    rows = [summarise(run, reference_rate) for run in runs]
    info = machine()
    table = markdown(rows, info, device)
    print(table)
    if args.report:
        header = "# Benchmark: the tutorial's training loop vs vaelab's\n\n"
        atomic_write_bytes(args.report, (header + table).encode())
        payload = {"machine": info, "device": str(device), "rows": rows}
        atomic_write_bytes(
            args.report.with_suffix(".json"), (json.dumps(payload, indent=2) + "\n").encode()
        )
        print(f"bench: wrote {args.report} and {args.report.with_suffix('.json')}")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    if args.data_dir is None:
        parser.error("--data-dir is required")
    if args.epochs < 2:
        raise VaelabError("--epochs must be >= 2: the first epoch is warm-up and not timed.")
    device = device_mod.resolve(args.device)
    load_split(args.data_dir, train=False)  # verify the data before spending minutes
    base = {
        "data_dir": str(args.data_dir),
        "epochs": args.epochs,
        "device": str(device),
        "seed": args.seed,
        "compile": False,
    }
    if args.iwae_samples:
        bench_iwae(args, base, device)
    else:
        bench_loops(args, base, device)


if __name__ == "__main__":
    run_stage(main)
