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
import logging
import json
import sys
import time
from pathlib import Path

from seg.cli import HelpFormatter, parse_with_overrides
from seg.config import ConfigError, load_config
from seg.distributed import cleanup, init_distributed, is_peer_failure, max_restarts, setup_logging
from seg.rundir import resume_config
from seg.start import Resume, check_restartable, continues_run, resume_mode
from seg.training import USER_ERRORS, run_training

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
log = logging.getLogger("train_seg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python train_seg.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML experiment (default: configs/demo.yaml; with --resume: "
                        "the run's stored config.yaml, and a file given here is compared with it like overrides)")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", help="run directory (default: runs/<config>-<time>)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], metavar="auto",
                       help="continue the run in RUN_DIR from its last.pt and stored config.yaml; 'auto': "
                       "only if RUN_DIR holds a last.pt, else start afresh (the default under a torchrun restart)")
    start.add_argument("--overwrite", action="store_true", help="discard the run in RUN_DIR and start afresh "
                       "(default: off)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides such as optim.lr=0.02, anywhere on the line (default: none)")
    return parse_with_overrides(parser, argv)


def resolve_run_dir(out: Path | None, config_name: str, resume: Resume) -> Path:
    """``--out``, or a new ``runs/<config>-<time>``; what a directory may hold is checked in seg.rundir."""
    if out is not None:
        return out
    if resume:
        flag = "--resume auto" if resume == "auto" else "--resume"
        raise ConfigError(f"{flag} needs --out RUN_DIR pointing at the run to continue")
    if max_restarts():  # a restarted group would otherwise start a new, time-stamped directory
        raise ConfigError("torchrun --max-restarts needs --out RUN_DIR, so that a restarted group finds "
                          "the run it continues")
    return Path("runs") / f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_summary(run_dir: Path, best_miou: float) -> None:
    """The final table: per-class IoU of the best validation, read back from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["miou"])
    print(f"\nrun directory: {run_dir}")
    print(f"best val mIoU {best['miou']:.4f} at iteration {best['iter']} (last: {records[-1]['miou']:.4f})")
    print("| class | IoU |\n|---|---:|")
    for name, iou in zip(best["classes"], best["iou"]):
        print(f"| {name} | {'n/a' if iou is None else f'{iou:.4f}'} |")


def peer_failure_message(err: RuntimeError, rank: int, run_dir: Path, timeout_s: float) -> str:
    """One line for a collective that lost a peer: what gloo / NCCL said, and how the run goes on."""
    said = str(err).strip().splitlines()[0]
    said = said.split("] ", 1)[-1] if said.startswith("[") else said  # drop gloo's [source.cc:line]
    return (f"rank {rank} lost contact with another rank ({said}; collectives wait at most "
            f"train.dist_timeout_s={timeout_s} s); torchrun --max-restarts restarts the group, which resumes "
            f"{run_dir / 'last.pt'}; by hand: torchrun ... train_seg.py --resume --out {run_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = None
    try:
        setup_logging()  # seg.training adds RUN_DIR/train.log once the start is accepted
        config = args.config or DEFAULT_CONFIG
        check_restartable()
        resume, overwrite = resume_mode(args.resume, args.overwrite)
        run_dir = resolve_run_dir(args.out, config.stem, resume)
        # a resume continues the stored config: only what this command typed may differ from it
        cfg = (resume_config(run_dir, args.config, args.overrides) if continues_run(run_dir, resume)
               else load_config(config, args.overrides))
        dist = init_distributed(cfg.train.dist_timeout_s)
        state = run_training(cfg, run_dir, dist, resume=resume, overwrite=overwrite)
        if dist.is_main:
            print_summary(run_dir, state.best_miou)
        return 0
    except USER_ERRORS as err:
        # user errors: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
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
