"""The search file (``searches/*.yaml``, vaelab.search_file): a good one is read into the space,
the fixed overrides and the settings with their defaults; each mistake is one error naming the
file, the entry and what to write instead, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT
from vaelab import search_file
from vaelab.errors import VaelabError
from vaelab.search_file import Choice, Range

PARAMS = yaml.safe_load((PROJECT / "params.yaml").read_text())
PIPELINE = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
GOOD = """
params:
  model.latent_dims: {low: 2, high: 32, int: true, log: true}
  model.hidden: {choices: [[256], [512, 512]]}
  train.lr: {low: 0.0003, high: 0.01, log: true}
  model.activation: {choices: [relu, tanh]}
trials: 16
train.epochs: 4
evaluate.iw_samples: 100
"""


def parse(text: str, name: str = "good", pipeline: dict = PIPELINE):
    return search_file.parse(yaml.safe_load(text), Path(f"searches/{name}.yaml"), PARAMS, pipeline)


def test_a_good_file_is_read_with_its_defaults():
    search = parse(GOOD)
    assert search.name == "good"
    assert search.space == {
        "model.latent_dims": Range(2.0, 32.0, log=True, integer=True),
        "model.hidden": Choice(([256], [512, 512])),
        "train.lr": Range(0.0003, 0.01, log=True),
        "model.activation": Choice(("relu", "tanh")),
    }
    assert search.fixed == {"train.epochs": 4, "evaluate.iw_samples": 100}
    assert (search.trials, search.jobs, search.seed) == (16, 1, 0)
    assert (search.metric, search.direction) == ("eval/val_iw/nll", "minimize")
    assert search.pruner == search_file.Pruner("median", 5, 0)
    assert search.confirm == search_file.Confirm(0, ())
    assert search.base.train.epochs == 4 and search.epochs == 4
    assert search.curve == "epoch/val/neg_elbo"  # what the pruner reads for an eval metric


def test_the_shipped_search_files_are_valid():
    files = sorted((PROJECT / "searches").glob("*.yaml"))
    assert files, "ship at least one search file"
    for path in files:
        search = search_file.load(path, PROJECT / "params.yaml", PROJECT / "dvc.yaml")
        assert len(search.space) >= 3 and search.trials >= 16


def test_a_per_epoch_metric_is_its_own_pruning_curve_and_accuracy_is_maximized():
    search = parse(GOOD + "metric: epoch/val/recon\n")
    assert search.curve == "epoch/val/recon" and search.direction == "minimize"
    search = parse(GOOD + "metric: eval/val_latent/probe_accuracy\npruner: none\n")
    assert search.direction == "maximize"


BAD = [
    ("trails: 16", "unknown entry 'trails'. Did you mean 'trials'?"),
    ("params:\n  model.latent_dim: {low: 2, high: 8, int: true}",
     "'model.latent_dim' in 'params' is not a params key. Did you mean 'model.latent_dims'?"),
    ("params:\n  modle.latent_dims: {low: 2, high: 8, int: true}",
     "no section 'modle'. Did you mean 'model'?"),
    ("params:\n  train.lr: {low: 0.01, high: 0.001}", "low 0.01 >= high 0.001; low must be"),
    ("params:\n  train.lr: {low: 0, high: 0.01, log: true}", "log: true and low 0; a log scale"),
    ("params:\n  model.latent_dims: {low: 2, high: 8}", "takes whole numbers; add int: true"),
    ("params:\n  train.lr: {low: 0.001, high: 0.01, int: true}",
     "'params.train.lr.low' is 0.001; with int: true the ends are whole numbers"),
    ("params:\n  model.hidden: {low: 64, high: 512, int: true}",
     "'model.hidden' is not a number; give its values as choices"),
    ("params:\n  train.lr: {low: -1, high: 0.01}",
     "'params.train.lr.low' -1 is refused by the params schema: 'train.lr' is -1.0; expected a "
     "number > 0"),
    ("params:\n  model.latent_dims: {choices: [1, 4]}",
     "choice 1 is refused by the params schema: 'model.latent_dims' is 1; expected an integer "
     ">= 2"),
    ("params:\n  model.activation: {choices: [relu, gelu]}",
     "choice 'gelu' is refused by the params schema: 'model.activation' is 'gelu'; expected one "
     "of 'relu', 'tanh'"),
    ("params:\n  model.latent_dims: {choices: [4, 8, 4]}", "lists 4 more than once"),
    ("params:\n  model.latent_dims: {choices: []}", "expected a list of one or more values"),
    ("params:\n  model.latent_dims: {choices: [2, 4], low: 2}",
     "has choices and low; give either choices or a range"),
    ("params:\n  train.lr: {low: 0.001}", "lacks high; a range needs low and high"),
    ("params:\n  train.lr: {lo: 0.001, high: 0.01}", "unknown entry 'lo'. Did you mean 'low'?"),
    ("params:\n  train.lr: 0.001", "expected {choices: [...]} or {low: ..., high: ...}"),
    ("params:\n  train.seed: {choices: [0, 1]}", "'params.train.seed' is a seed: searching it"),
    ("params:\n  train.device: {choices: [cpu, cuda]}", "'params.train.device' is bookkeeping"),
    ("params:\n  mlflow.sweep: {choices: [a, b]}", "'params.mlflow.sweep' is bookkeeping"),
    ("params:\n  data.validation: {choices: [0, 5000]}",
     "'params.data.validation' can be 0: such a trial has no validation split"),
    ("params: {}", "'params' is {}; expected a mapping of params keys"),
    ("params:\n  train.lr: {low: 0.001, high: 0.01}\ntrain.lr: 0.003",
     "'train.lr' is both searched and fixed; keep one"),
    ("metric: eval/test_iw/nll",
     "a test-set metric: a search chooses on the validation split, and the test set is reported "
     "once for the winner. Use its validation twin, metric: eval/val_iw/nll."),
    ("metric: eval/latent/probe_accuracy", "metric: eval/val_latent/probe_accuracy."),
    ("metric: epoch/test/neg_elbo", "metric: epoch/val/neg_elbo."),
    ("metric: eval/val_iw/nl",
     "not a validation metric a run has. Did you mean 'eval/val_iw/nll'?"),
    ("params:\n  train.lr: {low: 0.01, high: 0.01}", "low 0.01 >= high 0.01; low must be"),
    ("direction: maximize", "'direction' is maximize but eval/val_iw/nll is better lower: use "
     "direction: minimize."),
    ("direction: up", "'direction' is 'up'; expected minimize or maximize"),
    ("metric: eval/val_latent/probe_accuracy",
     "pruning reads the per-epoch validation -ELBO (lower is better), which cannot judge a "
     "search that maximizes eval/val_latent/probe_accuracy; set pruner: none."),
    ("pruner: medain", "'pruner' is 'medain'; expected one of median, hyperband, none. Did you "
     "mean 'median'?"),
    ("pruner: {name: hyperband, startup_trials: 2}", "'hyperband' takes none"),
    ("pruner: {name: median, warmup: 2}", "unknown entry 'warmup'. Did you mean 'warmup_epochs'?"),
    ("pruner: {name: median, startup_trials: -1}", "'pruner.startup_trials' is -1"),
    ("trials: 0", "'trials' is 0; expected an integer >= 1"),
    ("trials: true", "'trials' is True; expected an integer >= 1"),
    ("jobs: 0", "'jobs' is 0; expected an integer >= 1"),
    ("seed: -3", "'seed' is -3; expected an integer >= 0"),
    ("confirm: {top: 1, seeds: [1, 2]}", "a winner is named only against a runner-up"),
    ("confirm: {top: 20, seeds: [1, 2]}", "'confirm.top' is 20, more than the 16 trials"),
    ("confirm: {top: 3, seeds: [1]}", "two or more train.seed values"),
    ("confirm: {top: 3, seeds: [1, 1]}", "lists a seed twice"),
    ("confirm: {top: 3, seeds: [0, 1]}",
     "'confirm.seeds' has 0, the train.seed every trial ran with"),
    ("confirm: {top: 3, sedes: [1, 2]}", "unknown entry 'sedes'. Did you mean 'seeds'?"),
    ("train.epoch: 2", "'train.epoch' in 'train.epoch' is not a params key. Did you mean "
     "'train.epochs'?"),
    ("train.epochs: 0", "the fixed override train.epochs: 0 is refused by the params schema: "
     "'train.epochs' is 0; expected an integer >= 1"),
    ("mlflow.experiment: other", "'mlflow.experiment' is the search's own bookkeeping"),
    ("data.validation: 0", "data.validation is 0, so the runs have no validation split"),
    ("train.epochs: 1", "pruning stops trials between epochs, and train.epochs is 1"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_each_mistake_is_one_clear_error(change, message):
    doc = yaml.safe_load(GOOD)
    changes = yaml.safe_load(change)
    if "params" in changes:  # a change of the searched keys replaces them
        doc["params"] = {}
    doc |= changes
    with pytest.raises(VaelabError) as error:
        search_file.parse(doc, Path("searches/good.yaml"), PARAMS, PIPELINE)
    assert str(error.value).startswith("searches/good.yaml: ")
    assert message in str(error.value)


def test_a_key_no_stage_reads_is_refused():
    """loss.beta, with a pipeline whose stages list no loss key: changing it would change no
    result, and the search would compare noise."""
    pipeline = json.loads(json.dumps(PIPELINE))
    pipeline["stages"]["train"]["params"].remove("loss")
    pipeline["stages"]["evaluate"]["params"].remove("loss.likelihood")
    pipeline["stages"]["plot"]["params"].remove("loss.likelihood")
    with pytest.raises(VaelabError, match=r"'params.loss.beta' is read by no stage of dvc.yaml"):
        parse("params:\n  loss.beta: {low: 0.5, high: 1.0}\ntrials: 4\n", pipeline=pipeline)
    assert parse("params:\n  loss.beta: {low: 0.5, high: 1.0}\ntrials: 4\n").space


def test_a_name_that_cannot_name_experiments_is_refused():
    with pytest.raises(VaelabError, match=r"the search's name 'my search'"):
        parse(GOOD, name="my search")


def test_a_missing_file_and_broken_yaml_are_named(tmp_path):
    with pytest.raises(VaelabError, match=r"no such search file"):
        search_file.load(tmp_path / "none.yaml", PROJECT / "params.yaml", PROJECT / "dvc.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("params: [\n")
    with pytest.raises(VaelabError, match=r"broken.yaml: not valid YAML"):
        search_file.load(broken, PROJECT / "params.yaml", PROJECT / "dvc.yaml")


def test_the_validation_metrics_are_those_a_run_has():
    """Against reports/metrics.json as the evaluate stage wrote it (its validation sections, as
    record logs them: eval/<section>/<key>, counts left out) and the history's columns."""
    from vaelab.history import heldout_columns
    from vaelab.tracking.record import flatten_metrics

    written = flatten_metrics(json.loads((PROJECT / "reports" / "metrics.json").read_text()))
    validation = {k for k in written if k.startswith("eval/val")}
    assert set(search_file.VALIDATION_METRICS) == validation | set(heldout_columns("val"))


def test_values_are_written_as_dvc_s_overrides_read_them():
    assert search_file.override([512, 512]) == "[512, 512]"
    assert search_file.override(1e-05) == "1e-05"
    assert search_file.override(0.001) == "0.001"
    assert search_file.override(True) == "true"
    assert search_file.override("relu") == "relu"
    assert search_file.override(8) == "8"
