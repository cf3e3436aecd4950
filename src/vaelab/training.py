"""The training loop: ``train_model`` and the pieces it is made of (the training state with its
snapshot and restore, one epoch's pass, the test pass, the history row).

The held-out pass after every epoch runs on the validation split (``data.validation`` > 0:
the last N training images, which the caller keeps out of ``train_images``) and drives early
stopping (``train.patience``) and the kept epoch (``train.keep``); without a validation split it
runs on the test set, as the tutorial's loop does, and chooses nothing.

Pure training: no files, no MLflow. The train stage (``vaelab.train``) hands in callbacks that
write checkpoints and log epochs; the benchmark (``vaelab.bench``) runs the same loop.

The whole data set stays on the device as uint8; each batch is an index slice of a seeded
permutation. Seeded runs on the CPU are bit-identical, and so is a resumed one.

Under DDP (``world.size`` > 1) every rank draws the same permutation, binarisation and noise for
the whole global batch (``train.batch_size``) and trains on its slice of it, so the maths is the
single-process run's up to the order of float reductions. Epoch sums are all-reduced; only rank 0
evaluates the test set and calls ``on_state``/``on_epoch``; all ranks stop at the same step
(``distributed.StopAgreement``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vaelab import distributed
from vaelab.data import evaluation_images, training_images
from vaelab.errors import VaelabError
from vaelab.model import VAE, dataset_elbo, images_to_float
from vaelab.optim import TrainStep, adam, kl_weights, learning_rate, make_train_step
from vaelab.params import Params


def check_batch_size(batch_size: int, n_images: int, validation: int = 0) -> None:
    if batch_size > n_images:
        fewer = f", or hold out fewer than {validation} images (data.validation)"
        raise VaelabError(
            f"params.yaml: 'train.batch_size' is {batch_size}, larger than the training set "
            f"({n_images} images). Choose a batch size <= {n_images}"
            + (fewer if validation else "")
            + "."
        )


@torch.no_grad()
def set_output_bias(model: VAE, images: torch.Tensor) -> None:
    """model.output_bias data_mean: the decoder's last bias := the logit of each pixel's mean over
    the training images (uint8 (N, 28, 28)), the mean clipped to [0.001, 0.999] so the logit stays
    finite (Burda et al.'s code, github.com/yburda/iwae, datasets.py ``get_train_bias_np``). The
    decoder then starts at the average image instead of at grey."""
    total = torch.zeros(28 * 28, dtype=torch.float64, device=images.device)
    for start in range(0, len(images), 10_000):  # bounded memory
        chunk = images[start : start + 10_000]
        total += chunk.flatten(start_dim=1).double().sum(dim=0) / 255
    mean = (total / len(images)).clamp(0.001, 0.999)  # (784,)
    if model.arch == "conv":  # ConvTranspose2d to one channel: one bias, from the mean pixel
        mean = mean.mean().reshape(1)
    last = model.decoder[-1]
    last.bias.copy_(torch.log(mean / (1 - mean)).to(last.bias.dtype))


@dataclass
class TrainingState:
    """Everything an epoch boundary needs to go on exactly as an uninterrupted run would: the
    model, the optimizer, the history so far and every RNG state. ``snapshot`` is the one place
    that writes it out (a checkpoint is a snapshot plus what it must match) and ``restore`` the
    one place that puts it back."""

    model: VAE
    optimizer: torch.optim.Optimizer
    order: torch.Generator  # the batch order's own stream
    history: list[dict[str, float]]
    # train.keep: best: the best epoch's weights so far (a copy, on the device), else None.
    best_weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def create(cls, params: Params, device: torch.device) -> TrainingState:
        torch.manual_seed(params.train.seed)  # initial weights and the reparameterisation noise
        order = torch.Generator(device=device).manual_seed(params.train.seed)
        model = VAE(**params.model.architecture()).to(device)
        return cls(model, adam(model, params.train), order, [])

    def snapshot(self) -> dict:
        device = self.order.device
        return {
            "epoch": len(self.history),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": list(self.history),
            "rng_cpu": torch.get_rng_state(),
            "rng_order": self.order.get_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best_weights": self.best_weights,
        }

    def restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.history = list(saved["history"])
        torch.set_rng_state(saved["rng_cpu"])
        self.order.set_state(saved["rng_order"])
        if self.order.device.type == "cuda" and saved.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"], self.order.device)
        best = saved.get("best_weights")
        device = self.order.device
        self.best_weights = None if best is None else {k: v.to(device) for k, v in best.items()}

    def keep_best(self) -> None:
        """Remember the model's weights as the best epoch's (train.keep: best)."""
        self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


@dataclass(frozen=True)
class EpochPlan:
    """What every epoch does with the training images, which stay on the device: batches of
    ``batch_size`` along a permutation (the last batch may be smaller), each rank training on its
    slice of the global batch, with the loss divisors and the KL weight of every step."""

    images: torch.Tensor  # uint8 (N, 28, 28) on the device, binarised once if static
    batch_size: int
    binarize: str
    world: distributed.World
    divisors: tuple[torch.Tensor, torch.Tensor]  # loss divisors: full batches, the last one
    beta: float
    kl_warmup_epochs: int
    samples: int  # posterior samples per image (loss.samples)

    @classmethod
    def create(
        cls,
        images: torch.Tensor,
        params: Params,
        *,
        world: distributed.World,
        device: torch.device,
    ) -> EpochPlan:
        images = training_images(images, params.data.binarize).to(device)
        size = params.train.batch_size
        last_size = len(images) % size or size
        # See make_train_step: B_global / world (on one process, B: the batch mean).
        divisors = (
            torch.tensor(size / world.size, device=device),
            torch.tensor(last_size / world.size, device=device),
        )
        return cls(
            images,
            size,
            params.data.binarize,
            world,
            divisors,
            params.loss.beta,
            params.train.kl_warmup_epochs,
            params.loss.samples,
        )

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def kl_weights(self, epoch: int) -> torch.Tensor:
        """The KL weight of every step of ``epoch``, (n_batches,), on the device."""
        return kl_weights(
            self.beta,
            warmup_epochs=self.kl_warmup_epochs,
            epoch=epoch,
            n_batches=self.n_batches,
            device=self.device,
        )

    def batch(
        self, permutation: torch.Tensor, step: int, latent_dims: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``step``'s images x (B, 1, 28, 28) in [0, 1], their noise eps ((B, latent), or
        (B, k, latent) with k > 1 samples per image) and the loss divisor. The binary sample and
        the noise are drawn for the whole global batch on every rank (the single-process draws);
        a rank keeps its slice (maybe empty)."""
        index = permutation[step * self.batch_size : (step + 1) * self.batch_size]
        x = images_to_float(self.images[index])
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)  # a fresh binary sample each time an image is seen
        shape = (len(x), latent_dims) if self.samples == 1 else (len(x), self.samples, latent_dims)
        eps = torch.randn(shape, device=x.device)
        if self.world.size > 1:
            x = x.tensor_split(self.world.size)[self.world.rank]
            eps = eps.tensor_split(self.world.size)[self.world.rank]
        return x, eps, self.divisors[0 if step < self.n_batches - 1 else 1]


