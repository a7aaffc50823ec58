"""Train and score every config x seed, then print the ablation table.

``python -m seg.tools.ablation --configs configs/camvid_mobilenet_v2.yaml ... --seeds 0 1 2 --out runs/ablation
[--encoders mobilenet_v2 mobilenet_v2_ca ...] [--jobs N] [--gpus 0,1] [--smoke] [key=value ...]``

Each run lives in ``OUT/<config stem>/seed<k>/`` (``OUT/<config stem>-<encoder>/seed<k>/`` with
``--encoders``, which trains every config once per encoder). ``--jobs N`` trains N runs at once as
separate processes, each logging to ``job.log`` in its run directory: on a GPU (``--gpus`` spreads
them over several), or on the CPU with its cores split between them. A run whose ``final.json`` exists is finished and
skipped; one with a ``last.pt`` but no ``final.json`` resumes from it, so the command can simply
be started again after an interruption. ``final.json`` holds the evaluation of that run's
``best.pt``. The table gives mean ± sample std of mIoU over seeds, parameters, GFLOPs at 512x512
and the training step time measured with :mod:`seg.tools.bench` (interleaved, first config = 1.0).
``--smoke`` swaps in the synthetic set and tiny sizes so the whole thing runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from seg.config import Config, ConfigError, available_cpus, config_from_dict, config_to_dict, load_config
from seg.config.cli import HelpFormatter, parse_with_overrides
from seg.engine.trainer import run_training
from seg.errors import USER_ERRORS, print_user_error
from seg.evaluation.metrics import metrics_record
from seg.evaluation.scoring import prepare_synthetic, score, val_dataset
from seg.modeling.models import model_from_checkpoint, model_from_config
from seg.runs.checkpoint import checkpoint_config, load_checkpoint
from seg.runs.rundir import BEST, RunDirError
from seg.runs.start import StartPlan
from seg.tools import bench_models
from seg.tools.bench import DEFAULTS
from seg.tools.bench_runners import BenchSetup, FLOPS_SIZE
from seg.tools.complexity import count_params
from seg.tools.jobs import Job, run_jobs
from seg.utils.atomic import write_atomic
from seg.utils.distributed import current, resolve_device, setup_logging

log = logging.getLogger(__name__)
FINAL = "final.json"
BENCH_CPU = dict(batch=2, size=128, repeats=3, warmup=1)  # a CPU step at full size takes too long


def smoke_overrides(data_root: Path) -> list[str]:
    """Synthetic data, a tiny model input and 2 iterations on the CPU, whatever the config says."""
    return [
        "data.name=synthetic", f"data.root={data_root}", "data.num_classes=5", "data.crop_size=64",
        "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "data.synthetic_train_images=4",
        "data.synthetic_val_images=2", "data.synthetic_image_size=64", "model.decoder_channels=32",
        "model.encoder_weights=null", "optim.warmup_iters=0", "train.iters=2", "train.eval_interval=2",
        "train.log_interval=1", "train.vis_images=0", "train.ca_maps=false", "train.amp=none",
        "train.channels_last=false", "train.compile=false", "train.device=cpu",
    ]


def run_config(path: Path, seed: int, overrides: list[str]) -> Config:
    """The config of one run: the file, then the user's overrides, then the seed."""
    return load_config(path, [*overrides, f"train.seed={seed}"])


def plan_runs(args: argparse.Namespace, overrides: list[str]) -> dict[str, dict[int, Config]]:
    """``{run name: {seed: config}}``: every config (times every ``--encoders`` entry) and seed."""
    variants = [(path.stem, path, []) for path in args.configs] if not args.encoders else [
        (f"{path.stem}-{encoder}", path, [f"model.encoder={encoder}"]) for path in args.configs for encoder in args.encoders]
    cfgs = {name: {seed: run_config(path, seed, [*overrides, *extra]) for seed in args.seeds}
            for name, path, extra in variants}
    if len(cfgs) != len(variants):
        raise ConfigError("--configs: two files share a name; runs are stored by file name")
    return cfgs


