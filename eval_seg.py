"""Evaluate a checkpoint: ``python eval_seg.py --checkpoint RUN/best.pt [--mode whole|slide] [--scales ...] [--flip]
[key=value ...]``.

By default it uses the config stored in the checkpoint, so the numbers match the run's validation.
It runs on the fastest inference path verified for the device (CUDA: CA's Triton kernels and a CUDA
graph per input shape); ``eval.fast=false`` forces the paper's layers. The JSON records the path.
Works under ``torchrun`` (each rank scores a disjoint shard; counts are summed once at the end).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from seg.config import ConfigError, apply_overrides, inference_settings, load_config
from seg.config.cli import HelpFormatter, parse_with_overrides
from seg.data.loaders import ContiguousSampler
from seg.errors import USER_ERRORS, print_user_error
from seg.evaluation.metrics import iou_table, metrics_record
from seg.evaluation.scoring import score, val_dataset
from seg.inference.outputs import OutputError, check_out_folder, make_out_folder, write_prediction
from seg.inference.paths import inference_model
from seg.runs.checkpoint import checkpoint_config, load_checkpoint
from seg.utils.distributed import cleanup, init_distributed, setup_logging
from seg.utils.visualize import denormalize

log = logging.getLogger("eval_seg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python eval_seg.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to score, e.g. RUN/best.pt")
    p.add_argument("--config", type=Path, help="YAML to use instead of the checkpoint's stored config "
                   "(default: the stored one)")
    p.add_argument("--data-root", help="dataset root (default: the config's data.root)")
    p.add_argument("--split", help="split to score (default: the config's data.val_split)")
    p.add_argument("--mode", choices=["whole", "slide"], help="whole image or sliding window "
                   "(default: the config's eval.mode)")
    p.add_argument("--scales", type=float, nargs="+", help="multi-scale inference, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 "
                   "(default: the config's eval.scales)")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped image "
                   "(default: the config's eval.flip)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="inference precision (default: the config's "
                   "eval.amp)")
    p.add_argument("--save-dir", type=Path, help="write class-index PNGs (what scorers read), colour PNGs "
                   "and overlays here (default: write none)")
    p.add_argument("--json", type=Path, help="write the metrics, and what was measured, as JSON here "
                   "(default: print the table only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides such as eval.crop_size=512, anywhere on the line (default: none)")
    return parse_with_overrides(p, argv)


def resolve_config(args: argparse.Namespace, ckpt: dict):
    cfg = load_config(args.config) if args.config else checkpoint_config(ckpt, args.checkpoint)
    overrides = list(args.overrides)
    for key, value in (("data.root", args.data_root), ("data.val_split", args.split), ("eval.mode", args.mode),
                       ("eval.amp", args.amp)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.scales is not None:
        if any(s <= 0 for s in args.scales):
            raise ConfigError(f"--scales must all be > 0, got {args.scales}")
        overrides.append(f"eval.scales={list(args.scales)}")
    if args.flip:
        overrides.append("eval.flip=true")
    return apply_overrides(cfg, overrides)


def saver(save_dir: Path, dataset, indices: list[int], batch_size: int):
    """An ``on_batch`` callback writing, per image, <name>.png (8-bit class indices, the format benchmark
    servers and scorers take; 255 is reserved for ignore and never predicted), <name>_color.png and
    <name>_overlay.jpg."""
    make_out_folder(save_dir, "--save-dir")

    def on_batch(batch_index: int, images, targets, predictions) -> None:
        for offset, pred in enumerate(predictions):
            name = Path(dataset.samples[indices[batch_index * batch_size + offset]][0]).stem
            write_prediction(save_dir / name, denormalize(images[offset]), pred.cpu().numpy(), dataset.palette)

    return on_batch


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before the checkpoint is even loaded, outputs that could not be written at the end."""
    if args.save_dir is not None:
        check_out_folder(args.save_dir, "--save-dir")
    if args.json is not None:
        if args.json.is_dir():
            raise OutputError(f"--json {args.json} is a folder; expected the JSON file to write")
        if not args.json.parent.is_dir():
            raise OutputError(f"--json {args.json}: folder {args.json.parent} does not exist")


def print_table(classes, metrics: dict, seconds: float, images: int, path: str) -> None:
    print(iou_table(classes, metrics["iou"]))
    print(f"mIoU {metrics['miou']:.4f} | pixel acc {metrics['pixel_acc']:.4f} | mean acc {metrics['mean_acc']:.4f} "
          f"| fwIoU {metrics['fwiou']:.4f} | {images} images in {seconds:.1f} s ({images / seconds:.2f} img/s, "
          f"{path} path)")


def json_report(args: argparse.Namespace, cfg, dataset, metrics: dict, seconds: float,
                device: torch.device, path: str) -> dict:
    """The metrics, and enough about what was measured (checkpoint, data, inference) to tell two runs apart."""
    report = metrics_record(metrics)
    settings = inference_settings(cfg)
    report.update(
        classes=list(dataset.classes), checkpoint=str(args.checkpoint.resolve()), dataset=cfg.data.name,
        data_root=str(Path(cfg.data.root).resolve()), split=cfg.data.val_split, images=len(dataset),
        **{**settings, "scales": list(settings["scales"])}, device=str(device), inference_path=path,
        threads=torch.get_num_threads(), seconds=seconds, images_per_s=len(dataset) / seconds)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    dist = None
    try:
        check_outputs(args)
        ckpt = load_checkpoint(args.checkpoint)
        cfg = resolve_config(args, ckpt)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        dist = init_distributed()
        model, path = inference_model(ckpt, cfg, dist.device)
        dataset = val_dataset(cfg)
        indices = list(ContiguousSampler(dataset, dist.rank, dist.world_size))  # this rank's shard, as scored
        on_batch = saver(args.save_dir, dataset, indices, cfg.data.val_batch_size) if args.save_dir else None
        start = time.perf_counter()
        metrics = score(model, dataset, cfg, dist.device, distributed=dist.distributed, on_batch=on_batch)
        seconds = time.perf_counter() - start
        if dist.is_main:
            print_table(dataset.classes, metrics, seconds, len(dataset), path)
            if args.json:
                report = json_report(args, cfg, dataset, metrics, seconds, dist.device, path)
                args.json.write_text(json.dumps(report, indent=2))
        return 0
    except USER_ERRORS as err:
        return print_user_error(err)
    finally:
        if dist is not None:
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
