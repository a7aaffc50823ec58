"""CPU cost of coordinate attention: DeepLabV3-MobileNetV2 (OS 16) with CA vs without, eager and ONNX.

Usage: ``python -m seg.cpu_bench [--size 512] [--threads 2] [--repeats 15]``

Prints a markdown table of median latencies (fp32, batch 1) and the CA/plain ratio for eager
PyTorch and for onnxruntime (CPU). Runs are interleaved (plain, CA, plain, CA, ...) so that a
neighbour's load or thermal drift hits both models alike instead of biasing one of them.

Why onnxruntime shows a larger CA overhead than eager PyTorch: ORT runs this net's convs in its
blocked NCHWc layout, but the CA block's ReduceMean and broadcast Mul are not NCHWc ops, so ORT
converts each expanded tensor back to NCHW before every CA block and again after it (profiled:
ReorderOutput/ReorderInput plus the Muls make up most of the gap). Eager PyTorch has no such
layout switch, so there CA costs only its two reductions and the two gate multiplies.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from seg.config import ModelConfig
from seg.export import export_onnx
from seg.models import model_from_config

PLAIN, CA = "mobilenet_v2", "mobilenet_v2_ca"
NUM_CLASSES = 21
WARMUP = 3


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


def _torch_runner(model: torch.nn.Module, size: int) -> Callable:
    image = torch.randn(1, 3, size, size)

    def run():
        with torch.inference_mode():
            model(image)
    return run


def _interleaved_medians(runners: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per runner, alternating runners within each repeat."""
    for run in runners.values():
        for _ in range(WARMUP):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def benchmark(size: int = 512, threads: int = 2, repeats: int = 15) -> dict[str, dict[str, float]]:
    """``{"pytorch": {"plain": s, "ca": s}, "onnxruntime": {...}}`` median seconds per image."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = {"plain": _build(PLAIN), "ca": _build(CA)}
        results = {"pytorch": _interleaved_medians({k: _torch_runner(m, size) for k, m in models.items()}, repeats)}
        with tempfile.TemporaryDirectory() as tmp:
            ort_runners = {k: _ort_runner(m, size, threads, Path(tmp), k) for k, m in models.items()}
            results["onnxruntime"] = _interleaved_medians(ort_runners, repeats)
    finally:
        torch.set_num_threads(previous)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: backend, plain ms, CA ms, CA/plain."""
    lines = ["| backend | plain (ms) | CA (ms) | CA / plain |", "|---|---:|---:|---:|"]
    for backend, t in results.items():
        lines.append(f"| {backend} | {t['plain'] * 1e3:.1f} | {t['ca'] * 1e3:.1f} | {t['ca'] / t['plain']:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m seg.cpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="square input side (multiple of 16)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both backends")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per model and backend")
    args = p.parse_args(argv)
    results = benchmark(args.size, args.threads, args.repeats)
    print(f"DeepLabV3-MobileNetV2 OS16, fp32, batch 1, {args.size}x{args.size}, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs")
    print(format_table(results))


if __name__ == "__main__":
    main()
