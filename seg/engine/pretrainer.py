"""Pretrain an encoder on a classification set: the CA paper's ImageNet protocol for any encoder here.

A pretraining run is a training run in every way but the task: the same config, start plan,
locked run directory, checkpoints, exact ``--resume``, torchrun and TensorBoard as
:mod:`seg.engine.trainer`, and the same train loop with a classification loss. What differs is
the model (:class:`seg.modeling.classifier.EncoderClassifier`), the data
(:mod:`seg.data.classification`), the optimiser and schedule (timm's ``create_optimizer_v2`` and
cosine schedule), and the validation (top-1 / top-5, :mod:`seg.evaluation.topk`; ``best.pt`` holds
the best top-1). At the end ``encoder.pth`` holds the best checkpoint's encoder, which
``model.encoder_weights=RUN/encoder.pth`` loads into segmentation with nothing missing.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel

from seg.config import Config, ConfigError
from seg.data.base import DatasetError
from seg.data.classification import ImageFolderClasses, build_classification_transform, make_synthetic_classes
from seg.data.sampling import endless_batches
from seg.engine.loop import TrainState, train
from seg.engine.optim import DEFAULT_WEIGHT_DECAY
from seg.engine.trainer import build_loaders, commit_validation, prepare_process, resume_state, train_state
from seg.evaluation.topk import evaluate_topk
from seg.modeling.classifier import EncoderClassifier
from seg.modeling.models import encoder_from_config
from seg.modeling.warm_start import identity_warm_start
from seg.modeling.weights import load_encoder_weights, read_state_dict, resolve_weights
from seg.runs.checkpoint import load_checkpoint, save_atomic, unwrap_model
from seg.runs.rundir import BEST, LOG, begin_run, log_to_file
from seg.runs.start import StartPlan, started
from seg.runs.tracking import Tracker
from seg.utils.distributed import DistInfo, barrier

log = logging.getLogger(__name__)
CLASSIFICATION_SETS = ("imagefolder", "synthetic_classes")
ENCODER_FILE = "encoder.pth"
ENCODER_PREFIX = "encoder."
HEAD_KEYS = ("classifier.1", "fc")  # torchvision MobileNetV2, ResNet


def build_sets(cfg: Config, dist: DistInfo) -> tuple[ImageFolderClasses, ImageFolderClasses]:
    """Train and val sets; the synthetic one is generated on first use (by rank 0 alone)."""
    data = cfg.data
    if data.name not in CLASSIFICATION_SETS:
        raise ConfigError(f"data.name={data.name} is a segmentation set; pretraining reads one of "
                          f"{', '.join(CLASSIFICATION_SETS)}")
    if data.name == "synthetic_classes" and dist.is_main:
        make_synthetic_classes(data.root, n_train=data.synthetic_train_images, n_val=data.synthetic_val_images,
                               size=data.synthetic_image_size, seed=0)
    barrier()
    train_tf = build_classification_transform(data.crop_size, True, cfg.pretrain.crop_scale)
    train_set = ImageFolderClasses(data.root, data.train_split, train_tf)
    val_set = ImageFolderClasses(data.root, data.val_split, build_classification_transform(data.crop_size, False))
    if train_set.classes != val_set.classes:
        raise DatasetError(f"{data.root}: {data.train_split}/ and {data.val_split}/ hold different class folders")
    if train_set.num_classes != data.num_classes:
        raise ConfigError(f"data.num_classes is {data.num_classes} but {data.root}/{data.train_split} has "
                          f"{train_set.num_classes} class folders; set data.num_classes={train_set.num_classes}")
    return train_set, val_set


def build_classifier(cfg: Config) -> EncoderClassifier:
    """The encoder as segmentation builds it, with a classification head; ``pretrain.warm_start`` loads
    plain weights and sets every attention block to an exact identity."""
    encoder = encoder_from_config(cfg.model)
    model = EncoderClassifier(encoder, cfg.data.num_classes, cfg.pretrain.dropout)
    if cfg.pretrain.warm_start:
        path = resolve_weights(cfg.pretrain.warm_start)
        report = load_encoder_weights(encoder, path)
        blocks = identity_warm_start(encoder)
        head = load_head(model, read_state_dict(path))
        log.info("warm start from %s: %d encoder tensors loaded, %d attention blocks set to identity, "
                 "classifier %s", path, len(report.loaded), blocks, "loaded" if head else "new (no matching head)")
    return model


def load_head(model: EncoderClassifier, state: dict[str, torch.Tensor]) -> bool:
    """Copy a plain network's ImageNet classifier (torchvision's MobileNetV2 ``classifier.1`` or ResNet
    ``fc``) into ``model.fc`` when its shape fits, so the warm start computes the plain network's logits."""
    for prefix in HEAD_KEYS:
        weight, bias = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
        if weight is not None and bias is not None and weight.shape == model.fc.weight.shape:
            with torch.no_grad():
                model.fc.weight.copy_(weight)
                model.fc.bias.copy_(bias)
            return True
    return False


