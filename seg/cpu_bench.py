"""CPU cost of coordinate attention: DeepLabV3-MobileNetV2 (OS 16) with CA vs without, eager and ONNX.

Usage: ``python -m seg.cpu_bench [--size 512] [--threads 2] [--repeats 15] [--backend pytorch|onnxruntime|both]
[--ort-without-nchwc]``, or ``python -m seg.cpu_bench --projections [--threads 2] [--repeats 15]``

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
off costs far more than it saves (``--ort-without-nchwc``: CA 1.97x plain-with-NCHWc at 1 thread,
plain without it 1.78x); see docs/performance.md. Eager PyTorch avoids all of this with the
C++ kernels of ``seg.kernels.cpu``, which an ONNX graph cannot call.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from seg.cli import HelpFormatter
from seg.config import ModelConfig
from seg.encoders.mobilenet_v2 import ATTENTION_SLOT, ExpandedConv
from seg.export import export_onnx
from seg.kernels import calibrate, cpu
from seg.timing import AA_TOLERANCE, interleaved, noise_warning, ratio, spread
from seg.kernels.fast import optimize_for_inference
from seg.models import model_from_config

PLAIN, CA = "mobilenet_v2", "mobilenet_v2_ca"
AA = "plain_copy"  # the A/A control: timing differences between two identical models are pure noise
CA_TORCH = "ca_torch_ops"  # eager only: the same CA model without seg.kernels.cpu (what CA costs without them)
BACKENDS = ("pytorch", "onnxruntime")
NCHWC_TRANSFORMER = "NchwcTransformer"
NO_NCHWC = "_without_nchwc"  # suffix of the onnxruntime runs with the NCHWc layout off (--ort-without-nchwc)
NUM_CLASSES = 21
WARMUP = 3


def _build(encoder: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return optimize_for_inference(model_from_config(ModelConfig(encoder=encoder, output_stride=16), NUM_CLASSES).eval())


def ort_session(path: Path, threads: int, without_nchwc: bool = False, optimized_path: Path | None = None):
    """An onnxruntime CPU session for ``path``; ``without_nchwc`` switches ORT's NCHWc layout transformer
    off (ORT ignores unknown optimizer names silently, so tests check the optimized graph it saves
    to ``optimized_path``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    disabled = {"disabled_optimizers": [NCHWC_TRANSFORMER]} if without_nchwc else {}
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], **disabled)


def _ort_runner(model: torch.nn.Module, size: int, threads: int, folder: Path, name: str,
                without_nchwc: bool = False) -> Callable:
    path = folder / f"{name}.onnx"
    export_onnx(model, path, size, size)
    session = ort_session(path, threads, without_nchwc)
    image = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    return lambda: session.run(None, {"image": image})


def _torch_runner(model: torch.nn.Module, size: int, cpu_kernels: bool = True) -> Callable:
    image = torch.randn(1, 3, size, size)

    def run():
        with torch.inference_mode(), nullcontext() if cpu_kernels else cpu.disabled():
            model(image)
    return run


def _models() -> dict[str, torch.nn.Module]:
    """plain, a separately built copy of plain with the same weights (the A/A control), and CA."""
    plain, copy = _build(PLAIN), _build(PLAIN)
    copy.load_state_dict(plain.state_dict())
    return {"plain": plain, AA: copy, "ca": _build(CA)}


def benchmark(size: int = 512, threads: int = 2, repeats: int = 15, backends: tuple[str, ...] = BACKENDS,
              ort_without_nchwc: bool = False) -> dict[str, dict[str, list[float]]]:
    """``{backend: {"plain": [s, ...], AA: [...], "ca": [...]}}``: seconds per image, one per repeat.

    The eager backend also times CA_TORCH: the CA model with its CPU kernels switched off. With
    ``ort_without_nchwc``, onnxruntime also times plain and CA with its NCHWc layout off (NO_NCHWC).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = _models()
        results = {}
        if "pytorch" in backends:
            runners = {k: _torch_runner(m, size) for k, m in models.items()}
            runners[CA_TORCH] = _torch_runner(models["ca"], size, cpu_kernels=False)
            results["pytorch"] = interleaved(runners, repeats, warmup=WARMUP)
        if "onnxruntime" in backends:
            with tempfile.TemporaryDirectory() as tmp:
                ort_runners = {k: _ort_runner(m, size, threads, Path(tmp), k) for k, m in models.items()}
                if ort_without_nchwc:
                    for k in ("plain", "ca"):
                        ort_runners[k + NO_NCHWC] = _ort_runner(models[k], size, threads, Path(tmp), k + NO_NCHWC,
                                                                without_nchwc=True)
                results["onnxruntime"] = interleaved(ort_runners, repeats, warmup=WARMUP)
    finally:
        torch.set_num_threads(previous)
    return results


def ratios(times: dict[str, list[float]]) -> tuple[float, float]:
    """``(A/A, CA/plain)``: the copy's and CA's median over plain's median."""
    return ratio(times, AA, "plain"), ratio(times, "ca", "plain")


def aa_warnings(results: dict[str, dict[str, list[float]]]) -> list[str]:
    """One line per backend whose A/A ratio is off 1.00 by more than AA_TOLERANCE."""
    return [line for backend, times in results.items()
            if (line := noise_warning(backend, ratios(times)[0], AA_TOLERANCE)) is not None]


