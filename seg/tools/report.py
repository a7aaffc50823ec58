"""Every claim the project makes, measured in one command inside a time budget.

``python -m seg.tools.report --out DIR [--device cuda|cpu] [--budget SECONDS] [--data-root CAMVID_ROOT] [--smoke]``

Parts, in order, each a child process with its own share of the budget (a part that would overrun
is stopped, and its row says so; the report is written whatever happens):

1. environment: device, driver, torch / Triton / cuDNN versions, CPU count;
2. cost table (``seg.tools.bench``): plain, plain A/A, SE, CBAM, CA, CA fused and CA prologue
   (where Triton runs: the gate kernel, or the gate inside the projection's GEMM) and CA's lean
   inference path (where it is off by default), DeepLabV3-MobileNetV2 OS 16, eager and CUDA graphs,
   then ``torch.compile`` for plain and CA if time is left;
3. CamVid ablation (``seg.tools.ablation --jobs``): plain / SE / CBAM / CA x seeds from
   ``configs/camvid_gpu.yaml``, trained at once on the one device; mIoU is each run's best
   validation (which equals ``eval_seg.py`` on its ``best.pt``), mean ± std over seeds;
4. pretraining cost (``seg.tools.bench --scope pretrain``);
5. evaluation speed (``seg.tools.bench --scope eval``): ``eval_seg.py``'s images/s and mIoU for plain,
   SE and CA on the default and the reference inference path, on CamVid val or a stand-in of its shape;
6. the CUDA tests (``pytest -m cuda``).

Files in DIR: ``report.md``, ``report.json`` (every figure) and ``logs/`` (one log per part that ran),
at most eight files (seven in a CPU smoke run, which times no CUDA graphs); the bench JSONs and the ablation's run directories go in ``DIR/work``. ``--smoke`` swaps in synthetic data and tiny sizes so the whole command runs on
a 2-core CPU in a few minutes; a test runs it, so the report cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from seg.config import ConfigError
from seg.errors import print_user_error
from seg.runs.rundir import METRICS
from seg.tools.report_format import format_report
from seg.tools.timing import cpu_name
from seg.utils.distributed import resolve_device

ENCODERS = {"plain": "mobilenet_v2", "SE": "mobilenet_v2_se", "CBAM": "mobilenet_v2_cbam", "CA": "mobilenet_v2_ca"}
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "camvid_gpu.yaml"
# budget shares; compile gets what is left. Fused CA is graphed in a part of its own, so a capture
# failure there cannot take the other rows with it.
SHARES = {"eager": 0.14, "graphs": 0.10, "graphs_fused": 0.07, "ablation": 0.28, "cuda_tests": 0.12,
          "pretrain": 0.10, "eval": 0.16}
PART_OF = {"eager": "cost", "graphs": "cost", "graphs_fused": "cost"}  # the other shares are parts themselves
GRAPHED = ["plain A/A", "SE", "CBAM", "CA"]  # plain runs first by itself
PARTS = ("cost", "ablation", "pretrain", "eval", "cuda_tests", "compile")
FUSED = ["plain A/A", "CA fused", "CA prologue"]  # graphed in a part of their own, with their own A/A
RESERVE_S = 15.0  # kept back for writing the report
STEP_OVERLAP = 0.6  # assumed: runs sharing one GPU overlap their launch-bound steps (a guess, not measured)


def run_part(name: str, argv: list[str], seconds: float, log: Path, env: dict | None = None) -> dict:
    """Run ``argv`` for at most ``seconds`` (its whole process group is stopped then); output to ``log``."""
    start = time.perf_counter()
    if seconds < 5:
        return {"part": name, "status": "skipped: no budget left", "seconds": 0.0}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            code = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return part_record(name, code, seconds, time.perf_counter() - start, log)


def part_record(name: str, code: int | None, budget: float, seconds: float, log: Path) -> dict:
    """The report's entry for a part that ran ``seconds`` and exited with ``code`` (None: cut at ``budget``)."""
    if code is None:
        status = f"cut at its budget of {budget:.0f} s"
    else:
        status = "ok" if code == 0 else f"failed (exit {code})"
    return {"part": name, "status": status, "seconds": round(seconds, 1), "log": f"{log.parent.name}/{log.name}"}