@dataclass(frozen=True)
class EpochResult:
    """One epoch over all ranks: per-image means over the training set of the loss, recon and KL,
    the first step whose loss was not finite (1-based; -1: none) and the images trained on."""

    loss: float
    recon: float
    kl: float
    first_bad_step: int
    images: int


def train_epoch(
    state: TrainingState,
    plan: EpochPlan,
    *,
    epoch: int,
    train_step: TrainStep,
    should_stop: Callable[[], bool],
) -> EpochResult:
    """Epoch ``epoch``'s pass over the training set in a seeded order. Sums and the first bad step
    stay on the device during the pass (no host sync per step); ``should_stop`` is asked before
    every step and raises KeyboardInterrupt between two steps."""
    data, device = plan, plan.device
    kl_weight = plan.kl_weights(epoch)
    state.model.train()
    permutation = torch.randperm(len(data.images), generator=state.order, device=device)
    sums = torch.zeros(3, device=device)  # (loss, recon, kl) summed over images
    first_bad_step = torch.tensor(-1, device=device)
    local_images = 0  # images this rank trained on (all ranks together: the data set)
    label = f"epoch {epoch}"
    bar = tqdm(range(data.n_batches), desc=label, leave=False, disable=None, unit="batch")
    for step in bar:
        if should_stop():
            raise KeyboardInterrupt
        x, eps, divisor = data.batch(permutation, step, state.model.latent_dims)
        batch_sums = train_step(x, eps, kl_weight[step], divisor)
        local_images += len(x)
        sums += batch_sums
        bad = (first_bad_step < 0) & ~torch.isfinite(batch_sums[0])
        first_bad_step = torch.where(bad, step + 1, first_bad_step)
        if not bar.disable and step % 50 == 0:
            bar.set_postfix(loss=f"{sums[0].item() / ((step + 1) * data.batch_size):.2f}")
    return gather_epoch(data, sums=sums, first_bad_step=first_bad_step, local_images=local_images)


