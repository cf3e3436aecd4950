"""The optimisation step and what sets it each step: Adam (fused), the learning rate of an epoch
(constant, or Burda et al.'s schedule), the KL weight of each step (with warm-up), and the step
itself (optionally compiled). ``vaelab.training`` runs them; the tests check each alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaelab.model import VAE, per_image_objective
from vaelab.params import TrainParams

# A step: (x (B, 1, 28, 28), eps (B, latent) or (B, k, latent), kl_weight, divisor) -> (3,)
# batch sums.
TrainStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def adam(model: VAE, cfg: TrainParams) -> torch.optim.Adam:
    """Adam with the fused kernel (one kernel for all parameters; CPU and CUDA): measured on a
    2-core CPU, an epoch took 2.3-2.7 s with it against 4.3-4.6 s for the default (docs/speed.md).
    The learning rate is set per epoch by ``learning_rate``."""
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True
    )


# Burda, Grosse & Salakhutdinov (2016), sec. 5: stage i = 0..7 lasts 3**i epochs at
# lr = 0.001 * 10**(-i/7); 3280 epochs in all.
BURDA_STAGES = 8


def learning_rate(cfg: TrainParams, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based). constant: train.lr. burda: the paper's schedule
    with train.lr in place of its 0.001, truncated at train.epochs; past its 3280 epochs the last
    stage's rate stays."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    stage, last_epoch_of_stage = 0, 1
    while epoch > last_epoch_of_stage and stage < BURDA_STAGES - 1:
        stage += 1
        last_epoch_of_stage += 3**stage
    return cfg.lr * 10 ** (-stage / 7)


def make_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    likelihood: str,
    objective: str = "elbo",
    compile: bool,
) -> TrainStep:
    """One optimisation step on a batch x (B, 1, 28, 28) with reparameterisation noise eps
    ((B, latent), or (B, k, latent) for k samples per image), KL weight ``kl_weight`` and
    ``divisor`` (0-dim tensors on the device, so annealing never recompiles); returns the batch
    sums of (loss, recon, kl) as a (3,) tensor on the device, so the caller never syncs with the
    host. The loss is ``vaelab.model.per_image_objective``'s.

    The loss is the batch's sum of per-image losses over ``divisor``. On one process the divisor
    is B: the batch mean. Under DDP, which averages the ranks' gradients, it is
    B_global / world, so that average is the gradient of the global batch's mean, also when
    the last batch splits unevenly or leaves a rank an empty slice.

    compile=True wraps it in ``torch.compile``: on CUDA in "reduce-overhead" mode (CUDA graphs,
    no kernel launch overhead per step), elsewhere in the default mode.
    """

    def step(
        x: torch.Tensor, eps: torch.Tensor, kl_weight: torch.Tensor, divisor: torch.Tensor
    ) -> torch.Tensor:
        logits, mu, logvar = model(x, eps=eps)
        per_image, terms = per_image_objective(
            x,
            logits,
            mu,
            logvar,
            eps,
            likelihood=likelihood,
            objective=objective,
            kl_weight=kl_weight,
        )
        loss = per_image.sum() / divisor
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return torch.stack(
            [loss.detach() * divisor, terms.recon.detach().sum(), terms.kl.detach().sum()]
        )

    return _compiled(step, on_cuda=next(model.parameters()).is_cuda) if compile else step


def _compiled(step: TrainStep, *, on_cuda: bool) -> TrainStep:
    """``step`` in ``torch.compile``: CUDA graphs ("reduce-overhead") on CUDA, else the default."""
    # dynamic=False: two static shapes (full batches and the last, smaller one) compile once each.
    compiled = torch.compile(step, mode="reduce-overhead" if on_cuda else None, dynamic=False)
    if not on_cuda:
        return compiled

    def graphed_step(
        x: torch.Tensor, eps: torch.Tensor, kl_weight: torch.Tensor, divisor: torch.Tensor
    ) -> torch.Tensor:
        # Each call is a new iteration: CUDA graphs may reuse the previous output's memory (the
        # caller has already added it to its sums).
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, eps, kl_weight, divisor)

    return graphed_step


def kl_weights(
    beta: float, *, warmup_epochs: int, epoch: int, n_batches: int, device: torch.device
) -> torch.Tensor:
    """The KL weight of every step of ``epoch`` (1-based), (n_batches,): beta, or with warm-up
    beta * min(1, steps done / steps of warm-up), rising linearly step by step."""
    if warmup_epochs == 0:
        return torch.full((n_batches,), beta, device=device)
    steps = torch.arange(1, n_batches + 1, device=device, dtype=torch.float32)
    progress = (epoch - 1 + steps / n_batches) / warmup_epochs
    return beta * progress.clamp(max=1.0)
