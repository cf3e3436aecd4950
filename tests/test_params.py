"""params.yaml: the defaults are the tutorial's, and every bad value is named clearly."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from tests.conftest import PROJECT
from vaelab import params as params_mod
from vaelab.errors import VaelabError


def test_project_params_are_the_tutorial_settings():
    p = params_mod.load(PROJECT / "params.yaml")
    assert p == params_mod.defaults()
    assert (p.model.arch, p.model.latent_dims, p.model.hidden) == ("mlp", 2, (512,))
    assert p.model.activation == "relu"
    assert (p.train.lr, p.train.batch_size, p.train.epochs, p.train.seed) == (1e-3, 64, 20, 0)
    assert (p.loss.likelihood, p.loss.beta, p.train.device) == ("gaussian", 1.0, "auto")
    assert (p.plot.line_start, p.plot.line_end, p.plot.line_count) == ((-2.5, 0.4), (2.0, 0.4), 10)


def test_params_are_frozen():
    p = params_mod.defaults()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.epochs = 3


def test_flatten_names_every_key_once():
    flat = params_mod.flatten(params_mod.defaults())
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert set(flat) == {f"{s}.{k}" for s, keys in raw.items() for k in keys}
    assert flat["train.lr"] == 0.001 and flat["plot.line_start"] == [-2.5, 0.4]


def _raw():
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


BAD = [
    # (section, key, value, fragments the message must contain)
    ("train", "epoch", 5, ["unknown key 'train.epoch'", "Did you mean 'epochs'"]),
    ("train", "lr", "fast", ["'train.lr'", "'fast'", "a finite number"]),
    ("train", "epochs", 0, ["'train.epochs'", "0", ">= 1"]),
    ("train", "epochs", True, ["'train.epochs'", "an integer"]),
    ("train", "epochs", 2.5, ["'train.epochs'", "an integer"]),
    ("train", "lr", -0.1, ["'train.lr'", "> 0"]),
    ("train", "lr", float("inf"), ["'train.lr'", "a finite number"]),
    ("train", "seed", 2**40, ["'train.seed'", "2**32 - 1"]),
    ("train", "batch_size", 0, ["'train.batch_size'", ">= 1"]),
    ("train", "kl_warmup_epochs", -1, ["'train.kl_warmup_epochs'", ">= 0 (0 = off)"]),
    ("data", "binarize", "always", ["'data.binarize'", "'none', 'dynamic', 'static'"]),
    ("model", "latent_dims", 0, ["'model.latent_dims'", ">= 2"]),
    ("model", "hidden_dims", 512, ["unknown key 'model.hidden_dims'", "Did you mean 'hidden'"]),
    ("model", "hidden", 512, ["'model.hidden'", "a list, e.g. [200, 200]"]),
    ("model", "hidden", [], ["'model.hidden'", "one or more integers"]),
    ("model", "hidden", [200, 0], ["'model.hidden'", "integers from 1 to 65536"]),
    ("model", "hidden", [200, 2.5], ["'model.hidden[1]'", "an integer"]),
    ("model", "arch", "cnn", ["'model.arch'", "'mlp', 'conv'"]),
    ("model", "activation", "gelu", ["'model.activation'", "'relu', 'tanh'"]),
    ("loss", "beta", -1, ["'loss.beta'", ">= 0"]),
    ("loss", "likelihood", "gausian", ["'loss.likelihood'", "Did you mean 'gaussian'"]),
    ("train", "device", "tpu", ["'train.device'", "'auto', 'cpu', 'cuda'"]),
    ("plot", "line_start", [1.0], ["'plot.line_start'", "a list of 2 numbers"]),
    ("plot", "line_end", [1.0, "x"], ["'plot.line_end[1]'", "a finite number"]),
    ("mlflow", "experiment", "  ", ["'mlflow.experiment'", "non-empty"]),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "fragments"), BAD, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD]
)
def test_bad_values_are_rejected_with_a_clear_message(tmp_path, section, key, value, fragments):
    raw = _raw()
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(VaelabError) as caught:
        params_mod.load(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_missing_key_and_unknown_section(tmp_path):
    raw = _raw()
    del raw["train"]["seed"]
    with pytest.raises(VaelabError, match=r"missing key 'train.seed'.*default: 0"):
        params_mod.parse(raw, tmp_path / "p.yaml")
    raw = _raw()
    raw["trian"] = {}
    with pytest.raises(VaelabError, match="unknown section 'trian'. Did you mean 'train'"):
        params_mod.parse(raw, tmp_path / "p.yaml")


def test_binarized_data_needs_the_bernoulli_likelihood(tmp_path):
    raw = _raw()
    raw["data"]["binarize"] = "dynamic"
    with pytest.raises(VaelabError, match="'data.binarize' is 'dynamic' but 'loss.likelihood' is"):
        params_mod.parse(raw, tmp_path / "p.yaml")
    raw["loss"]["likelihood"] = "bernoulli"
    assert params_mod.parse(raw, tmp_path / "p.yaml").data.binarize == "dynamic"


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: [0.1\nmodel: {}\n")
    with pytest.raises(VaelabError, match=r"not valid YAML at line \d+"):
        params_mod.load(path)


@pytest.mark.parametrize(("text", "value"), [("1e-5", 1e-5), ("1E3", 1000.0), ("2.5e-1", 0.25)])
def test_exponent_floats_read_as_numbers(tmp_path, text, value):
    """`dvc exp run -S loss.beta=1e-5` writes `beta: 1e-05`; YAML 1.1 would read a string."""
    raw = (PROJECT / "params.yaml").read_text().replace("beta: 1.0", f"beta: {text}")
    path = tmp_path / "params.yaml"
    path.write_text(raw)
    assert params_mod.load(path).loss.beta == value


def test_missing_file(tmp_path):
    with pytest.raises(VaelabError, match="file not found"):
        params_mod.load(tmp_path / "nope.yaml")


def test_conv_takes_at_most_two_channel_counts(tmp_path):
    raw = _raw()
    raw["model"] |= {"arch": "conv", "hidden": [32, 64, 128]}
    with pytest.raises(VaelabError, match=r"'model.hidden' is \[32, 64, 128\] with 'model.arch'"):
        params_mod.parse(raw, tmp_path / "p.yaml")
    raw["model"]["hidden"] = [32, 64]
    assert params_mod.parse(raw, tmp_path / "p.yaml").model.hidden == (32, 64)
