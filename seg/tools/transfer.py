"""Does pretraining pay? One encoder pretrained on the synthetic shapes set, then DeepLabV3 fine-tuned
from it and from scratch at equal iterations, per seed: the CPU-sized proof of the paper's protocol.

``python -m seg.tools.transfer --out runs/transfer [--seeds 0 1 2] [--pretrain-iters 400]
[--seg-iters 300] [--smoke]``

It runs ``configs/pretrain/synthetic.yaml`` once (``OUT/pretrain``), then ``configs/demo.yaml`` for
every seed twice: from scratch (``OUT/scratch/seed<k>``) and from ``OUT/pretrain/encoder.pth``
(``OUT/pretrained/seed<k>``). Each run resumes if it was interrupted. It prints, per seed, the
final validation mIoU of both starts (the last iteration's, not the best: equal iterations) and
the margin, and writes ``OUT/transfer.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seg.config import load_config
from seg.config.cli import HelpFormatter
from seg.engine.pretrainer import ENCODER_FILE, run_pretraining
from seg.engine.trainer import run_training
from seg.errors import USER_ERRORS, print_user_error
from seg.runs.rundir import METRICS
from seg.runs.start import StartPlan
from seg.tools.timing import cpu_name
from seg.utils.atomic import write_atomic
from seg.utils.distributed import current, setup_logging

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRETRAIN, SEGMENT = CONFIGS / "pretrain" / "synthetic.yaml", CONFIGS / "demo.yaml"
PRETRAIN_ITERS, SEG_ITERS, SMOKE_ITERS = 400, 300, 2
SMOKE = ["data.synthetic_train_images=16", "data.synthetic_val_images=8", "data.synthetic_image_size=32",
         "data.crop_size=32", "data.batch_size=4", "data.val_batch_size=8", "optim.warmup_iters=0",
         "train.vis_images=0", "train.ca_maps=false"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg.tools.transfer", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for every run and transfer.json (required)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="segmentation seeds")
    p.add_argument("--pretrain-iters", type=int, help=f"pretraining iterations (default: {PRETRAIN_ITERS}, "
                                                       f"{SMOKE_ITERS} with --smoke)")
    p.add_argument("--seg-iters", type=int, help=f"segmentation iterations of each start (default: {SEG_ITERS}, "
                                                  f"{SMOKE_ITERS} with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sets, sizes and iteration counts: checks the plumbing in "
                                                        "seconds")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.pretrain_iters = args.pretrain_iters or (SMOKE_ITERS if smoke else PRETRAIN_ITERS)
    args.seg_iters = args.seg_iters or (SMOKE_ITERS if smoke else SEG_ITERS)
    return args


def final_miou(run_dir: Path) -> float:
    """The last validation's mIoU: both starts are compared at the same iteration."""
    return json.loads((run_dir / METRICS).read_text().splitlines()[-1])["miou"]


def run(args: argparse.Namespace) -> dict:
    smoke = SMOKE if args.smoke else []
    dist = current()
    iters = args.pretrain_iters
    pre = load_config(PRETRAIN, [f"data.root={args.out / 'data' / 'classes'}", f"train.iters={iters}",
                                 f"train.eval_interval={iters}", f"optim.warmup_iters={min(20, iters)}", *smoke])
    run_pretraining(StartPlan(args.out / "pretrain", pre, resume="auto"), dist)
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for start, weights in (("scratch", "none"), ("pretrained", args.out / "pretrain" / ENCODER_FILE)):
            cfg = load_config(SEGMENT, [f"data.root={args.out / 'data' / 'scenes'}", f"train.seed={seed}",
                                        f"train.iters={args.seg_iters}", f"train.eval_interval={args.seg_iters}",
                                        f"model.encoder_weights={weights}", "train.vis_images=0", *smoke])
            run_dir = args.out / start / f"seed{seed}"
            run_training(StartPlan(run_dir, cfg, resume="auto"), dist)
            row[start] = final_miou(run_dir)
        row["margin"] = row["pretrained"] - row["scratch"]
        rows.append(row)
    return {"cpu": cpu_name(), "pretrain_iters": iters, "seg_iters": args.seg_iters, "smoke": args.smoke,
            "rows": rows, "min_margin": min(r["margin"] for r in rows)}


def format_table(result: dict) -> str:
    lines = [f"DeepLabV3 + mobilenet_v2_ca on the synthetic scenes, {result['seg_iters']} iterations; encoder "
             f"pretrained {result['pretrain_iters']} iterations on the synthetic shapes; CPU: {result['cpu']}",
             "", "| seed | scratch mIoU | pretrained mIoU | margin |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['scratch']:.4f} | {r['pretrained']:.4f} | {r['margin']:+.4f} |" for r in result["rows"]]
    lines.append(f"\nsmallest margin {result['min_margin']:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        result = run(args)
    except USER_ERRORS as err:
        return print_user_error(err)
    write_atomic(args.out / "transfer.json", json.dumps(result, indent=2).encode())
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
