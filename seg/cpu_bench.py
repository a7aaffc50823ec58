"""CPU cost of coordinate attention: DeepLabV3-MobileNetV2 (OS 16) with CA vs without, eager and ONNX.

Usage: ``python -m seg.cpu_bench [--size 512] [--threads 2] [--repeats 15] [--backend pytorch|onnxruntime|both]``

Prints a markdown table of latencies (min / median / max, fp32, batch 1) and the CA/plain ratio of
medians for eager PyTorch and for onnxruntime (CPU). Runs are interleaved (plain, copy, CA, ...)
so that a neighbour's load or thermal drift hits every model alike instead of biasing one. The A/A
control is a second, separately built copy of plain with the same weights, timed in the same loop:
its ratio to plain should be 1.00, and a run where it is off by more than 2% is flagged on stderr
and must not be quoted (on a shared machine, every op that opens an OpenMP parallel region can wait
a whole scheduler slice for a descheduled thread, and that swamps the difference being measured).

Why onnxruntime shows a larger CA overhead than eager PyTorch: ORT runs this net's convs in its
blocked NCHWc layout, but the CA block's ReduceMean and broadcast Mul are not NCHWc ops, so ORT
converts each expanded tensor back to NCHW before every CA block and again after it
(ReorderOutput/ReorderInput), and its broadcasting Mul is 4-10x slower per block than eager's
in-place gate (profiled at 1 thread: the two gate Muls are ~14 ms of a ~35 ms gap, the reorders
~10 ms, the ReduceMeans ~5 ms). ORT already folds BN into the strip convs, so CA's lean inference
graph changes little there. Keeping the gate in NCHWc (AveragePool strips, Upsample'd gates) or
gating with one full-size MatMul outer product measured no better, and switching the NCHWc layout
off costs far more than it saves (CA 1.96x plain-with-NCHWc, plain without it 1.78x); see README
"CPU cost of CA". Eager PyTorch avoids all of this with the C++ kernels of ``seg.kernels.cpu``,
which an ONNX graph cannot call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from seg.config import ModelConfig
from seg.export import export_onnx
from seg.kernels import cpu
from seg.models import model_from_config

PLAIN, CA = "mobilenet_v2", "mobilenet_v2_ca"
AA = "plain_copy"  # the A/A control: timing differences between two identical models are pure noise
CA_TORCH = "ca_torch_ops"  # eager only: the same CA model without seg.kernels.cpu (what CA costs without them)
BACKENDS = ("pytorch", "onnxruntime")
NUM_CLASSES = 21
WARMUP = 3
AA_TOLERANCE = 0.02  # an A/A ratio further from 1.00 than this means the run is too noisy to quote


def _build(encoder: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_from_config(ModelConfig(encoder=encoder, output_stride=16), NUM_CLASSES).eval()


def _ort_runner(model: torch.nn.Module, size: int, threads: int, folder: Path, name: str) -> Callable:
    import onnxruntime as ort

    path = folder / f"{name}.onnx"
    export_onnx(model, path, size, size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    return lambda: session.run(None, {"image": image})


def _torch_runner(model: torch.nn.Module, size: int, cpu_kernels: bool = True) -> Callable:
    image = torch.randn(1, 3, size, size)

    def run():
        with torch.inference_mode(), nullcontext() if cpu_kernels else cpu.disabled():
            model(image)
    return run


def _interleaved_times(runners: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each runner; every repeat runs each runner once, in a rotating order."""
    for run in runners.values():
        for _ in range(WARMUP):
            run()
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        # rotate, so that no model always runs right after the same neighbour (cache, allocator state)
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _models() -> dict[str, torch.nn.Module]:
    """plain, a separately built copy of plain with the same weights (the A/A control), and CA."""
    plain, copy = _build(PLAIN), _build(PLAIN)
    copy.load_state_dict(plain.state_dict())
    return {"plain": plain, AA: copy, "ca": _build(CA)}


def benchmark(size: int = 512, threads: int = 2, repeats: int = 15,
              backends: tuple[str, ...] = BACKENDS) -> dict[str, dict[str, list[float]]]:
    """``{backend: {"plain": [s, ...], AA: [...], "ca": [...]}}``: seconds per image, one per repeat.

    The eager backend also times CA_TORCH: the CA model with its CPU kernels switched off.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = _models()
        results = {}
        if "pytorch" in backends:
            runners = {k: _torch_runner(m, size) for k, m in models.items()}
            runners[CA_TORCH] = _torch_runner(models["ca"], size, cpu_kernels=False)
            results["pytorch"] = _interleaved_times(runners, repeats)
        if "onnxruntime" in backends:
            with tempfile.TemporaryDirectory() as tmp:
                ort_runners = {k: _ort_runner(m, size, threads, Path(tmp), k) for k, m in models.items()}
                results["onnxruntime"] = _interleaved_times(ort_runners, repeats)
    finally:
        torch.set_num_threads(previous)
    return results


def ratios(times: dict[str, list[float]]) -> tuple[float, float]:
    """``(A/A, CA/plain)``: the copy's and CA's median over plain's median."""
    plain = statistics.median(times["plain"])
    return statistics.median(times[AA]) / plain, statistics.median(times["ca"]) / plain


def aa_warnings(results: dict[str, dict[str, list[float]]]) -> list[str]:
    """One line per backend whose A/A ratio is off 1.00 by more than AA_TOLERANCE."""
    lines = []
    for backend, times in results.items():
        aa, _ = ratios(times)
        if abs(aa - 1.0) > AA_TOLERANCE:
            lines.append(f"warning: {backend} A/A is {aa:.3f}x, off 1.00 by more than {AA_TOLERANCE:.0%}: the machine "
                         "was too noisy for this run to mean anything; do not quote it")
    return lines


def _spread(seconds: list[float]) -> str:
    return " / ".join(f"{v * 1e3:.1f}" for v in (min(seconds), statistics.median(seconds), max(seconds)))


def format_table(results: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table: per backend, min / median / max ms of each model, then A/A and CA/plain."""
    lines = ["| backend | plain ms (min / med / max) | plain copy ms | CA ms | A/A | CA / plain "
             "| CA without CPU kernels / plain |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for backend, t in results.items():
        aa, ca = ratios(t)
        torch_ops = (f"{statistics.median(t[CA_TORCH]) / statistics.median(t['plain']):.3f}x" if CA_TORCH in t
                     else "n/a")
        lines.append(f"| {backend} | {_spread(t['plain'])} | {_spread(t[AA])} | {_spread(t['ca'])} "
                     f"| {aa:.3f}x | {ca:.3f}x | {torch_ops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m seg.cpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="square input side (multiple of 16)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both backends")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per model and backend")
    p.add_argument("--backend", choices=[*BACKENDS, "both"], default="both", help="which runtime(s) to time")
    args = p.parse_args(argv)
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    results = benchmark(args.size, args.threads, args.repeats, backends)
    print(f"DeepLabV3-MobileNetV2 OS16, fp32, batch 1, {args.size}x{args.size}, {args.threads} threads, "
          f"{args.repeats} interleaved runs per model; ratios are of medians")
    print(format_table(results))
    for line in aa_warnings(results):
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
