"""Assemble a training run from its config: data, model, optimiser, resume, and the callbacks
that validate, log and checkpoint. The loop itself lives in :mod:`seg.engine.loop`.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from seg.config import Config, ConfigError, config_to_dict, inference_settings
from seg.data import build_dataset, build_eval_transform, build_loader, build_train_transform
from seg.data.loaders import SegLoader
from seg.data.sampling import endless_batches
from seg.engine.graphs import graph_training
from seg.engine.loop import TrainState, train
from seg.engine.optim import build_optimizer, build_scheduler
from seg.evaluation.loop import evaluate
from seg.evaluation.scoring import prepare_synthetic
from seg.kernels import calibrate
from seg.kernels.fast import optimize_for_inference
from seg.modeling.models import model_from_config
from seg.runs.checkpoint import (load_model_weights, restore_rng, save_checkpoint, saved_cpu_paths,
                                 unwrap_model)
from seg.runs.rundir import BEST, LAST, LOG, RunDirError, append_metrics, begin_run, log_to_file
from seg.runs.start import StartPlan, started
from seg.runs.tracking import Tracker
from seg.utils.distributed import DistInfo, barrier, gather_objects, resolve_device
from seg.utils.visualize import spread_indices

log = logging.getLogger(__name__)


def build_datasets(cfg: Config, dist: DistInfo):
    """Train and val datasets; the synthetic set is generated on first use (by rank 0 alone)."""
    data = cfg.data
    if dist.is_main:
        prepare_synthetic(cfg)
    barrier()
    train_tf = build_train_transform(data.crop_size, scale=tuple(data.scale_range), hflip=data.hflip,
                                     jitter=data.jitter)
    train_set = build_dataset(data.name, data.root, data.train_split, train_tf)
    val_set = build_dataset(data.name, data.root, data.val_split, build_eval_transform())
    if train_set.num_classes != data.num_classes:
        raise ConfigError(f"data.num_classes is {data.num_classes} but the {data.name} dataset at {data.root} "
                          f"has {train_set.num_classes} classes {list(train_set.classes)}; set "
                          f"data.num_classes={train_set.num_classes}")
    return train_set, val_set


def build_loaders(cfg: Config, train_set, val_set, dist: DistInfo) -> tuple[SegLoader, SegLoader]:
    data = cfg.data
    if data.batch_size % dist.world_size:
        raise ConfigError(f"data.batch_size={data.batch_size} (global) is not divisible by {dist.world_size} "
                          "processes; choose a multiple of the process count")
    train_loader = build_loader(train_set, data.batch_size // dist.world_size, train=True,
                                num_workers=data.num_workers, distributed=dist.distributed, seed=cfg.train.seed)
    val_loader = build_loader(val_set, data.val_batch_size, train=False, num_workers=data.num_workers,
                              distributed=dist.distributed)
    return train_loader, val_loader


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_state(cfg: Config, num_classes: int, device: torch.device, world_size: int = 1) -> TrainState:
    # CA's inference fast paths for validation on a CPU; training itself runs the reference
    model = optimize_for_inference(model_from_config(cfg.model, num_classes).to(device))
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = build_optimizer(model, o.name, o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                encoder_lr_mult=o.encoder_lr_mult)
    return train_state(cfg, model, optimizer, device, world_size)


def train_state(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                world_size: int) -> TrainState:
    """``model`` and ``optimizer`` with the schedule and AMP scaler ``cfg`` asks for: a run's resumable state."""
    o = cfg.optim
    scheduler = build_scheduler(optimizer, cfg.train.iters, o.warmup_iters, o.poly_power, o.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    return TrainState(model, optimizer, scheduler, scaler, world_size=world_size)


def save_state(path: Path, state: TrainState, cfg: Config, record: dict | None = None) -> None:
    """Checkpoint ``state`` to resume from; ``record`` is the validation's metrics line, kept so resume can restore it."""
    _save(path, state, cfg, record, resumable=True)


def save_best(path: Path, state: TrainState, cfg: Config, record: dict | None = None) -> None:
    """Save the model, config and metrics of ``state`` without its optimizer, scheduler, scaler or
    RNG state: resume reads last.pt, so best.pt keeps only what eval, predict, export and the hub read."""
    _save(path, state, cfg, record, resumable=False)


def _save(path: Path, state: TrainState, cfg: Config, record: dict | None, resumable: bool) -> None:
    save_checkpoint(path, model=unwrap_model(state.model), optimizer=state.optimizer, scheduler=state.scheduler,
                    scaler=state.scaler, iteration=state.iteration, best_miou=state.best_miou,
                    config=config_to_dict(cfg), resumable=resumable,
                    extra={"metrics": record, "world_size": state.world_size, "cpu_paths": calibrate.choices()})


def resume_state(ckpt: dict, state: TrainState) -> None:
    """Restore everything ``save_state`` wrote, so the run continues as if never stopped."""
    load_model_weights(state.model, ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        state.scaler.load_state_dict(ckpt["scaler"])
    state.iteration, state.best_miou = ckpt["iteration"], ckpt["best_miou"]
    restore_rng(ckpt["rng"])
    calibrate.adopt(saved_cpu_paths(ckpt))
    log.info("resumed at iteration %d (best mIoU %.4f)", state.iteration, state.best_miou)


def share_cpu_paths() -> None:
    """Make every rank run the CA paths (C++ kernels or PyTorch ops, :mod:`seg.kernels.calibrate`)
    that rank 0 chose for each block shape, then rank 1, and so on, for the validations to come.

    last.pt saves rank 0's choices, which are then every rank's, and resume adopts them: so the
    validations after a resume take the same paths as those of a run that never stopped.
    """
    merged: dict = {}
    for choices in reversed(gather_objects(calibrate.choices())):
        merged.update(choices)
    calibrate.adopt(merged)


def check_crop_size(cfg: Config, model: torch.nn.Module) -> None:
    """Training crops must divide by the model's output stride, or smp refuses the first batch."""
    stride = model.encoder.output_stride if model.requires_divisible_input_shape else 1
    crop = cfg.data.crop_size
    if crop % stride:
        fits = [c for c in (crop // stride * stride, (crop // stride + 1) * stride) if c > 0]
        raise ConfigError(f"data.crop_size={crop} is not a multiple of {stride}, the output stride of "
                          f"{cfg.model.arch} on {cfg.model.encoder}; use data.crop_size={' or '.join(map(str, fits))}")


def check_cuda_graphs(cfg: Config, device: torch.device, dist: DistInfo) -> None:
    """Refuse ``train.cuda_graphs`` where it cannot apply, before the run writes anything."""
    if not cfg.train.cuda_graphs:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs needs a CUDA device; this run trains on {device}")
    if dist.distributed:
        raise ConfigError("train.cuda_graphs runs in one process; DDP's gradient hooks cannot be captured here")


def graphed_model(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with its training forward and backward replayed from CUDA graphs (``train.cuda_graphs``)."""
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    crop = cfg.data.crop_size
    sample = torch.zeros(cfg.data.batch_size, 3, crop, crop, device=device).to(memory_format=fmt)
    return graph_training(model, sample, cfg.train.amp)


def commit_validation(run_dir: Path, state: TrainState, cfg: Config, record: dict, is_best: bool,
                      saved_iteration: int | None) -> None:
    """Save one validation in the order :mod:`seg.runs.rundir` relies on: best.pt, last.pt, metrics line.

    A failed write (a full disk) becomes a one-line RunDirError saying which checkpoint is intact
    and how to go on: ``--resume`` where a last.pt exists; otherwise the same command again, since a
    start that never committed a validation leaves nothing a rerun is refused for
    (:func:`seg.runs.rundir.check_start`).
    """
    try:
        if is_best:
            save_best(run_dir / BEST, state, cfg, record)
        save_state(run_dir / LAST, state, cfg, record)
        saved_iteration = state.iteration
        append_metrics(run_dir, record)
    except OSError as err:
        what = f"{err.strerror} writing {err.filename}" if err.filename else str(err)
        if saved_iteration is not None:
            way_on = (f"{run_dir / LAST} at iteration {saved_iteration} is intact; free space, then continue "
                      f"with --resume --out {run_dir}")
        else:
            way_on = "no checkpoint was saved yet; free space, then run the same command again"
        raise RunDirError(f"{what[:1].lower()}{what[1:]}; {way_on}") from None


def run_training(plan: StartPlan, dist: DistInfo) -> TrainState:
    """Train ``plan.config`` into ``plan.run_dir``: validation, TensorBoard, last.pt / best.pt.
    Returns the final state.

    The run directory is locked for the whole run. A fresh start refuses a directory that holds a
    run unless ``plan.overwrite``; ``plan.resume`` continues from ``last.pt`` when the config
    matches it (``"auto"``: only if there is one). Rank 0 decides and every rank follows
    (:mod:`seg.runs.start`).
    """
    with started(plan, dist) as resumed:
        return _train(plan.config, plan.run_dir, dist, resumed)


def prepare_process(cfg: Config, dist: DistInfo) -> torch.device:
    """This process's device, CPU threads and seeds for a run of ``cfg``; returns the device."""
    device = resolve_device(cfg.train.device, dist)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    return device


def _train(cfg: Config, run_dir: Path, dist: DistInfo, resumed: dict | None) -> TrainState:
    device = prepare_process(cfg, dist)
    train_set, val_set = build_datasets(cfg, dist)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, dist)
    state = build_state(cfg, train_set.num_classes, device, dist.world_size)
    check_crop_size(cfg, state.model)
    check_cuda_graphs(cfg, device, dist)
    if resumed is not None:
        resume_state(resumed, state)
    batches = endless_batches(train_loader, state.iteration)
    # every check passed: from here on the run owns the directory
    log_file = nullcontext()
    if dist.is_main:
        begin_run(run_dir, cfg, resumed)
        log_file = log_to_file(run_dir / LOG)
    if dist.distributed:
        if device.type == "cuda":
            state.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.model)
        state.model = DistributedDataParallel(state.model, device_ids=[device.index] if device.type == "cuda" else None)
    model = unwrap_model(state.model)
    # compile (or graph) only the module the train step calls; evaluation runs the eager model
    if cfg.train.compile:
        state.model = torch.compile(state.model, mode=cfg.train.compile_mode)
    if cfg.train.cuda_graphs:
        state.model = graphed_model(cfg, state.model, device)
    # events after last.pt's iteration belong to the interrupted attempt: TensorBoard hides them
    tracker = Tracker(run_dir, train_set.classes, train_set.palette,
                      purge_step=state.iteration + 1 if resumed is not None else None)
    vis = [tuple(t.to(device) for t in val_set[i]) for i in spread_indices(len(val_set), cfg.train.vis_images)]
    # validation scores with eval_seg.py's settings (TTA and precision included), so best.pt is chosen
    # by the number eval_seg.py reports for it
    settings = inference_settings(cfg)
    saved_iteration = state.iteration if resumed is not None else None

    def on_eval(state: TrainState) -> None:
        nonlocal saved_iteration
        metrics = evaluate(model, val_loader, train_set.num_classes, device=device, **settings)
        is_best = metrics["miou"] > state.best_miou
        state.best_miou = max(state.best_miou, metrics["miou"])
        log.info("iter %d: val mIoU %.4f (best %.4f)", state.iteration, metrics["miou"], state.best_miou)
        # TensorBoard first: resume keeps events up to last.pt's iteration, so they must not lag it
        tracker.validation(state.iteration, metrics)
        tracker.predictions(state.iteration, model, vis, ca_maps=cfg.train.ca_maps, **settings)
        share_cpu_paths()
        if dist.is_main:
            record = tracker.metrics_record(state.iteration, metrics)
            commit_validation(run_dir, state, cfg, record, is_best, saved_iteration)
            saved_iteration = state.iteration

    with log_file:
        log.info("run directory %s, starting at iteration %d", run_dir, state.iteration)
        try:
            train(state, batches, total_iters=cfg.train.iters, device=device,
                  amp=cfg.train.amp, channels_last=cfg.train.channels_last, aux_weight=cfg.model.aux_weight,
                  grad_clip=cfg.optim.grad_clip, log_interval=cfg.train.log_interval,
                  eval_interval=cfg.train.eval_interval, on_log=tracker.scalars, on_eval=on_eval)
        finally:
            tracker.close()
            for loader in (train_loader, val_loader):
                loader.close()
    return state
