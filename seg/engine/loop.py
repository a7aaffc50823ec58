"""The train loop, by iterations; its twin, the eval loop, is :func:`seg.evaluation.loop.evaluate`.

Everything else (building models and data, checkpoints, TensorBoard) happens in callbacks the
entry scripts pass in, so the loop stays readable top to bottom.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seg.data.palette import IGNORE_INDEX
from seg.errors import UserError
from seg.inference.tta import AMP_DTYPES
from seg.utils.distributed import current
from seg.utils.progress import show_progress_bar

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, targets) -> scalar loss


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; training stopped before any checkpoint could store its effect."""


@dataclass
class TrainState:
    """What a checkpoint must hold to resume exactly, besides the RNG streams."""

    model: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    best_miou: float = -1.0
    world_size: int = 1  # processes sharing the global batch: resume needs the same sample order


def autocast(device: torch.device, amp: str, cache: bool = True) -> ContextManager:
    """Mixed precision for ``amp`` in {"none", "bf16", "fp16"} on ``device``.

    ``cache=False`` turns off autocast's weight-cast cache, which a CUDA graph capture must not
    depend on (the cache is freed after each forward).
    """
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], cache_enabled=cache)


def segmentation_loss(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor,
                      aux_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy ignoring 255, plus ``aux_weight`` times the auxiliary head's loss when present."""
    if isinstance(output, tuple):
        logits, aux_logits = output
        aux = F.cross_entropy(aux_logits.float(), target, ignore_index=IGNORE_INDEX)
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX) + aux_weight * aux
    return F.cross_entropy(output.float(), target, ignore_index=IGNORE_INDEX)


def train_step(state: TrainState, images: torch.Tensor, targets: torch.Tensor, *, amp: str,
               aux_weight: float, grad_clip: float | None, loss_fn: LossFn | None = None) -> torch.Tensor:
    """One optimisation step; returns the loss, detached and still on the device.

    ``loss_fn(output, targets)`` replaces the segmentation loss (pretraining's classification loss).
    Reading the loss on the host would wait for the GPU every step, so :func:`train` reads a
    whole logging window at once and checks it there (:func:`host_losses`).
    """
    with autocast(images.device, amp):
        output = state.model(images)
        loss = segmentation_loss(output, targets, aux_weight) if loss_fn is None else loss_fn(output, targets)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    return loss.detach()


def host_losses(losses: list[torch.Tensor], last_iteration: int) -> list[float]:
    """The window's losses (ending at ``last_iteration``) read in one transfer; raises at the first
    non-finite one, naming its iteration."""
    values = torch.stack(losses).float().cpu().tolist() if losses else []
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at iteration {last_iteration - len(values) + 1 + offset} (found at iteration "
                f"{last_iteration}); nothing after the last validation was saved, and its last.pt is intact")
    return values


def train(state: TrainState, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, total_iters: int,
          device: torch.device, amp: str = "none", channels_last: bool = False, aux_weight: float = 0.0,
          grad_clip: float | None = None, loss_fn: LossFn | None = None, log_interval: int = 50, eval_interval: int = 1000,
          on_log: Callable[[int, dict[str, float]], None] = lambda it, scalars: None,
          on_eval: Callable[[TrainState], None] = lambda state: None) -> None:
    """Train from ``state.iteration`` to ``total_iters``, calling ``on_eval`` every ``eval_interval``.

    ``batches`` is an endless iterator of per-process (images, targets) batches.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    state.model.train()
    show_bar = show_progress_bar()
    world_size = current().world_size  # images per step, summed over the processes sharing the batch
    window_losses, window_images, window_start = [], 0, time.perf_counter()
    # The bar closes even when a step raises, so an error line is not printed into a live bar; log
    # lines (train.log, console) go through tqdm.write while it is up, so they don't tear it.
    with (tqdm(total=total_iters, initial=state.iteration, desc="train", disable=not show_bar,
               dynamic_ncols=True) as bar,
          logging_redirect_tqdm() if show_bar else nullcontext()):
        while state.iteration < total_iters:
            images, targets = next(batches)
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            loss = train_step(state, images, targets, amp=amp, aux_weight=aux_weight, grad_clip=grad_clip,
                              loss_fn=loss_fn)
            state.iteration += 1
            bar.update(1)
            window_losses.append(loss)
            window_images += images.shape[0] * world_size
            if state.iteration % log_interval == 0 or state.iteration == total_iters:
                losses = host_losses(window_losses, state.iteration)
                scalars = _window_scalars(state, device, sum(losses) / len(losses), window_images, window_start)
                bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{scalars['train/lr']:.2e}",
                                img_s=f"{scalars['train/images_per_s']:.1f}")
                log.info("iter %d/%d: loss %.4f, lr %.3e, %.1f img/s", state.iteration, total_iters,
                         scalars["train/loss"], scalars["train/lr"], scalars["train/images_per_s"])
                on_log(state.iteration, scalars)
                window_losses, window_images, window_start = [], 0, time.perf_counter()
            if state.iteration % eval_interval == 0 or state.iteration == total_iters:
                host_losses(window_losses, state.iteration)  # a diverged model must not be checkpointed
                eval_start = time.perf_counter()
                on_eval(state)
                state.model.train()
                paused = time.perf_counter() - eval_start
                _exclude_from_rate(bar, paused)
                # validation time is not training throughput; the window keeps the steps before it
                window_start += paused


def _window_scalars(state: TrainState, device: torch.device, loss: float, images: int, start: float) -> dict:
    # build_optimizer puts the decoder's groups first: param_groups[0] has the base lr, [-1] the encoder's
    groups = state.optimizer.param_groups
    scalars = {"train/loss": loss, "train/lr": groups[0]["lr"],
               "train/images_per_s": images / (time.perf_counter() - start)}
    if groups[-1]["lr"] != groups[0]["lr"]:
        scalars["train/lr_encoder"] = groups[-1]["lr"]
    if device.type == "cuda":
        scalars["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return scalars


def _exclude_from_rate(bar: tqdm, seconds: float) -> None:
    """Shift the bar's clocks by a pause, so its it/s and ETA count training steps only."""
    if not bar.disable:
        bar.start_t += seconds
        bar.last_print_t += seconds