def run_parallel(runs: dict[Path, Config], jobs: int, gpus: list[str]) -> None:
    """Train ``runs`` (run directory -> config) ``jobs`` at a time, each in its own process.

    Each child gets its config as JSON on its command line (``--run DIR --run-config JSON``); the
    run directory is written only by the child's own start, under its lock.
    """
    threads = max(1, available_cpus() // jobs)  # CPU runs share the cores instead of each taking all
    children = []
    for i, (run_dir, cfg) in enumerate(runs.items()):
        if (run_dir / FINAL).is_file():
            continue
        env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}
        run_dir.mkdir(parents=True, exist_ok=True)  # for job.log; an empty directory is no run
        children.append(Job(str(run_dir), [sys.executable, "-m", "seg.tools.ablation", "--run", str(run_dir),
                                           "--run-config", json.dumps(config_to_dict(cfg)), "--threads", str(threads)],
                            run_dir / "job.log", env))
    failed = [job for job in run_jobs(children, jobs) if job.returncode != 0]
    if failed:
        raise RunDirError(f"{len(failed)} of {len(children)} runs failed: " +
                          "; ".join(f"{job.name} (exit {job.returncode}, see {job.log})" for job in failed))


def run_child(run_dir: Path, config: str, threads: int) -> int:
    """One run of ``--jobs``: train (or resume) ``config`` (JSON) in ``run_dir`` and score it."""
    setup_logging()
    try:
        cfg = config_from_dict(json.loads(config), source="--run-config")
        if cfg.train.threads is None:
            torch.set_num_threads(threads)
        train_one(cfg, run_dir)
    except USER_ERRORS as err:
        return print_user_error(err)
    return 0


def evaluate_checkpoint(path: Path, device: torch.device) -> dict:
    """Score a checkpoint with its stored config, as ``eval_seg.py`` does without options."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    return metrics_record(score(model_from_checkpoint(ckpt, cfg, device), val_dataset(cfg), cfg, device))


def train_one(cfg: Config, run_dir: Path) -> dict:
    """Train (or resume, or skip) one run and return its ``final.json`` record."""
    final = run_dir / FINAL
    if final.is_file():
        log.info("%s is finished; skipping", run_dir)
        return json.loads(final.read_text())
    dist = current()
    # an interrupted run continues (a different config in its last.pt is refused); a new one starts
    log.info("training %s (resuming its last.pt if there is one)", run_dir)
    run_training(StartPlan(run_dir, cfg, resume="auto"), dist)
    device = resolve_device(cfg.train.device, dist)
    record = {"encoder": cfg.model.encoder, "seed": cfg.train.seed, **evaluate_checkpoint(run_dir / BEST, device)}
    write_atomic(final, json.dumps(record, indent=2).encode())  # written last: it marks the run as done
    return record


def cost_of(cfgs: dict[str, Config], setup: BenchSetup | None) -> dict[str, dict]:
    """Params and GFLOPs at 512 of each config's model, and its step time when ``setup`` is given."""
    models, cost = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        # the model the run trains (attention, aux head and all), without reading its init weights
        models[name] = model_from_config(replace(cfg.model, encoder_weights=None), cfg.data.num_classes)
        cost[name] = {"params": count_params(models[name]),
                      "gflops": bench_models.gflops(models[name], FLOPS_SIZE)}
    if setup is not None:
        for name, times in bench_models.time_models(models, setup).items():
            cost[name].update(train_ms=times["train_ms"], train_ratio=times["train_ratio"])
    return cost