def json_part(report: dict, name: str, argv: list[str], seconds: float, log: Path, out: Path) -> dict | None:
    """:func:`run_part` for a part that writes its figures to ``out`` (a bench ``--json``): its row
    goes into ``report["parts"]``; returns the JSON, or None if the part wrote none (failed or cut)."""
    report["parts"].append(run_part(name, argv, seconds, log))
    return json.loads(out.read_text()) if out.is_file() else None


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "cpu": cpu_name(), "device": device}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def cuda_test_files() -> list[str]:
    """The test files with CUDA tests: collecting only them keeps CPU-only test dependencies out."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    return [str(p) for p in sorted(tests.glob("test_*.py")) if "mark.cuda" in p.read_text()]


def bench_argv(args: argparse.Namespace, mode: str, out: Path, variants: list[str] | None = None) -> list[str]:
    size = ["--batch", "2", "--size", "64", "--repeats", "2", "--warmup", "1"] if args.smoke else \
        ["--repeats", "15", "--warmup", "3"]
    argv = [sys.executable, "-m", "seg.tools.bench", "--device", args.device, "--encoders", "mobilenet_v2",
            "--os", "16", "--modes", mode, *size, "--json", str(out)]
    return argv + ["--steps", "train", "infer", "--variants", *(variants or ["all"])]


def pretrain_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """The bench's pretraining scope: a step of MobileNetV2 and + CA at batch 256, 224², and the JPEG loader."""
    size = ["--batch", "2", "--size", "32", "--repeats", "2", "--warmup", "1", "--workers", "1",
            "--loader-images", "8"] if args.smoke else ["--repeats", "10", "--warmup", "3"]
    return [sys.executable, "-m", "seg.tools.bench", "--scope", "pretrain", "--device", args.device, *size,
            "--json", str(out)]


def eval_argv(args: argparse.Namespace, out: Path, work: Path) -> list[str]:
    """The bench's eval scope: eval_seg.py on CamVid val (or its stand-in), default and reference path."""
    size = ["--repeats", "1", "--train-iters", "0", "--eval-frames", "4", "--size", "64", "--batch", "2"] \
        if args.smoke else ["--repeats", "3", "--train-iters", "200", "--camvid", str(args.data_root)]
    return [sys.executable, "-m", "seg.tools.bench", "--scope", "eval", "--device", args.device, *size,
            "--work", str(work), "--json", str(out)]


