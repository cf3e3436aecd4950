"""The validation split (data.validation), early stopping (train.patience) and the kept epoch
(train.keep): which images are held out, that training never sees them, and that stopping and
keeping follow the validation curve, also across a resume (one process and two DDP ranks)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import N_TEST, N_TRAIN, N_VAL, write_fake_mnist
from vaelab import training
from vaelab.data import hold_out, load_split, prepare_custom, training_data
from vaelab.errors import VaelabError
from vaelab.params import load as parse_params
from vaelab.params import parse

CPU = torch.device("cpu")
TIMING = {"epoch_seconds", "images_per_second"}
IDX_HEADER = 16  # magic, count, rows, columns: four big-endian int32


def _with(params, **sections):
    """``params`` with some keys replaced: _with(p, train={"epochs": 3})."""
    return dataclasses.replace(
        params,
        **{
            name: dataclasses.replace(getattr(params, name), **values)
            for name, values in sections.items()
        },
    )


def _train(params, data_dir, **kwargs):
    train_x, heldout_x = training_data(data_dir, params.data.validation)
    return training.train_model(params, train_x, heldout_x, device=CPU, **kwargs)


def _curve(monkeypatch, values: list[float]) -> None:
    """The held-out pass returns ``values[epoch - 1]`` as the validation -ELBO (a hand-made
    curve); training itself runs for real."""

    def pass_(model, images, *, params, epoch):
        return {"neg_elbo": values[epoch - 1], "recon": values[epoch - 1], "kl": 0.0}

    monkeypatch.setattr(training, "heldout_pass", pass_)


def _rows(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


# ----------------------------------------------------------------------------- the split


def test_the_validation_split_is_the_last_n_images_of_the_training_file(fake_data_dir):
    """Read straight from the IDX file's bytes: image i is bytes 16 + 784 i ... of the file. The
    held-out images are the file's last N_VAL, the images trained on its first N_TRAIN, and the
    test file is not read when there is a validation split."""
    raw = (fake_data_dir / "raw" / "train-images-idx3-ubyte").read_bytes()
    count = int.from_bytes(raw[4:8], "big")
    assert count == N_TRAIN + N_VAL
    pixels = np.frombuffer(raw[IDX_HEADER:], dtype=np.uint8).reshape(count, 28, 28)
    labels_raw = (fake_data_dir / "raw" / "train-labels-idx1-ubyte").read_bytes()
    labels = np.frombuffer(labels_raw[8:], dtype=np.uint8)

    (train_x, train_y), (val_x, val_y) = hold_out(*load_split(fake_data_dir, train=True), N_VAL)
    assert np.array_equal(val_x.numpy(), pixels[count - N_VAL :])
    assert np.array_equal(val_y.numpy(), labels[count - N_VAL :])
    assert np.array_equal(train_x.numpy(), pixels[: count - N_VAL])
    assert np.array_equal(train_y.numpy(), labels[: count - N_VAL])

    # The train stage's reading: no test image (the test files are gone and nothing fails).
    (fake_data_dir / "raw" / "t10k-images-idx3-ubyte").unlink()
    trained_on, heldout = training_data(fake_data_dir, N_VAL)
    assert np.array_equal(heldout.numpy(), pixels[count - N_VAL :])
    assert np.array_equal(trained_on.numpy(), pixels[: count - N_VAL])
    with pytest.raises(VaelabError, match="t10k-images-idx3-ubyte"):
        training_data(fake_data_dir, 0)  # without a split the held-out pass is the test set


def test_validation_0_trains_on_the_whole_file_and_holds_out_the_test_set(fake_data_dir):
    raw = (fake_data_dir / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    test = np.frombuffer(raw[IDX_HEADER:], dtype=np.uint8).reshape(N_TEST, 28, 28)
    trained_on, heldout = training_data(fake_data_dir, 0)
    assert len(trained_on) == N_TRAIN + N_VAL
    assert np.array_equal(heldout.numpy(), test)


def test_a_validation_split_that_leaves_nothing_to_train_on_is_refused(fake_data_dir, tiny_params):
    whole = N_TRAIN + N_VAL
    with pytest.raises(VaelabError, match=rf"'data.validation' is {whole}.*{whole} images"):
        training_data(fake_data_dir, whole)
    # One batch must fit in what is left: 393 - 370 = 23 images < batch 32.
    params = _with(tiny_params, data={"validation": whole - 23})
    with pytest.raises(
        VaelabError, match=r"'train.batch_size' is 32.*\(23 images\).*fewer than 370 images"
    ):
        _train(params, fake_data_dir)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"patience": 3}, "'train.patience' is 3 but 'data.validation' is 0"),
        ({"keep": "best"}, "'train.keep' is 'best' but 'data.validation' is 0"),
    ],
)
def test_choosing_without_a_validation_split_is_refused(tiny_params, train, message):
    raw = dataclasses.asdict(tiny_params)
    raw["data"]["validation"] = 0
    raw["train"].update(train)
    with pytest.raises(VaelabError, match=message):
        parse(raw)
    raw["data"]["validation"] = 10
    assert parse(raw).train == dataclasses.replace(tiny_params.train, **train)


@pytest.fixture
def poisoned_data_dir(tmp_path: Path) -> Path:
    """The fake MNIST with every validation image white (all 255): the training images have a
    dark background (at most 0.1 * 255 there), so a white input in a training step can only be
    a validation image."""
    folder = tmp_path / "poisoned"
    write_fake_mnist(folder)
    path = folder / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[IDX_HEADER + N_TRAIN * 784 :] = b"\xff" * (N_VAL * 784)
    path.write_bytes(bytes(raw))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][path.name]["md5"] = hashlib.md5(raw).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    prepare_custom(tmp_path / "MNIST", folder, log=lambda message: None)
    return tmp_path / "MNIST"


@pytest.mark.parametrize("binarize", ["none", "dynamic", "static"])
def test_no_training_step_sees_a_validation_image(
    tiny_params, poisoned_data_dir, monkeypatch, binarize
):
    """Every input of every training step over two epochs is recorded: none is a white image
    (a validation image, binarised or not), and all N_TRAIN training images were seen."""
    seen = []
    make_train_step = training.make_train_step

    def recording(model, optimizer, **kwargs):
        step = make_train_step(model, optimizer, **kwargs)

        def recorded(x, eps, kl_weight, divisor):
            seen.append(x.detach().clone())
            return step(x, eps, kl_weight, divisor)

        return recorded

    monkeypatch.setattr(training, "make_train_step", recording)
    likelihood = "gaussian" if binarize == "none" else "bernoulli"
    params = _with(tiny_params, data={"binarize": binarize}, loss={"likelihood": likelihood})
    _train(params, poisoned_data_dir)
    inputs = torch.cat(seen).flatten(start_dim=1)  # (steps x batch, 784)
    assert len(inputs) == 2 * N_TRAIN
    white = (inputs == 1.0).all(dim=1)
    assert not white.any()
    # The poison is visible: the validation images themselves are white.
    _, heldout = training_data(poisoned_data_dir, N_VAL)
    assert bool((heldout == 255).all())


# ----------------------------------------------------------------------------- early stopping


# A hand-made validation curve and what it dictates (worked out by hand): the best is epoch 4
# (8.0; 8.0 at epoch 6 is a tie, not a new best), then 8.5, 8.0, 8.2 at epochs 5-7 bring none.
CURVE = [10.0, 9.0, 9.5, 8.0, 8.5, 8.0, 8.2, 7.0, 6.0, 5.0]
BEST = [1, 2, 2, 4, 4, 4, 4, 8, 9, 10]


def test_the_best_epoch_and_the_epochs_since_it_follow_the_curve():
    history: list[dict] = []
    for epoch, value in enumerate(CURVE, start=1):
        row = {"epoch": epoch, "epoch/val/neg_elbo": value}
        history.append(row | training.best_so_far(history, row))
    assert [r["train.best_epoch"] for r in history] == BEST
    assert [r["train.epochs_since_best"] for r in history] == [
        e - b for e, b in enumerate(BEST, start=1)
    ]
    # patience 3 runs out after epoch 7 (epochs 5, 6, 7 without a new best), 4 never does here.
    ran_out = [training.patience_ran_out(history[:e], 3) for e in range(1, 11)]
    assert ran_out == [False] * 6 + [True] + [False] * 3
    assert not any(training.patience_ran_out(history[:e], 4) for e in range(1, 11))
    assert not any(training.patience_ran_out(history[:e], 0) for e in range(1, 11))


@pytest.mark.parametrize(("patience", "stops_after"), [(3, 7), (2, 6), (4, 10), (0, 10)])
def test_training_stops_where_the_curve_and_patience_say(
    tiny_params, fake_data_dir, monkeypatch, patience, stops_after
):
    _curve(monkeypatch, CURVE)
    params = _with(tiny_params, train={"epochs": 10, "patience": patience})
    _, history = _train(params, fake_data_dir)
    assert [r["epoch"] for r in history] == list(range(1, stops_after + 1))
    assert [r["epoch/val/neg_elbo"] for r in history] == CURVE[:stops_after]
    reason = training.stop_reason(history, params)
    if stops_after < 10:
        assert reason.startswith(f"early stop after epoch {stops_after} of 10")
        assert f"the best was epoch {BEST[stops_after - 1]}" in reason
    else:
        assert reason == "train.epochs (10) reached"


def test_keep_best_is_the_best_epoch_s_weights_bitwise(tiny_params, fake_data_dir, monkeypatch):
    """With the curve above and patience 3, training stops after epoch 7 and keeps epoch 4: the
    very weights a run of 4 epochs (same seed, keep last) ends with, and not the last ones."""
    _curve(monkeypatch, CURVE)
    best_model, history = _train(
        _with(tiny_params, train={"epochs": 10, "patience": 3, "keep": "best"}), fake_data_dir
    )
    assert len(history) == 7
    four_epochs, _ = _train(_with(tiny_params, train={"epochs": 4}), fake_data_dir)
    seven_epochs, _ = _train(_with(tiny_params, train={"epochs": 7}), fake_data_dir)
    for key, value in best_model.state_dict().items():
        assert torch.equal(value, four_epochs.state_dict()[key]), key
    assert not all(
        torch.equal(v, seven_epochs.state_dict()[k]) for k, v in best_model.state_dict().items()
    )


def _snapshot_bytes(snapshot: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)  # a deep copy, as a checkpoint file holds it
    return buffer.getvalue()


@pytest.mark.parametrize("resume_after", [2, 5, 7])
def test_a_run_resumed_mid_patience_equals_the_uninterrupted_one(
    tiny_params, fake_data_dir, monkeypatch, resume_after
):
    """Resumed from the checkpoint of epoch 2 (before the best), 5 (mid-patience: the best
    weights live only in the checkpoint) or 7 (the epoch patience ran out: it must not train on):
    the same epochs, history and final weights, bit for bit."""
    _curve(monkeypatch, CURVE)
    params = _with(tiny_params, train={"epochs": 10, "patience": 3, "keep": "best"})
    snapshots = {}
    whole, history = _train(
        params,
        fake_data_dir,
        on_state=lambda s: snapshots.__setitem__(s["epoch"], _snapshot_bytes(s)),
    )
    saved = torch.load(io.BytesIO(snapshots[resume_after]), weights_only=True)
    resumed, resumed_history = _train(params, fake_data_dir, resume=saved)
    assert _rows(resumed_history) == _rows(history)
    assert len(history) == 7
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# Two gloo ranks through a file store (no torchrun: seconds), training the tiny params with a
# hand-made validation curve (rank 0 alone computes it, as in the loop) and patience 3, keep best:
# once straight through, writing rank 0's checkpoint of epoch RESUME; then again, every rank
# resuming from that checkpoint. Rank 0 prints the epochs trained and a digest of the kept weights.
# argv: RANK STORE-FILE DATA-DIR PARAMS-JSON CHECKPOINT RESUME
TWO_RANKS_RESUME = """
import hashlib, io, json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from vaelab import distributed, training
from vaelab.data import training_data
from vaelab.params import load as parse_params
from vaelab.params import parse