def summarize(records: dict[str, list[dict]], cost: dict[str, dict]) -> list[dict]:
    """One row per config: encoder, seeds, mIoU mean and sample std, and the cost columns."""
    rows = []
    for name, runs in records.items():
        mious = [r["miou"] for r in runs]
        rows.append({"config": name, "encoder": runs[0]["encoder"], "seeds": [r["seed"] for r in runs],
                     "miou": mious, "miou_mean": statistics.mean(mious),
                     "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0, **cost[name]})
    return rows


def format_table(rows: list[dict], bench_note: str) -> str:
    """The paper-style markdown table of :func:`summarize`'s rows."""
    lines = ["| config | encoder | seeds | mIoU (%) mean ± std | params (M) | GFLOPs (512) | step (ms) | step / first |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = (f"{r['train_ms']:.1f} | {r['train_ratio']:.3f}" if "train_ms" in r else "n/a | n/a")
        lines.append(f"| {r['config']} | {r['encoder']} | {len(r['seeds'])} | {100 * r['miou_mean']:.2f} ± "
                     f"{100 * r['miou_std']:.2f} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {step} |")
    return "\n".join(lines + ["", bench_note])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg.tools.ablation", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--configs", type=Path, nargs="+", help="YAML experiments to compare, one table row each "
                   "(required)")
    p.add_argument("--encoders", nargs="+", help="train every config once per encoder (model.encoder=...), "
                   "one row each (default: the configs' own)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, as separate processes")
    p.add_argument("--gpus", help="with --jobs: comma-separated GPU indices to spread the runs over "
                   "(default: the visible ones, all runs sharing them)")
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # a --jobs child: train this run directory
    p.add_argument("--run-config", help=argparse.SUPPRESS)  # ... with this config (JSON)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds trained per config")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="runs go to OUT/<config>/seed<N>")
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny sizes, CPU: a check that it all runs")
    p.add_argument("--no-step-time", action="store_true", help="skip the step-time measurement")
    p.add_argument("--json", type=Path, help="where the rows go (default: OUT/ablation.json)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every config, e.g. train.iters=5000, anywhere on the line (default: none)")
    return parse_with_overrides(p, argv)


def bench_setup(args: argparse.Namespace) -> tuple[BenchSetup | None, str]:
    """How the step time is measured (``None`` to skip it), and the note under the table saying so."""
    if args.no_step_time:
        return None, "step time not measured (--no-step-time)"
    if args.smoke:
        setup = BenchSetup(batch=2, size=64, repeats=1, warmup=0)
    elif torch.cuda.is_available():
        d = DEFAULTS["cuda"]
        setup = BenchSetup(device="cuda", batch=d["batch"], size=d["size"], amp=d["amp"],
                           channels_last=d["channels_last"])
    else:
        setup = BenchSetup(**BENCH_CPU)
    return setup, (f"step = forward + backward + SGD step, median of {setup.repeats} on {setup.device}, "
                   f"batch {setup.batch} at {setup.size}x{setup.size}, amp {setup.amp}; models timed interleaved")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run is not None:
        return run_child(args.run, args.run_config, args.threads)
    if not args.configs:
        print("error: --configs is required", file=sys.stderr)
        return 2
    setup_logging()
    try:
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        overrides = (smoke_overrides(args.out / "_synthetic") if args.smoke else []) + list(args.overrides)
        cfgs = plan_runs(args, overrides)
        if args.jobs > 1:
            if args.smoke:  # generated once here, not by several children at the same time
                prepare_synthetic(next(iter(next(iter(cfgs.values())).values())))
            run_parallel({args.out / name / f"seed{seed}": cfg for name, by_seed in cfgs.items()
                          for seed, cfg in by_seed.items()}, args.jobs, args.gpus.split(",") if args.gpus else [])
        records = {name: [train_one(cfg, args.out / name / f"seed{seed}") for seed, cfg in by_seed.items()]
                   for name, by_seed in cfgs.items()}
    except USER_ERRORS as err:
        return print_user_error(err)
    setup, note = bench_setup(args)
    rows = summarize(records, cost_of({name: by_seed[args.seeds[0]] for name, by_seed in cfgs.items()}, setup))
    print(format_table(rows, note))
    out = args.json or args.out / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "runs": records, "note": note}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