def build_pretrain_state(cfg: Config, device: torch.device, world_size: int) -> TrainState:
    model = build_classifier(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    weight_decay = DEFAULT_WEIGHT_DECAY[o.name] if o.weight_decay is None else o.weight_decay
    # timm's optimiser factory: no weight decay on norms and biases, as in the segmentation runs
    optimizer = create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=weight_decay, momentum=o.momentum)
    return train_state(cfg, model, optimizer, device, world_size)


def export_encoder(checkpoint: Path, out: Path) -> None:
    """Write the encoder of a pretraining checkpoint as a plain state dict (``model.encoder_weights`` reads it)."""
    model = load_checkpoint(checkpoint)["model"]
    save_atomic({k.removeprefix(ENCODER_PREFIX): v for k, v in model.items() if k.startswith(ENCODER_PREFIX)}, out)


def run_pretraining(plan: StartPlan, dist: DistInfo) -> TrainState:
    """Pretrain ``plan.config``'s encoder into ``plan.run_dir``; returns the final state.

    The run directory is locked and checked exactly as for segmentation (:mod:`seg.runs.start`).
    """
    with started(plan, dist) as resumed:
        return _pretrain(plan.config, plan.run_dir, dist, resumed)


def _pretrain(cfg: Config, run_dir: Path, dist: DistInfo, resumed: dict | None) -> TrainState:
    device = prepare_process(cfg, dist)
    train_set, val_set = build_sets(cfg, dist)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, dist)
    state = build_pretrain_state(cfg, device, dist.world_size)
    if resumed is not None:
        resume_state(resumed, state)
    batches = endless_batches(train_loader, state.iteration)
    log_file = nullcontext()
    if dist.is_main:  # every check passed: from here on the run owns the directory
        begin_run(run_dir, cfg, resumed)
        log_file = log_to_file(run_dir / LOG)
    if dist.distributed:
        state.model = DistributedDataParallel(state.model, device_ids=[device.index] if device.type == "cuda" else None)
    model = unwrap_model(state.model)
    tracker = Tracker(run_dir, train_set.classes, None, purge_step=state.iteration + 1 if resumed is not None else None)
    saved_iteration = state.iteration if resumed is not None else None

    def on_eval(state: TrainState) -> None:
        nonlocal saved_iteration
        scores = evaluate_topk(model, val_loader, device=device, amp=cfg.eval.amp)
        is_best = scores["top1"] > state.best_miou  # the best validation score: top-1 here
        state.best_miou = max(state.best_miou, scores["top1"])
        log.info("iter %d: val top-1 %.4f, top-5 %.4f (best top-1 %.4f)", state.iteration, scores["top1"],
                 scores["top5"], state.best_miou)
        tracker.scalars(state.iteration, {f"val/{k}": v for k, v in scores.items()})
        if dist.is_main:
            commit_validation(run_dir, state, cfg, {"iter": state.iteration, **scores}, is_best, saved_iteration)
            saved_iteration = state.iteration

    smoothing = cfg.pretrain.label_smoothing
    with log_file:
        log.info("pretraining in %s, starting at iteration %d", run_dir, state.iteration)
        try:
            train(state, batches, total_iters=cfg.train.iters, device=device,
                  amp=cfg.train.amp, channels_last=cfg.train.channels_last, grad_clip=cfg.optim.grad_clip,
                  loss_fn=lambda out, target: F.cross_entropy(out.float(), target, label_smoothing=smoothing),
                  log_interval=cfg.train.log_interval,
                  eval_interval=cfg.train.eval_interval, on_log=tracker.scalars, on_eval=on_eval)
        finally:
            tracker.close()
            for loader in (train_loader, val_loader):
                loader.close()
        if dist.is_main:
            export_encoder(run_dir / BEST, run_dir / ENCODER_FILE)
            log.info("wrote %s: the best checkpoint's encoder; segmentation loads it with "
                     "model.encoder_weights=%s", run_dir / ENCODER_FILE, run_dir / ENCODER_FILE)
    return state