rank, store, data_dir, raw, checkpoint, resume_after = sys.argv[1:7]
rank, resume_after = int(rank), int(resume_after)
curve = %(curve)r
training.heldout_pass = lambda model, images, *, params, epoch: {
    "neg_elbo": curve[epoch - 1], "recon": curve[epoch - 1], "kl": 0.0}
params = parse(json.loads(raw))
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
world = distributed.World(rank=rank, size=2, local_rank=rank, local_size=2)
train_x, heldout_x = training_data(Path(data_dir), params.data.validation)

def save(snapshot):
    if snapshot["epoch"] == resume_after:
        torch.save(snapshot, checkpoint)

def digest(model):
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode() + tensor.numpy().tobytes())
    return h.hexdigest()[:16]

cpu = torch.device("cpu")
model, history = training.train_model(
    params, train_x, heldout_x, device=cpu, world=world, on_state=save)
whole = (len(history), digest(model))
dist.barrier()
resume = torch.load(checkpoint, weights_only=True)
model, history = training.train_model(
    params, train_x, heldout_x, device=cpu, world=world, resume=resume)
if rank == 0:
    print("whole", *whole)
    print("resumed", len(history), digest(model))
dist.destroy_process_group()
"""


def test_two_ranks_resumed_mid_patience_stop_at_the_same_epoch_with_the_same_weights(
    tmp_path, tiny_params, fake_data_dir
):
    params = _with(tiny_params, train={"epochs": 10, "patience": 3, "keep": "best"})
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS_RESUME % {"curve": CURVE})
    args = [
        str(tmp_path / "store"),
        str(fake_data_dir),
        json.dumps(dataclasses.asdict(params)),
        str(tmp_path / "checkpoint.pt"),
        "5",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    try:  # a rank left waiting for the other would hang: 2 minutes, then both are ended
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    lines = dict(line.split(" ", 1) for line in outputs[0][0].splitlines())
    assert lines["whole"].split()[0] == "7"  # stopped where the curve says, on both ranks
    assert lines["resumed"] == lines["whole"]


def test_the_train_stage_reads_no_test_image_and_logs_the_best_epoch_and_why_it_stopped(
    tmp_path, fake_data_dir, monkeypatch
):
    """The stage with a validation split, the test files deleted: it trains, logs epoch/val/*
    and train.best_epoch every epoch, the validation split as a dataset input, and why training
    ended. The history's held-out columns are the validation split's."""
    from tests.test_faults import client, train_args, write_params
    from vaelab import history, train

    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (fake_data_dir / "raw" / name).unlink()
    store = tmp_path / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    params = write_params(tmp_path / "params.yaml", epochs=3, patience=2, keep="best")
    train.main(train_args(params, fake_data_dir, tmp_path))

    rows = history.read(tmp_path / "history.csv")
    assert list(rows[0]) == list(history.columns("val"))
    mlflow = client(store)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("vaelab").experiment_id])
    steps = mlflow.get_metric_history(run.info.run_id, "train.best_epoch")
    assert sorted((m.step, m.value) for m in steps) == [
        (r["epoch"], r["train.best_epoch"]) for r in rows
    ]
    assert mlflow.get_metric_history(run.info.run_id, "epoch/test/neg_elbo") == []
    assert run.data.tags["vaelab.stopped"] == training.stop_reason(rows, parse_params(params))
    assert run.data.tags["vaelab.kept"] == "best"
    contexts = {i.tags[0].value: i.dataset.name for i in run.inputs.dataset_inputs}
    assert contexts == {
        "training": f"custom train[0:{N_TRAIN}]",
        "validation": f"custom validation[{N_TRAIN}:{N_TRAIN + N_VAL}]",
        "test": "custom test",
    }
    assert run.data.params["data.validation"] == str(N_VAL)