def gather_epoch(
    data: EpochPlan, *, sums: torch.Tensor, first_bad_step: torch.Tensor, local_images: int
) -> EpochResult:
    """Combine the ranks' epoch (sums, the earliest bad step, image counts); one host sync."""
    world, n_batches = data.world, data.n_batches
    if world.size > 1:
        distributed.all_reduce(sums, world)
        # The earliest bad step of any rank (none: a step number past the end).
        first_bad_step = torch.where(first_bad_step < 0, n_batches + 1, first_bad_step)
        distributed.all_reduce(first_bad_step, world, op="min")
        first_bad_step = torch.where(first_bad_step > n_batches, -1, first_bad_step)
    images = distributed.all_reduce(torch.tensor(local_images, device=sums.device), world)
    loss, recon, kl = (sums / len(data.images)).tolist()
    return EpochResult(loss, recon, kl, int(first_bad_step), int(images))


def heldout_split(params: Params) -> str:
    """The split the per-epoch held-out pass runs on: "val" with a validation split, else
    "test" (data.validation: 0)."""
    return "val" if params.data.validation > 0 else "test"


def heldout_pass(
    model: VAE, images: torch.Tensor, *, params: Params, epoch: int
) -> dict[str, float]:
    """The held-out images' ELBO after ``epoch`` (nats per image), with noise of its own seed,
    so that evaluating never shifts training's RNG."""
    seed = params.train.seed * 100_003 + epoch
    noise = torch.Generator(device=images.device).manual_seed(seed)
    return dataset_elbo(model, images, params.loss.likelihood, noise)


def check_diverged(
    result: EpochResult,
    heldout: dict[str, float],
    *,
    epoch: int,
    plan: EpochPlan,
    lr: float,
    cfg_lr: float,
    split: str = "test",
) -> None:
    """Raise the divergence error if a step's loss was not finite, or if the held-out ELBO is
    not: a step's loss is computed before its update, so an update that breaks the model in the
    last (or only) step of an epoch shows in no loss. Rank 0 alone has ``heldout``; its verdict
    reaches every rank (a MIN all-reduce: one rank's NaN is everyone's), so all stop together."""
    heldout_finite = distributed.all_true(
        math.isfinite(heldout.get("neg_elbo", 0.0)), plan.world, plan.device
    )
    bad_step = result.first_bad_step
    if bad_step < 0 and math.isfinite(result.loss) and heldout_finite:
        return
    name = {"val": "validation", "test": "test"}[split]
    what = (
        f"the training loss became NaN or infinite at epoch {epoch}, step {bad_step} "
        f"of {plan.n_batches}"
        if bad_step > 0
        else f"the {name} ELBO became NaN or infinite after epoch {epoch}"
    )
    kept = f"The checkpoint of epoch {epoch - 1} is kept. " if epoch > 1 else ""
    rate = f"now {lr}" if lr == cfg_lr else f"{cfg_lr}; this epoch's scheduled rate was {lr}"
    raise VaelabError(f"{what}: training diverged. {kept}Lower train.lr ({rate}) and run again.")


