"""Train a segmentation model:
``python train_seg.py [--config FILE] [--out RUN_DIR] [--resume [auto] | --overwrite] [key=value ...]``.

Without ``--config`` it runs ``configs/demo.yaml``: a synthetic dataset generated on first use and
DeepLabV3 + MobileNetV2-CA trained on the CPU in a few minutes. ``--resume --out RUN_DIR`` continues
that run with its stored ``RUN_DIR/config.yaml``; ``--resume auto`` does so only if RUN_DIR holds a
``last.pt``, and starts afresh otherwise. ``key=value`` overrides may go anywhere on the line.
Multi-GPU: ``torchrun --nproc-per-node N train_seg.py --out RUN_DIR ...``; with ``--max-restarts K``
a restarted group resumes RUN_DIR by itself (see docs/training.md, "Many GPUs and many machines").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from seg.config.cli import HelpFormatter, add_start_arguments, parse_with_overrides
from seg.engine.trainer import run_training
from seg.errors import USER_ERRORS, print_user_error
from seg.evaluation.metrics import iou_table
from seg.runs.rundir import LAST, METRICS
from seg.runs.start import plan_start, with_resume_hint
from seg.utils.distributed import cleanup, init_distributed, is_peer_failure, setup_logging

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
log = logging.getLogger("train_seg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python train_seg.py", description=__doc__, formatter_class=HelpFormatter)
    add_start_arguments(parser, "configs/demo.yaml")
    return parse_with_overrides(parser, argv)


def print_summary(run_dir: Path, best_miou: float) -> None:
    """The final table: per-class IoU of the best validation, read back from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    best = max(records, key=lambda r: r["miou"])
    print(f"\nrun directory: {run_dir}")
    print(f"best val mIoU {best['miou']:.4f} at iteration {best['iter']} (last: {records[-1]['miou']:.4f})")
    print(iou_table(best["classes"], best["iou"]))


def peer_failure_message(err: RuntimeError, rank: int, run_dir: Path, timeout_s: float) -> str:
    """One line for a collective that lost a peer: what gloo / NCCL said, and how the run goes on."""
    said = str(err).strip().splitlines()[0]
    said = said.split("] ", 1)[-1] if said.startswith("[") else said  # drop gloo's [source.cc:line]
    return (f"rank {rank} lost contact with another rank ({said}; collectives wait at most "
            f"train.dist_timeout_s={timeout_s} s); torchrun --max-restarts restarts the group, which resumes "
            f"{run_dir / LAST}; by hand: torchrun ... train_seg.py --resume --out {run_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist, plan = None, None
    try:
        setup_logging()  # seg.engine.trainer adds RUN_DIR/train.log once the start is accepted
        plan = plan_start(args.out, args.config, args.overrides, args.resume, args.overwrite, DEFAULT_CONFIG)
        run_dir, cfg = plan.run_dir, plan.config
        dist = init_distributed(cfg.train.dist_timeout_s)
        state = run_training(plan, dist)
        if dist.is_main:
            print_summary(run_dir, state.best_miou)
        return 0
    except USER_ERRORS as err:  # one clear line, no traceback
        return print_user_error(with_resume_hint(err, plan))
    except RuntimeError as err:
        if dist is None or not dist.distributed or not is_peer_failure(err):
            raise
        # not a bug here: another rank died or hung; its own log says why
        print(f"error: {peer_failure_message(err, dist.rank, run_dir, cfg.train.dist_timeout_s)}", file=sys.stderr)
        return 1
    finally:
        if dist is not None:
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
