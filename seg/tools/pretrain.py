"""Pretrain an encoder on a classification set (ImageFolder layout), the CA paper's ImageNet protocol:
``python -m seg.tools.pretrain [--config FILE] [--out RUN_DIR] [--resume [auto] | --overwrite] [key=value ...]``.

Without ``--config`` it runs ``configs/pretrain/synthetic.yaml``: a synthetic shapes set generated
on first use and MobileNetV2-CA trained on the CPU in a few minutes. ``configs/pretrain/imagenet_*.yaml``
hold the paper's protocol for each MobileNetV2 variant. The run ends with ``RUN_DIR/encoder.pth``,
which segmentation loads with ``model.encoder_weights=RUN_DIR/encoder.pth``. ``--resume``,
``--overwrite``, torchrun and ``--max-restarts`` work as for ``train_seg.py`` (docs/pretraining.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from seg.config.cli import HelpFormatter, add_start_arguments, parse_with_overrides
from seg.engine.pretrainer import ENCODER_FILE, run_pretraining
from seg.errors import USER_ERRORS, print_user_error
from seg.runs.rundir import METRICS
from seg.runs.start import plan_start, with_resume_hint
from seg.utils.distributed import process_group, setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "synthetic.yaml"
log = logging.getLogger("seg.tools.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m seg.tools.pretrain", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_start_arguments(parser, "configs/pretrain/synthetic.yaml")
    return parse_with_overrides(parser, argv)


def print_summary(run_dir: Path) -> None:
    """The best validation (top-1, top-5) and where the encoder is, read back from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    best = max(records, key=lambda r: r["top1"])
    print(f"\nrun directory: {run_dir}\nbest val top-1 {best['top1']:.4f} (top-5 {best['top5']:.4f}) "
          f"at iteration {best['iter']}\nencoder: {run_dir / ENCODER_FILE} (model.encoder_weights={run_dir / ENCODER_FILE})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    plan = None
    try:
        plan = plan_start(args.out, args.config, args.overrides, args.resume, args.overwrite, DEFAULT_CONFIG)
        with process_group(plan.config.train.dist_timeout_s) as dist:
            run_pretraining(plan, dist)
            if dist.is_main:
                print_summary(plan.run_dir)
        return 0
    except USER_ERRORS as err:
        return print_user_error(with_resume_hint(err, plan))


if __name__ == "__main__":
    sys.exit(main())