def history_row(
    epoch: int,
    result: EpochResult,
    *,
    heldout: dict[str, float],
    seconds: float,
    n_images: int,
    lr: float,
    split: str = "test",
) -> dict[str, float]:
    """The epoch's row of the history (``vaelab.history.columns(split)``) but the best-epoch
    columns (``best_so_far``)."""
    return {
        "epoch": epoch,
        "epoch/train/loss": result.loss,
        "epoch/train/lr": lr,
        "epoch/train/neg_elbo": result.recon + result.kl,
        "epoch/train/recon": result.recon,
        "epoch/train/kl": result.kl,
        f"epoch/{split}/neg_elbo": heldout["neg_elbo"],
        f"epoch/{split}/recon": heldout["recon"],
        f"epoch/{split}/kl": heldout["kl"],
        "epoch_seconds": seconds,
        "images_per_second": n_images / seconds,
        "epoch/train/images": result.images,
    }


def best_so_far(history: list[dict[str, float]], row: dict[str, float]) -> dict[str, int]:
    """The best-epoch columns of ``row``, the epoch after ``history``: the epoch of the lowest
    validation -ELBO so far (an epoch must be strictly lower to become the best; a tie keeps the
    earlier one) and how many epochs have passed since it."""
    epoch = int(row["epoch"])
    best_epoch = epoch
    if history:  # rows of epochs 1, 2, ...: the best so far is row best_epoch - 1
        previous = int(history[-1]["train.best_epoch"])
        if not row["epoch/val/neg_elbo"] < history[previous - 1]["epoch/val/neg_elbo"]:
            best_epoch = previous
    return {"train.best_epoch": best_epoch, "train.epochs_since_best": epoch - best_epoch}


def patience_ran_out(history: list[dict[str, float]], patience: int) -> bool:
    """Whether early stopping ends training after ``history``'s last epoch: ``patience`` > 0
    epochs have passed without a new best validation -ELBO."""
    return patience > 0 and bool(history) and history[-1]["train.epochs_since_best"] >= patience


def stop_reason(history: list[dict[str, float]], params: Params) -> str:
    """Why training ended, in words (the run's ``vaelab.stopped`` tag)."""
    stopped_early = history and int(history[-1]["epoch"]) < params.train.epochs
    if stopped_early and patience_ran_out(history, params.train.patience):
        last, best = int(history[-1]["epoch"]), int(history[-1]["train.best_epoch"])
        return (
            f"early stop after epoch {last} of {params.train.epochs}: no new best validation "
            f"-ELBO for {params.train.patience} epochs (train.patience); the best was epoch {best}"
        )
    return f"train.epochs ({params.train.epochs}) reached"


def print_epoch(row: dict[str, float], epochs: int) -> None:
    split = "val" if "epoch/val/neg_elbo" in row else "test"
    best = ""
    if "train.best_epoch" in row:
        since = int(row["train.epochs_since_best"])
        best = "  (best)" if since == 0 else f"  (best: epoch {int(row['train.best_epoch'])})"
    print(
        f"epoch {row['epoch']:3d}/{epochs}  train -ELBO {row['epoch/train/neg_elbo']:9.3f}  "
        f"{split} -ELBO {row[f'epoch/{split}/neg_elbo']:9.3f}  ({row['epoch_seconds']:.1f} s, "
        f"{row['images_per_second']:,.0f} img/s){best}",
        flush=True,
    )


