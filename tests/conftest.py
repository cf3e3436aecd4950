"""Shared fixtures: a tiny fake MNIST in real IDX format and tiny params, all in tmp_path.

Tests never touch the network, the user's data/ or the user's mlflow.db.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab import params as params_mod
from vaelab.data import idx_bytes, prepare_custom

PROJECT = Path(__file__).resolve().parents[1]
# The fake training file holds N_TRAIN + N_VAL images; the tiny params hold the last N_VAL out as
# the validation split (data.validation), so N_TRAIN are trained on. 333 = 10 batches of 32 + 13:
# the last, smaller batch (and, under DDP, slices of 7 and 6) is exercised by every test that
# trains with batch_size 32.
N_TRAIN, N_VAL, N_TEST = 333, 60, 80


def draw_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 images of ten distinguishable stroke patterns (one per label) plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28))
    for i, label in enumerate(labels):
        angle = np.pi * label / 10 + rng.normal(0, 0.05)
        # A thick stroke through the centre at a label-specific angle, plus a label-sized ring.
        distance = np.abs((xx - 14) * np.sin(angle) - (yy - 14) * np.cos(angle))
        stroke = (distance < 2.0) & (np.hypot(xx - 14, yy - 14) < 10)
        ring = np.abs(np.hypot(xx - 14, yy - 14) - (3 + label * 0.8)) < 1.0
        images[i] = 0.9 * (stroke | ring) + rng.uniform(0, 0.1, size=(28, 28))
    return (images * 255).round().astype(np.uint8), labels


def write_fake_mnist(folder: Path) -> dict[str, str]:
    """The four IDX files + manifest.json in ``folder``; returns {name: md5}."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = draw_digits(N_TRAIN + N_VAL, seed=1)
    test_x, test_y = draw_digits(N_TEST, seed=2)
    contents = {
        "train-images-idx3-ubyte": idx_bytes(train_x),
        "train-labels-idx1-ubyte": idx_bytes(train_y),
        "t10k-images-idx3-ubyte": idx_bytes(test_x),
        "t10k-labels-idx1-ubyte": idx_bytes(test_y),
    }
    md5s = {}
    for name, payload in contents.items():
        (folder / name).write_bytes(payload)
        md5s[name] = hashlib.md5(payload).hexdigest()
    manifest = {"files": {name: {"md5": md5} for name, md5 in md5s.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return md5s


@pytest.fixture(autouse=True)
def own_torch_rng() -> Iterator[None]:
    """Every test starts from the same global torch seed and leaves the global RNG as it found
    it: what a test draws does not depend on which tests ran before it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    """A folder with fake IDX files and their manifest (the ``data.source: custom`` input)."""
    write_fake_mnist(tmp_path / "custom")
    return tmp_path / "custom"


@pytest.fixture
def fake_data_dir(tmp_path: Path, fake_mnist: Path) -> Path:
    """A prepared data dir (raw/ + checksums.json) holding the fake MNIST."""
    prepare_custom(tmp_path / "MNIST", fake_mnist, log=lambda message: None)
    return tmp_path / "MNIST"


TINY = {
    "data": {"source": "custom", "validation": N_VAL},
    "model": {"hidden": [64]},
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
    "evaluate": {"iw_samples": 8},
    "plot": {"grid_size": 4, "line_count": 4, "recon_count": 4},
}


@pytest.fixture
def tiny_params() -> params_mod.Params:
    raw = dataclasses.asdict(params_mod.defaults())
    for section, values in TINY.items():
        raw[section].update(values)
    return params_mod.parse(raw)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """A fake-MNIST copy of the repository after one `dvc repro`, holding one complete run
    (tests/test_pipeline.py makes it). Read it, never change it: tests that go on from this
    state take ``reproduced_copy``."""
    from tests.test_pipeline import make_repo, run

    repo = make_repo(tmp_path_factory.mktemp("repo"))
    run(repo, "dvc", "repro")
    return repo


@pytest.fixture
def reproduced_copy(reproduced: Path, tmp_path: Path) -> Path:
    """A private copy of ``reproduced``: git, DVC cache and outputs, MLflow store and artifacts."""
    import shutil

    from tests.test_pipeline import move_store

    copy = tmp_path / "repo"
    shutil.copytree(reproduced, copy, symlinks=True)
    move_store(copy / "mlflow.db", reproduced, copy)
    return copy


@pytest.fixture(scope="session")
def postgres():  # a tests.services.Postgres
    """One PostgreSQL server for the session; the tests that need it skip, with the reason and
    how to install it, where PostgreSQL is missing (tests/services.py)."""
    from tests.services import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def s3(tmp_path_factory):  # a tests.services.S3
    """One S3-compatible server (moto) with one bucket for the session."""
    from tests.services import running_s3

    with running_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def tracking_server(request, s3, tmp_path_factory):  # a tests.tracking_server.TrackingServer
    """One real `mlflow server` for the whole session, as a team runs it: its runs in a
    PostgreSQL database, its artifacts in the S3 bucket (tests/tracking_server.py). Where
    PostgreSQL is missing the runs go to SQLite, so that the tests of the server's runs, UI and
    sharing still run; those about PostgreSQL itself skip."""
    from tests.tracking_server import running_server

    folder = tmp_path_factory.mktemp("mlflow-server")
    try:
        backend = request.getfixturevalue("postgres").create_database("mlflow")
    except pytest.skip.Exception:
        backend = f"sqlite:///{folder / 'mlflow.db'}"
    with running_server(folder, backend, s3) as server:
        yield server


@pytest.fixture(scope="session")
def filled_server(tracking_server, tmp_path_factory):
    """The server after `dvc repro` and one `dvc exp run` of a fake-MNIST repository logged to
    it: two complete runs (a tests.tracking_server.FilledStore)."""
    from tests.tracking_server import fill

    return fill(tracking_server, tmp_path_factory.mktemp("remote-pipeline"))


@pytest.fixture(scope="module")
def browser():  # a playwright Browser
    """Headless Chromium, launched once per test module for the `browser` tests (their module
    skips, with the reason, when playwright or chromium is missing; tests/test_ui_browser.py)."""
    from playwright.sync_api import expect, sync_playwright

    from tests.test_ui_browser import CHROMIUM, UI_TIMEOUT_MS

    # expect()'s own default wait is 5 s, shorter than the UI takes on 2 busy cores: every
    # assertion waits as long as the pages' own actions (new_page).
    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()
