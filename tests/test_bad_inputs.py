"""Every bad input of the table in docs/reliability.md ("Bad input") gets a clear one-line error,
a non-zero exit and loses nothing already written. One test per row, through the stages' real
``main()``."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import N_TRAIN, PROJECT, TINY
from tests.test_faults import train_args
from vaelab import prepare, train
from vaelab.errors import run_stage


def _params(raw_edit=None, text_edit=None):
    def setup(ws: Path) -> None:
        raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
        for section, values in TINY.items():
            raw[section].update(values)
        if raw_edit:
            raw_edit(raw)
        text = yaml.safe_dump(raw, sort_keys=False)
        (ws / "params.yaml").write_text(text_edit(text) if text_edit else text)

    return setup


def _set(section, key, value):
    return _params(lambda raw: raw[section].__setitem__(key, value))


def _damage(name, how):
    def setup(ws: Path) -> None:
        _params()(ws)
        path = ws / "MNIST" / "raw" / name
        payload = bytearray(path.read_bytes())
        if how == "missing":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(bytes(payload[:-100]))
        elif how == "flipped":
            payload[len(payload) // 2] ^= 0x10
            path.write_bytes(bytes(payload))

    return setup


def _custom_gzip(ws: Path) -> None:
    """A user ships a .gz as if it were the IDX file (its manifest MD5 matches the .gz)."""
    _params()(ws)
    custom = ws / "custom"
    path = custom / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))
    manifest = json.loads((custom / "manifest.json").read_text())
    manifest["files"][path.name]["md5"] = hashlib.md5(path.read_bytes()).hexdigest()
    (custom / "manifest.json").write_text(json.dumps(manifest))


ROWS = [
    # (id, setup, stage, fragments the one-line message must contain)
    (
        "unknown key",
        _set("train", "epoch", 3),
        "train",
        ["params.yaml", "unknown key 'train.epoch'", "Did you mean 'epochs'"],
    ),
    (
        "missing key",
        _params(lambda raw: raw["train"].pop("lr")),
        "train",
        ["params.yaml", "missing key 'train.lr'", "default: 0.001"],
    ),
    (
        "wrong type",
        _set("train", "lr", "fast"),
        "train",
        ["params.yaml", "'train.lr' is 'fast'", "expected a finite number"],
    ),
    ("epochs 0", _set("train", "epochs", 0), "train", ["'train.epochs' is 0", ">= 1"]),
    ("negative lr", _set("train", "lr", -0.001), "train", ["'train.lr' is -0.001", "> 0"]),
    ("batch 0", _set("train", "batch_size", 0), "train", ["'train.batch_size' is 0", ">= 1"]),
    (
        "batch > data set",
        _set("train", "batch_size", 5000),
        "train",
        ["'train.batch_size' is 5000", f"larger than the training set ({N_TRAIN} images)"],
    ),
    (
        "latent_dims 0",
        _set("model", "latent_dims", 0),
        "train",
        ["'model.latent_dims' is 0", ">= 2"],
    ),
    ("beta < 0", _set("loss", "beta", -1), "train", ["'loss.beta' is -1", ">= 0"]),
    (
        "iw_samples 0",
        _set("evaluate", "iw_samples", 0),
        "train",
        ["'evaluate.iw_samples' is 0", ">= 1"],
    ),
    (
        "unknown likelihood",
        _set("loss", "likelihood", "poisson"),
        "train",
        ["'loss.likelihood' is 'poisson'", "'gaussian', 'bernoulli'"],
    ),
    (
        "unknown device",
        _set("train", "device", "tpu"),
        "train",
        ["'train.device' is 'tpu'", "'auto', 'cpu', 'cuda'"],
    ),
    (
        "malformed YAML",
        _params(text_edit=lambda t: t.replace("epochs: 2", "epochs: [2")),
        "train",
        ["params.yaml", "not valid YAML at line"],
    ),
    (
        "data file missing",
        _damage("train-labels-idx1-ubyte", "missing"),
        "train",
        ["train-labels-idx1-ubyte: file missing", "dvc repro prepare"],
    ),
    (
        "data file truncated",
        _damage("train-images-idx3-ubyte", "truncated"),
        "train",
        ["train-images-idx3-ubyte: MD5 is", "expected", "dvc repro prepare"],
    ),
    (
        "one flipped byte",
        _damage("train-labels-idx1-ubyte", "flipped"),
        "train",
        ["train-labels-idx1-ubyte: MD5 is", "expected", "dvc repro prepare"],
    ),
    (
        "wrong magic number",
        _custom_gzip,
        "prepare",
        ["train-images-idx3-ubyte: magic number is", "expected 2051", "unpacked first"],
    ),
]


@pytest.fixture
def workspace(tmp_path, fake_data_dir, fake_mnist, monkeypatch):
    """Data, a custom source, and outputs of an earlier good run that must survive."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"config": {"latent_dims": 2, "hidden_dims": 8}, "state_dict": {}}, out / "vae.pt")
    (out / "history.csv").write_text("epoch\n1\n")
    (out / "run.json").write_text('{"run_id": "earlier"}\n')
    return tmp_path


def _snapshot(ws: Path) -> dict[str, bytes]:
    files = [*(ws / "out").iterdir(), *(ws / "MNIST").rglob("*")]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize(
    ("setup", "stage", "fragments"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_is_one_clear_line_and_loses_nothing(workspace, setup, stage, fragments, capsys):
    ws = workspace
    setup(ws)
    before = _snapshot(ws)
    if stage == "train":
        out = ws / "out"
        argv = train_args(ws / "params.yaml", ws / "MNIST", out)
        main = train.main
    else:
        _params(lambda raw: raw["data"].__setitem__("source", "custom"))(ws)
        argv = [
            "--params",
            str(ws / "params.yaml"),
            "--out",
            str(ws / "MNIST"),
            "--custom-dir",
            str(ws / "custom"),
        ]
        main = prepare.main
    with pytest.raises(SystemExit) as exit_:
        run_stage(lambda: main(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _snapshot(ws) == before, "an existing output was changed"
    assert not (ws / "out" / "checkpoint.pt").exists()
    assert not (ws / "mlflow.db").exists(), "a bad input never reaches the tracking store"