def ablation_iters(cost: dict | None, jobs: int, seconds: float) -> int:
    """Iterations the ablation's runs can make in ``seconds``, from the cost table's step times."""
    if not cost:
        return 300
    step_s = statistics.mean(r["train_ms"] for r in cost["rows"] if r["variant"] in ENCODERS) / 1e3
    crop_scale = (320 / cost["setup"]["size"]) ** 2  # the recipe's crop against the bench's
    per_run_step = jobs * step_s * max(crop_scale, 0.5) * STEP_OVERLAP
    iters = int(0.7 * seconds / per_run_step)  # the rest: start-up, validations, the final evaluation
    return max(40, min(3000, iters // 4 * 4))


def ablation_argv(args: argparse.Namespace, out: Path, iters: int) -> list[str]:
    argv = [sys.executable, "-m", "seg.tools.ablation", "--configs", str(CONFIG), "--encoders", *ENCODERS.values(),
            "--seeds", *map(str, args.seeds), "--jobs", str(args.jobs), "--no-step-time", "--out", str(out)]
    if args.smoke:
        return argv + ["--smoke"]
    return argv + [f"data.root={args.data_root}", f"train.iters={iters}", f"train.eval_interval={iters // 4}",
                   f"optim.warmup_iters={min(50, iters // 8)}", f"train.device={args.device}"]


def ablation_table(out: Path, seeds: list[int]) -> dict:
    """Per variant: mIoU (best validation of each run) mean ± std, per-class IoU means, iterations reached."""
    rows = []
    for variant, encoder in ENCODERS.items():
        runs = []
        for seed in seeds:
            metrics = out / f"{CONFIG.stem}-{encoder}" / f"seed{seed}" / METRICS
            records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            if records:
                best = max(records, key=lambda r: r["miou"])
                runs.append({"seed": seed, "miou": best["miou"], "iou": best["iou"], "best_iter": best["iter"],
                             "last_iter": records[-1]["iter"], "finished": (metrics.parent / "final.json").is_file()})
        mious = [r["miou"] for r in runs]
        ious = [[r["iou"][c] for r in runs if r["iou"][c] is not None] for c in range(len(runs[0]["iou"]))] \
            if runs else []
        rows.append({"variant": variant, "encoder": encoder, "runs": runs,
                     "miou_mean": statistics.mean(mious) if mious else None,
                     "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
                     "iou_mean": [statistics.mean(v) if v else None for v in ious]})
    classes = []
    for encoder in ENCODERS.values():
        for seed in seeds:
            metrics = out / f"{CONFIG.stem}-{encoder}" / f"seed{seed}" / METRICS
            if metrics.is_file() and metrics.read_text().strip():
                classes = json.loads(metrics.read_text().splitlines()[0]).get("classes", [])
                break
        if classes:
            break
    return {"rows": rows, "classes": classes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg.tools.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where report.md, report.json and the logs go")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole report (default 480)")
    p.add_argument("--data-root", default="data/camvid", help="CamVid root for the ablation (default data/camvid)")
    p.add_argument("--seeds", type=int, nargs="+", help="ablation seeds (default 0 1 2; 0 1 with --smoke)")
    p.add_argument("--jobs", type=int, help="ablation runs trained at once (default: all on CUDA, 2 on CPU)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="parts to run; their budget shares grow to fill --budget (default: all)")
    p.add_argument("--ablation-iters", type=int, help="train.iters of each ablation run (default: estimated from "
                   "the cost table's step times and the budget)")
    p.add_argument("--smoke", action="store_true", help="synthetic data and tiny sizes: proves the command on a CPU")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.smoke else [0, 1, 2]
    if args.jobs is None:
        args.jobs = len(ENCODERS) * len(args.seeds) if args.device == "cuda" else 2
    return args


def cost_parts(args: argparse.Namespace, report: dict, work: Path, logs: Path, left) -> dict:
    """Run the eager and CUDA-graph cost tables; returns ``{part: bench JSON or None}``."""
    cost = {}
    for part, mode, variants in (("eager", "eager", None), ("graphs", "graphs", GRAPHED),
                                 ("graphs_fused", "graphs", FUSED)):
        if mode == "graphs" and args.device != "cuda":
            report["parts"].append({"part": f"cost {part}", "status": "absent: CUDA graphs need a CUDA device"})
            continue
        out = work / f"cost_{part}.json"
        cost[part] = json_part(report, f"cost {part}", bench_argv(args, mode, out, variants), left(SHARES[part]),
                               logs / f"cost_{part}.log", out)
    return cost


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        resolve_device(args.device)  # before any part starts: no CUDA is one line, not a child's traceback
    except ConfigError as err:
        return print_user_error(err)
    # logs: what to read; work: the bench JSONs (also in report.json) and the run directories, kept
    # deeper than two levels so that the (at most eight) files that matter are all that lie within them
    logs, work = args.out / "logs", args.out / "work" / "parts"
    logs.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    # the chosen parts' shares grow to fill the budget; compile, when chosen, takes what is left anyway
    chosen = sum(v for k, v in SHARES.items() if PART_OF.get(k, k) in args.parts) or 1.0
    scale = 1.0 if "compile" in args.parts else 1.0 / chosen

    def left(share: float = 1.0) -> float:
        return min(share * scale * args.budget, deadline - time.perf_counter() - RESERVE_S)

    report = {"command": ["python", "-m", "seg.tools.report", *(sys.argv[1:] if argv is None else argv)],
              "budget_s": args.budget, "smoke": args.smoke, "environment": environment(args.device), "parts": []}
    cost = cost_parts(args, report, work, logs, left) if "cost" in args.parts else {}
    if "ablation" in args.parts:
        iters = args.ablation_iters or ablation_iters(cost.get("eager"), args.jobs, left(SHARES["ablation"]))
        runs = work / "ablation"
        report["parts"].append(run_part("ablation", ablation_argv(args, runs, iters), left(SHARES["ablation"]),
                                        logs / "ablation.log"))
        report["ablation"] = {**ablation_table(runs, args.seeds), "iters": "2 (--smoke)" if args.smoke else iters,
                              "jobs": args.jobs, "config": str(CONFIG.relative_to(CONFIG.parents[1]))}
    if "pretrain" in args.parts:
        out = work / "pretrain.json"
        report["pretrain"] = json_part(report, "pretrain", pretrain_argv(args, out), left(SHARES["pretrain"]),
                                       logs / "pretrain.log", out)
    if "eval" in args.parts:
        out = work / "eval.json"
        report["eval"] = json_part(report, "eval", eval_argv(args, out, work / "eval"), left(SHARES["eval"]),
                                   logs / "eval.log", out)
    if "cuda_tests" in args.parts:
        report["parts"].append(run_part("cuda tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-n", "0",
                                                   "-p", "no:cacheprovider", "-rf", "-k", "not compiled", *cuda_test_files()],
                                    left(SHARES["cuda_tests"]), logs / "pytest.log",
                                    # the CUDA tests need no CPU kernels; building them took 30 s of the part on an H200
                                    env={"SEG_CPU_KERNELS": "0"}))
    if "compile" in args.parts and args.smoke:
        report["parts"].append({"part": "cost compile", "status": "not run with --smoke: compiling takes minutes on a CPU"})
    elif "compile" in args.parts:
        out = work / "cost_compile.json"
        cost["compile"] = json_part(report, "cost compile", bench_argv(args, "compile", out, ["CA"]), left(),
                                    logs / "cost_compile.log", out)
    report["cost"] = cost
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(format_report(report, args.out))
    print((args.out / "report.md").read_text())
    return 0

if __name__ == "__main__":
    sys.exit(main())