def format_table(results: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table: per backend, min / median / max ms of each model, then A/A and CA/plain."""
    lines = ["| backend | plain ms (min / med / max) | plain copy ms | CA ms | A/A | CA / plain "
             "| CA without CPU kernels / plain |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for backend, t in results.items():
        aa, ca = ratios(t)
        torch_ops = f"{ratio(t, CA_TORCH, 'plain'):.3f}x" if CA_TORCH in t else "n/a"
        lines.append(f"| {backend} | {spread(t['plain'])} | {spread(t[AA])} | {spread(t['ca'])} "
                     f"| {aa:.3f}x | {ca:.3f}x | {torch_ops} |")
    return "\n".join(lines)


def _unit_gate_blocks(size: int) -> list[tuple[torch.Tensor, list[torch.Tensor], float, torch.Tensor]]:
    """``(CA input, CA parameters, BN eps, projection weight)`` of each fused block of the CA model at
    ``size``, with CA's gates forced to exactly 1 (zero conv_h/conv_w weights, bias 100: sigmoid(100)
    is 1.0 in fp32), so that the fused call computes the plain model's projection plus CA's pooling."""
    model, inputs = _build(CA), []
    blocks = [m for m in model.modules() if isinstance(m, ExpandedConv)]
    hooks = [b[ATTENTION_SLOT].register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
             for b in blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    cases = []
    for block, x in zip(blocks, inputs):
        attention = copy.deepcopy(block[ATTENTION_SLOT])
        with torch.no_grad():
            for conv in (attention.conv_h, attention.conv_w):
                conv.weight.zero_()
                conv.bias.fill_(100.0)
        cases.append((x, attention._fold_sources(), attention.bn1.eps, block[ATTENTION_SLOT + 1].weight))
    return cases


def projection_times(size: int = 512, threads: int = 2, repeats: int = 15) -> dict[str, list[float]]:
    """Seconds per image for the CA model's 16 pw-linear projections, interleaved: PyTorch's 1x1 conv
    ("conv"), the same again (the A/A control, AA), and the fused block's C++ call with CA's gates
    forced to 1 ("fused"). Whether the fused call's tiled matmul is any faster than PyTorch's conv:
    if it were, part of the CA/plain ratio would come from a faster projection rather than cheap CA.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ext, cases = cpu.kernels(), _unit_gate_blocks(size)
        if ext is None:
            raise RuntimeError("the CPU kernels could not be built; see the warning above")
        with torch.no_grad():
            for x, params, eps, weight in cases:  # time only what computes the plain projection
                torch.testing.assert_close(ext.forward_project(x, params, eps, weight), F.conv2d(x, weight),
                                           atol=1e-4, rtol=1e-4)

        def convs():
            with torch.no_grad():
                for x, _, _, weight in cases:
                    F.conv2d(x, weight)

        def fused():
            with torch.no_grad():
                for x, params, eps, weight in cases:
                    ext.forward_project(x, params, eps, weight)

        return interleaved({"conv": convs, AA: convs, "fused": fused}, repeats, warmup=WARMUP)
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m seg.cpu_bench", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--size", type=int, default=512, help="square input side (multiple of 16)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both backends")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per model and backend")
    p.add_argument("--backend", choices=[*BACKENDS, "both"], default="both", help="which runtime(s) to time")
    p.add_argument("--ort-without-nchwc", action="store_true",
                   help="also time onnxruntime with its NCHWc layout off (plain and CA)")
    p.add_argument("--projections", action="store_true",
                   help="instead: time the 16 projections, PyTorch's conv against the fused call with unit gates")
    args = p.parse_args(argv)
    if args.projections:
        t = projection_times(args.size, args.threads, args.repeats)
        print(f"16 pw-linear projections at {args.size}x{args.size}, {args.threads} threads, {args.repeats} "
              f"interleaved runs: conv {spread(t['conv'])} ms, conv again {spread(t[AA])} ms "
              f"(A/A {ratio(t, AA, 'conv'):.3f}x), fused with unit gates {spread(t['fused'])} ms "
              f"({ratio(t, 'fused', 'conv'):.3f}x conv)")
        return
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    calibrate.reset()
    results = benchmark(args.size, args.threads, args.repeats, backends, args.ort_without_nchwc)
    print(f"DeepLabV3-MobileNetV2 OS16, fp32, batch 1, {args.size}x{args.size}, {args.threads} threads, "
          f"{args.repeats} interleaved runs per model; ratios are of medians")
    print(format_table(results))
    if "pytorch" in results:  # which path each CA block shape took in "CA" (SEG_CPU_KERNELS=auto calibrates)
        print(calibrate.summary() + f" at 1x3x{args.size}x{args.size}, {args.threads} threads")
    ort = results.get("onnxruntime", {})
    if "ca" + NO_NCHWC in ort:
        plain = statistics.median(ort["plain"])
        print("onnxruntime with its NCHWc layout off, over plain with it: " + ", ".join(
            f"{k} {statistics.median(ort[k + NO_NCHWC]) / plain:.3f}x" for k in ("plain", "ca")))
    for line in aa_warnings(results):
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
