"""Presets: every file is a valid configuration, and applying one resets exactly the
configuration keys (the rest of params.yaml is the user's machine and bookkeeping)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import PROJECT
from vaelab import params as params_mod
from vaelab import presets
from vaelab.errors import VaelabError

PRESETS = PROJECT / "presets"


def apply(name: str, current: params_mod.Params, **overrides) -> params_mod.Params:
    path = PRESETS / f"{name}.yaml"
    return presets.resolve(presets.read_preset(path), current, overrides, path)


def test_the_six_presets_exist_and_are_valid():
    assert presets.available(PRESETS) == [
        "bernoulli-2d",
        "burda-iwae",
        "burda-vae",
        "iwae-benchmark",
        "tutorial",
        "tutorial-exact",
    ]
    project = params_mod.load(PROJECT / "params.yaml")
    for name in presets.available(PRESETS):
        apply(name, project)  # raises on a bad value


def test_presets_are_what_they_claim(tiny_params):
    defaults = params_mod.defaults()
    tutorial = apply("tutorial", tiny_params)
    # Configuration keys back at the defaults, machine keys kept from the current params.
    assert (tutorial.model, tutorial.loss) == (defaults.model, defaults.loss)
    assert tutorial.train.epochs == 20 and tutorial.evaluate.iw_samples == 1000
    assert tutorial.data.source == "custom" and tutorial.train.device == "cpu"
    assert tutorial.plot == tiny_params.plot
    exact = apply("tutorial-exact", tiny_params)
    assert exact.loss.beta * 64 == 1 and dataclasses.replace(exact.loss, beta=1.0) == defaults.loss
    b2d = apply("bernoulli-2d", tiny_params)
    assert (b2d.loss.likelihood, b2d.data.binarize, b2d.model.latent_dims) == (
        "bernoulli",
        "dynamic",
        2,
    )
    iwae = apply("iwae-benchmark", tiny_params)
    assert (iwae.model.hidden, iwae.model.latent_dims, iwae.model.activation) == (
        (200, 200),
        50,
        "tanh",
    )
    assert (iwae.data.binarize, iwae.evaluate.iw_samples) == ("dynamic", 5000)


def test_the_burda_presets_are_the_paper_s_vae_and_iwae(tiny_params):
    """Burda, Grosse & Salakhutdinov (2016), sec. 5 and github.com/yburda/iwae: the same network,
    data and training for both; only the objective and k differ."""
    vae, iwae = apply("burda-vae", tiny_params), apply("burda-iwae", tiny_params)
    for preset in (vae, iwae):
        assert preset.model == params_mod.ModelParams(
            arch="mlp",
            latent_dims=50,
            hidden=(200, 200),
            activation="tanh",
            output_bias="data_mean",
        )
        assert (preset.loss.likelihood, preset.data.binarize) == ("bernoulli", "dynamic")
        assert (preset.loss.beta, preset.train.kl_warmup_epochs) == (1.0, 0)
        train = preset.train
        assert (train.epochs, train.batch_size, train.lr, train.lr_schedule) == (
            3**8 // 2,  # sum of 3**i, i = 0..7 = (3**8 - 1) / 2 = 3280
            20,
            1e-3,
            "burda",
        )
        assert (train.adam_betas, train.adam_eps) == ((0.99, 0.999), 1e-4)
        assert preset.evaluate.iw_samples == 5000
    assert (vae.loss.objective, vae.loss.samples) == ("elbo", 1)
    assert (iwae.loss.objective, iwae.loss.samples) == ("iwae", 5)
    k50 = apply("burda-iwae", tiny_params, **{"loss.samples": 50})
    assert k50.loss.samples == 50


def test_flags_name_only_the_keys_that_change(tiny_params):
    target = apply("iwae-benchmark", tiny_params, **{"train.epochs": 3})
    flags = presets.set_flags(target, tiny_params)
    pairs = dict(flag.split("=", 1) for flag in flags[1::2])
    assert set(flags[::2]) == {"-S"}
    assert pairs["model.hidden"] == "[200,200]" and pairs["train.epochs"] == "3"
    assert pairs["loss.likelihood"] == "bernoulli"
    assert "train.device" not in pairs and "data.source" not in pairs
    assert presets.set_flags(tiny_params, tiny_params) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  device: cuda\n", "'train.device' is not a configuration key"),
        ("model:\n  hidden: 200\n", "'model.hidden' is 200; expected a list"),
        ("model: [1, 2]\n", "expected sections of keys"),
        ("loss:\n  beta: [0.5\n", "not valid YAML"),
    ],
)
def test_a_bad_preset_is_named(tmp_path, tiny_params, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(VaelabError, match=r"broken\.yaml.*" + message.replace("[", r"\[")):
        presets.resolve(presets.read_preset(path), tiny_params, {}, path)


def test_dry_run_prints_the_command_and_unknown_presets_fail(capsys):
    presets.main(
        [
            "--dir",
            str(PRESETS),
            "--params",
            str(PROJECT / "params.yaml"),
            "tutorial-exact",
            "--dry-run",
            "--queue",
        ]
    )
    assert capsys.readouterr().out.strip() == (
        "dvc exp run -n tutorial-exact -S data.validation=0 -S loss.beta=0.015625 --queue"
    )
    with pytest.raises(SystemExit) as exit_info:
        presets.main(["--dir", str(PRESETS), "--params", str(PROJECT / "params.yaml"), "iwae"])
    assert exit_info.value.code == 2
    assert "no preset 'iwae'" in capsys.readouterr().err


def test_a_preset_sets_the_keys_of_a_configuration_but_the_data_source():
    """Two lists, each safe in its own direction (a new key is machine-only for presets until
    listed, and part of a configuration for grouping replicates until excluded); they must agree
    on every key there is: where the data come from is the machine's, not a preset's."""
    from vaelab import params as params_mod
    from vaelab.presets import is_preset_key

    for key in params_mod.flatten(params_mod.defaults()):
        expected = params_mod.is_config_key(key) and key != "data.source"
        assert is_preset_key(key) == expected, key
