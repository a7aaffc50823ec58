"""What attention costs: ``python -m seg.tools.bench [--device cpu|cuda] [--backend pytorch|onnxruntime|both]``.

``--scope model`` (the default) times DeepLabV3 (separable ASPP) with plain / SE / CBAM / CA on each
encoder and output stride: parameters, GFLOPs (at ``--flops-size``), the training step (forward +
backward + SGD step) and inference, as min / median / max over ``--repeats`` after ``--warmup``
untimed calls, and every variant's ratio of medians to plain. "plain A/A", a second plain built
apart, is the control: a run whose A/A is off 1.00 by more than 2% is flagged on stderr and must
not be quoted. Extra variants where they can run: "CA fused" (the Triton kernels, CUDA), "CA
prologue" (those, and at inference the gate inside the projection's GEMM), "CA lean
eval" (CA's lean inference path where it is off by default), "CA without CPU kernels" (CPU: what
CA costs on PyTorch's ops alone) and, with ``--ort-without-nchwc``, onnxruntime with its NCHWc
layout off (docs/performance.md says why that layout makes CA dearer on onnxruntime).

Defaults follow the device. CUDA: bf16 autocast, channels-last, batch 16 at 512, train and infer,
eager and ``torch.compile``, both encoders at OS 16 and 8, every variant. CPU: fp32, batch 1 at
512, inference only, MobileNetV2 at OS 16, plain / A/A / CA / CA without CPU kernels: the
measurement docs/performance.md quotes. ``--scope block|tiles|projections`` time one CA block
instead (``seg.tools.bench_blocks``), ``--scope pipeline`` one loader worker's decode + augment
per image (``seg.tools.bench_pipeline``), and ``--scope pretrain`` a pretraining step of MobileNetV2 and
+ CA and the ImageNet loader, projected to the paper's 200 epochs (``seg.tools.bench_pretrain``), and
``--scope eval`` ``eval_seg.py``'s images/s for plain, SE and CA on the default and the reference
inference path (``seg.tools.bench_eval``), and ``--scope checkpoint`` the atomic write of a run's
``last.pt`` (``seg.tools.bench_checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from seg.config import available_cpus
from seg.config.cli import HelpFormatter
from seg.kernels import HAS_TRITON, INTERPRET, calibrate
from seg.tools import bench_blocks, bench_checkpoint, bench_eval, bench_pipeline, bench_pretrain
from seg.tools.bench_models import AA, ATROUS_RATES, CA_TORCH, ENCODERS, VARIANTS, run_bench
from seg.tools.bench_runners import BenchSetup, FLOPS_SIZE, STEPS
from seg.tools.timing import noise_warning, ratio, spread

DEFAULTS = {
    "cuda": dict(batch=16, size=512, amp="bf16", channels_last=True, compile="both", steps=STEPS,
                 encoders=ENCODERS, os=(16, 8), variants=None),
    "cpu": dict(batch=1, size=512, amp="none", channels_last=False, compile="off", steps=("infer",),
                encoders=("mobilenet_v2",), os=(16,), variants=["plain", AA, "CA", CA_TORCH]),
}
SCOPES = ("model", "block", "tiles", "projections", "pipeline", "pretrain", "eval", "checkpoint")
COLUMNS = ("encoder", "variant", "OS", "mode", "params (M)", "GFLOPs", "train ms (min / med / max)",
           "infer ms (min / med / max)", "train img/s", "infer img/s", "peak mem (GiB)", "train / plain",
           "infer / plain")


def _spread(samples_ms: list[float]) -> str:
    return spread([v / 1e3 for v in samples_ms]) if samples_ms else "n/a"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_table(result: dict) -> str:
    """One markdown table of ``run_bench``'s rows, with a header line saying how it was measured."""
    s = result["setup"]
    header = (f"DeepLabV3 (separable ASPP), {s['device']}, batch {s['batch']} at {s['size']}x{s['size']}, "
              f"amp {s['amp']}, channels_last {s['channels_last']}, {s['threads']} threads, {s['repeats']} "
              f"interleaved repeats after {s['warmup']} warm-up; ratios are of medians; GFLOPs per image at "
              f"{s['flops_size']}x{s['flops_size']}; CPU: {s['cpu']}")
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 4 + "---:|" * (len(COLUMNS) - 4)]
    for r in result["rows"]:
        cells = (r["encoder"], r["variant"], r["os"], r["mode"], f"{r['params'] / 1e6:.2f}", f"{r['gflops']:.2f}",
                 _spread(r["train_samples_ms"]), _spread(r["infer_samples_ms"]), _num(r["train_img_s"], ".1f"),
                 _num(r["infer_img_s"], ".1f"), _num(r["peak_mem_gib"], ".2f"), _num(r["train_ratio"], ".3f"),
                 _num(r["infer_ratio"], ".3f"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def aa_warnings(result: dict) -> list[str]:
    """One line per group and step whose A/A ratio is off 1.00 by more than seg.tools.timing's tolerance."""
    lines = []
    for r in result["rows"]:
        for step in STEPS:
            if r["variant"] == AA and r[f"{step}_ratio"] is not None:
                label = f"{r['encoder']} OS {r['os']} {r['mode']} {step}"
                if (line := noise_warning(label, r[f"{step}_ratio"])) is not None:
                    lines.append(line)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg.tools.bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to time")
    p.add_argument("--backend", choices=["pytorch", "onnxruntime", "both"], default="pytorch",
                   help="runtime(s) to time; onnxruntime: CPU inference of the exported models")
    p.add_argument("--scope", choices=SCOPES, default="model", help="the whole model, or one CA block (see above)")
    p.add_argument("--batch", type=int, help="default: 16 on CUDA, 1 on CPU")
    p.add_argument("--size", type=int, help="input side; --scope pipeline: the training crop (default: 512)")
    p.add_argument("--steps", nargs="+", choices=STEPS, help="default: train and infer on CUDA, infer on CPU")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per model and step")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model and step first")
    p.add_argument("--encoders", nargs="+", help=f"backbones to time (default: {' '.join(ENCODERS)} on CUDA, "
                   "mobilenet_v2 on CPU)")
    p.add_argument("--os", type=int, nargs="+", choices=sorted(ATROUS_RATES),
                   help="DeepLabV3 output strides (default: 16 8 on CUDA, 16 on CPU)")
    p.add_argument("--compile", choices=["off", "on", "both"], help="default: both on CUDA, off on CPU")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile", "graphs"],
                   help="PyTorch execution modes (overrides --compile); graphs = CUDA graphs, CUDA only "
                        "(default: from --compile)")
    p.add_argument("--threads", type=int, help="torch and onnxruntime CPU threads (default: torch's)")
    p.add_argument("--flops-size", type=int, default=FLOPS_SIZE, help="input side the GFLOPs are counted at")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help=f"'all' or some of {['plain', AA, *list(VARIANTS)[2:], 'CA fused', 'CA prologue', CA_TORCH]} "
                        "(default: all that can run on CUDA; plain, A/A, CA, CA without CPU kernels on CPU)")
    p.add_argument("--ort-without-nchwc", action="store_true",
                   help="also time onnxruntime with its NCHWc layout off (plain and CA)")
    p.add_argument("--camvid", type=Path, help="--scope pipeline: also time this CamVid root's train split "
                   "(default: temporary images only)")
    p.add_argument("--workers", type=int, help="--scope pretrain: loader workers (default: the CPUs this process may use)")
    p.add_argument("--loader-images", type=int, default=256, help="--scope pretrain: JPEGs the loader is timed on")
    p.add_argument("--train-iters", type=int, default=300, help="--scope eval: iterations each model trains first")
    p.add_argument("--eval-frames", type=int, default=bench_eval.CAMVID_VAL[0],
                   help="--scope eval: frames of the CamVid stand-in's val split, when --camvid has none")
    p.add_argument("--work", type=Path, help="--scope eval: where the runs and the stand-in go (default: a "
                   "temporary folder)")
    p.add_argument("--json", type=Path, help="also write the rows and setup here (default: print only)")
    return p.parse_args(argv)