def prepare(
    params: Params, train_images: torch.Tensor, *, device: torch.device, world: distributed.World
) -> tuple[TrainingState, EpochPlan, TrainStep]:
    """A fresh training state, the epoch plan for ``train_images`` and the step that trains the
    state's model (wrapped in DDP under several ranks)."""
    check_batch_size(params.train.batch_size, len(train_images), params.data.validation)
    state = TrainingState.create(params, device)
    plan = EpochPlan.create(train_images, params, world=world, device=device)
    if params.model.output_bias == "data_mean":  # before the wrap, which broadcasts rank 0's
        set_output_bias(state.model, plan.images)
    train_step = make_train_step(
        distributed.wrap(state.model, world),
        state.optimizer,
        likelihood=params.loss.likelihood,
        objective=params.loss.objective,
        compile=params.train.compile,
    )
    return state, plan, train_step


def train_model(
    params: Params,
    train_images: torch.Tensor,
    heldout_images: torch.Tensor,
    *,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] = lambda row: None,
    on_state: Callable[[dict], None] = lambda snapshot: None,
    resume: dict | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    world: distributed.World = distributed.SINGLE_PROCESS,
) -> tuple[VAE, list[dict[str, float]]]:
    """Train on uint8 images (N, 28, 28); return the model and one history row per epoch.

    ``heldout_images``: the validation split (``data.validation`` > 0), else the test set; the
    ELBO on them after each epoch is the history's ``epoch/val/*`` (``epoch/test/*``). With a
    validation split, training stops early once ``train.patience`` epochs have brought no new
    best validation -ELBO, and with ``train.keep: best`` the returned model holds the best
    epoch's weights (else the last epoch's).

    After each epoch ``on_state`` gets ``TrainingState.snapshot()``, then ``on_epoch`` the row
    (rank 0 only); such a snapshot as ``resume`` continues exactly as the uninterrupted run
    would have, on every rank (all ranks hold rank 0's state: the same model, optimizer and
    random streams), also with another number of ranks (up to the order of float sums), and
    stops early at the same epoch with the same best weights.
    ``stop_requested`` is polled before every step: KeyboardInterrupt between two steps.
    """
    cfg = params.train
    split = heldout_split(params)
    state, plan, train_step = prepare(params, train_images, device=device, world=world)
    should_stop = distributed.StopAgreement(stop_requested, world)  # ranks stop at one step
    heldout_images = evaluation_images(heldout_images, params.data.binarize, split).to(device)
    if resume is not None:  # after the output bias: the checkpoint's weights win
        state.restore(resume)
    try:
        for epoch in range(len(state.history) + 1, cfg.epochs + 1):
            # A resumed run whose last epoch used up the patience (all ranks restored the same
            # history): it stops where the uninterrupted run stopped.
            if patience_ran_out(state.history, cfg.patience):
                break
            lr = learning_rate(cfg, epoch)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            result = train_epoch(
                state, plan, epoch=epoch, train_step=train_step, should_stop=should_stop
            )
            seconds = time.perf_counter() - started
            heldout = {}
            if world.is_main:  # rank 0 evaluates, logs and reports
                heldout = heldout_pass(state.model, heldout_images, params=params, epoch=epoch)
            check_diverged(
                result, heldout, epoch=epoch, plan=plan, lr=lr, cfg_lr=cfg.lr, split=split
            )
            go_on = True
            if world.is_main:
                row = history_row(
                    epoch,
                    result,
                    heldout=heldout,
                    seconds=seconds,
                    n_images=len(train_images),
                    lr=lr,
                    split=split,
                )
                if split == "val":
                    row |= best_so_far(state.history, row)
                    if cfg.keep == "best" and row["train.epochs_since_best"] == 0:
                        state.keep_best()
                state.history.append(row)
                on_state(state.snapshot())
                print_epoch(row, cfg.epochs)
                on_epoch(row)
                go_on = not patience_ran_out(state.history, cfg.patience)
            # Rank 0 alone has the validation curve: its decision reaches every rank (MIN).
            if cfg.patience and not distributed.all_true(go_on, world, plan.device):
                break
            # Under DDP the other ranks wait for rank 0's checkpoint: a rank lost in the next
            # epoch is restarted from this one.
            distributed.barrier(world)
    finally:
        should_stop.close()
    if cfg.keep == "best" and state.best_weights is not None:
        state.model.load_state_dict(state.best_weights)
    return state.model, state.history