def setup_from_args(args: argparse.Namespace) -> tuple[BenchSetup, dict]:
    """The measurement setup, and the device's defaults for the options it does not hold."""
    d = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    steps = tuple(args.steps or d["steps"])
    setup = BenchSetup(device=args.device, batch=args.batch or d["batch"], size=args.size or d["size"],
                       repeats=args.repeats, warmup=args.warmup, amp=d["amp"], channels_last=d["channels_last"],
                       flops_size=args.flops_size, threads=args.threads, steps=steps)
    # batch 1 cannot train: the ASPP's pooled branch gives BatchNorm one value per channel
    for key, least in (("batch", 2 if "train" in steps else 1), ("size", 32), ("repeats", 1), ("warmup", 0)):
        value = getattr(setup, key)
        if value < least:
            why = " to train (pass --batch 2 or more)" if key == "batch" and least == 2 else ""
            raise SystemExit(f"error: --{key} must be >= {least}{why}, got {value}")
    return setup, d


def pipeline_table(args: argparse.Namespace) -> list[str]:
    """Images/s per loader worker, the dataset layer against bare decode + the same ops, with A/A."""
    crop = args.size or 512
    results = bench_pipeline.pipeline_times(crop, args.repeats, args.camvid)
    lines = [f"one worker (1 thread), crop {crop}, {args.repeats} interleaved passes per input; img/s of medians",
             "", "| input | images | pipeline img/s | plain img/s | A/A | pipeline / plain time |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        t, n = r["seconds"], r["images"]
        aa = ratio(t, bench_pipeline.AA, bench_pipeline.PLAIN)
        lines.append(f"| {name} | {n} | {n / statistics.median(t[bench_pipeline.PIPELINE]):.1f} | "
                     f"{n / statistics.median(t[bench_pipeline.PLAIN]):.1f} | {aa:.3f} | "
                     f"{ratio(t, bench_pipeline.PIPELINE, bench_pipeline.PLAIN):.3f} |")
        if (line := noise_warning(name, aa)) is not None:
            print(line, file=sys.stderr)
    return lines


def save_json(record: dict, path: Path | None) -> None:
    """Write a run's JSON record to ``path`` (``--json``), when given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))


def other_scope(args: argparse.Namespace) -> int:
    """Every --scope but "model": they print their own tables."""
    if args.scope == "pipeline":
        print("\n".join(pipeline_table(args)))
        return 0
    if args.scope == "pretrain":
        cuda = args.device.startswith("cuda")
        lines, record = bench_pretrain.pretrain_table(
            args.device, args.batch or (256 if cuda else 4), args.size or (224 if cuda else 64), args.repeats,
            args.warmup, args.workers or available_cpus(), args.loader_images)
        print("\n".join(lines))
        save_json(record, args.json)
        return 0
    if args.scope == "checkpoint":
        print("\n".join(bench_checkpoint.checkpoint_table((args.encoders or ["mobilenet_v2_ca"])[0], args.repeats)))
        return 0
    if args.scope == "eval":
        with tempfile.TemporaryDirectory() as tmp:
            lines, record = bench_eval.eval_table(args.device, args.camvid, args.work or Path(tmp), args.repeats,
                                                  args.train_iters, args.eval_frames, args.size or bench_eval.CAMVID_VAL[1],
                                                  args.batch)
        print("\n".join(lines))
        save_json(record, args.json)
        return 0
    if args.scope == "projections":
        if args.threads:
            torch.set_num_threads(args.threads)
        size = args.size or 512
        t = bench_blocks.projection_times(size, torch.get_num_threads(), args.repeats)
        print(f"16 pw-linear projections at {size}x{size}, {torch.get_num_threads()} threads, {args.repeats} "
              f"interleaved runs: conv {spread(t['conv'])} ms, conv again {spread(t[bench_blocks.AA])} ms "
              f"(A/A {ratio(t, bench_blocks.AA, 'conv'):.3f}x), fused with unit gates {spread(t['fused'])} ms "
              f"({ratio(t, 'fused', 'conv'):.3f}x conv)")
        return 0
    # they time the Triton kernels: on a GPU, or on CPU tensors under Triton's interpreter (a test runs them so)
    on_gpu = args.device.startswith("cuda") and torch.cuda.is_available()
    if not (on_gpu or (args.device == "cpu" and HAS_TRITON and INTERPRET)):
        raise SystemExit(f"error: --scope {args.scope} needs a CUDA GPU (--device {args.device}; on a CPU it "
                         "runs only under TRITON_INTERPRET=1)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"device: {name}, torch {torch.__version__}")
    lines = bench_blocks.sweep_tiles(args.device) + [""] + bench_blocks.sweep_projection_tiles(args.device) \
        if args.scope == "tiles" else bench_blocks.block_tables(args.device, args.repeats)
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scope != "model":
        return other_scope(args)
    setup, d = setup_from_args(args)
    modes = {"off": ("eager",), "on": ("compile",), "both": ("eager", "compile")}[args.compile or d["compile"]]
    modes = tuple(args.modes) if args.modes else modes
    modes = {"pytorch": modes, "onnxruntime": ("onnxruntime",), "both": (*modes, "onnxruntime")}[args.backend]
    calibrate.reset()  # which path each CA block shape takes on the CPU is decided afresh for this run
    try:
        result = run_bench(setup, tuple(args.encoders or d["encoders"]), tuple(args.os or d["os"]), modes,
                           args.variants or d["variants"], args.ort_without_nchwc, strict=args.variants is not None)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(format_table(result))
    if setup.device == "cpu" and "infer" in setup.steps and "eager" in modes:
        print(f"{calibrate.summary()} at {setup.batch}x3x{setup.size}x{setup.size}, {torch.get_num_threads()} threads")
    for line in aa_warnings(result):
        print(line, file=sys.stderr)
    save_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
