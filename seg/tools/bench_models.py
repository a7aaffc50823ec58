"""Whole-model timing for ``python -m seg.tools.bench``: DeepLabV3 with each attention, on PyTorch
(eager, ``torch.compile`` or CUDA graphs) or onnxruntime, every variant of a group timed in turn
within each repeat by :mod:`seg.tools.timing`.

A *group* is one encoder at one output stride in one mode; its first variant, plain, is the
baseline of every ratio, and "plain A/A", a second plain built apart, is the control that shows
how far the run's noise alone moves a ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from seg.kernels import kernels_can_run
from seg.kernels.fast import FastCoordAttention, FastExpandedConv, LEAN_EVAL_DEVICES, optimize_for_inference, use_fused
from seg.modeling.encoders.register import ENCODER_NAMES
from seg.modeling.models import build_model
from seg.tools.bench_runners import BenchSetup, OrtRunner, Runner, STEPS, synchronize
from seg.tools.complexity import count_flops_on_meta, count_params
from seg.tools.timing import cpu_name, interleaved

ENCODERS = ("mobilenet_v2", "resnet50")
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # the paper's DeepLabV3 rates per output stride
NUM_CLASSES = 21
AA = "plain A/A"
FUSED_CA = "CA fused"
PROLOGUE_CA = "CA prologue"
LEAN_CA = "CA lean eval"
CA_TORCH = "CA without CPU kernels"
NO_NCHWC = " without NCHWc"  # suffix of the onnxruntime variants with its NCHWc layout off


@dataclass(frozen=True)
class Variant:
    """One timed model: its attention kind and the execution path it is forced onto."""

    attention: str  # none / se / cbam / ca
    fused: bool = False  # CA through the Triton kernels (CUDA); at inference without the projection prologue
    prologue: bool = False  # fused, and the gate inside the projection's GEMM (seg.kernels.projection, _grad)
    lean: bool = False  # CA's lean inference path, where it is off by default (CUDA): timed to decide
    cpu_kernels: bool = True  # False: CA through PyTorch's ops, what it costs without seg.kernels.cpu
    nchwc: bool = True  # False: onnxruntime with its NCHWc layout transformer off


VARIANTS = {"plain": Variant("none"), AA: Variant("none"), "SE": Variant("se"), "CBAM": Variant("cbam"),
            "CA": Variant("ca")}


def available_variants(device: str, mode: str, ort_without_nchwc: bool = False) -> dict[str, Variant]:
    """Every variant that can run in ``mode`` on ``device``, plain first."""
    available = dict(VARIANTS)
    kind = torch.device(device).type
    if mode == "onnxruntime":
        if ort_without_nchwc:
            available.update({name + NO_NCHWC: Variant(VARIANTS[name].attention, nchwc=False)
                              for name in ("plain", "CA")})
        return available
    if kernels_can_run(torch.empty(0, device=device)):
        available[FUSED_CA] = Variant("ca", fused=True)
        available[PROLOGUE_CA] = Variant("ca", fused=True, prologue=True)
    if kind not in LEAN_EVAL_DEVICES:
        available[LEAN_CA] = Variant("ca", lean=True)
    if kind == "cpu":
        available[CA_TORCH] = Variant("ca", cpu_kernels=False)
    return available


def variant_encoder(encoder: str, kind: str) -> tuple[str, str | None]:
    """Our named encoder for ``kind`` where there is one (``mobilenet_v2_ca``), else ``encoder`` with
    ``kind`` attached by ``seg.modeling.attach`` (any ``tu-`` timm backbone; "none" strips its own SE)."""
    named = f"{encoder}_{kind}"
    return (named, None) if named in ENCODER_NAMES else (encoder, kind)


def build_variant(encoder: str, output_stride: int, attention: str | None = None) -> nn.Module:
    """DeepLabV3 with separable ASPP on ``encoder`` at ``output_stride``, with the paper's rates."""
    return build_model("deeplabv3", encoder, NUM_CLASSES, output_stride=output_stride,
                       decoder_atrous_rates=ATROUS_RATES[output_stride], aspp_separable=True, attention=attention)


def gflops(model: nn.Module, size: int) -> float:
    """GFLOPs of one image at ``size`` x ``size``; counted on the meta device, so nothing is computed."""
    return count_flops_on_meta(model, (1, 3, size, size)) / 1e9


def time_models(models: dict[str, nn.Module], setup: BenchSetup, mode: str = "eager",
                variants: dict[str, Variant] | None = None) -> dict[str, dict]:
    """Median ms (and img/s, ratios, the samples) of each model's steps, timed interleaved.

    ``mode`` is "eager", "compile", "graphs" (CUDA graphs) or "onnxruntime"; the first model is the
    baseline of the ``*_ratio`` entries; a step not timed (not in ``setup.steps``, or train on
    onnxruntime) has ``None`` in its entries.
    """
    variants = variants or {}
    runners = {}
    for name, model in models.items():
        v = variants.get(name, Variant("none"))
        runners[name] = OrtRunner(model, setup, v.nchwc) if mode == "onnxruntime" else \
            Runner(model, setup, mode, v.cpu_kernels)
    steps = [s for s in setup.steps if s in next(iter(runners.values())).calls]
    first_s = {}  # the warm-up's seconds: in "compile" mode, mostly compiling
    for name, runner in runners.items():
        start = time.perf_counter()
        for _ in range(setup.warmup):
            for step in steps:
                runner.calls[step]()
        synchronize(runner.device)
        first_s[name] = time.perf_counter() - start
        runner.measure_peak()
    calls = {(name, step): runner.calls[step] for name, runner in runners.items() for step in steps}
    device = next(iter(runners.values())).device
    seconds = interleaved(calls, setup.repeats, sync=lambda: synchronize(device))
    base = next(iter(runners))
    times = {}
    for name, runner in runners.items():
        times[name] = {"peak_mem_gib": runner.peak_gib, "warmup_s": first_s[name]}
        for step in STEPS:
            own, baseline = seconds.get((name, step), []), seconds.get((base, step), [])
            times[name].update(_step_entries(step, own, baseline, setup.batch))
    return times


def _step_entries(step: str, seconds: list[float], base: list[float], batch: int) -> dict:
    """``<step>_ms`` (the median), its samples, img/s and its ratio to the baseline's median; None
    where the step was not timed."""
    if not seconds:
        return {f"{step}_ms": None, f"{step}_samples_ms": [], f"{step}_img_s": None, f"{step}_ratio": None}
    ms = statistics.median(seconds) * 1e3
    return {f"{step}_ms": ms, f"{step}_samples_ms": [t * 1e3 for t in seconds], f"{step}_img_s": batch * 1e3 / ms,
            f"{step}_ratio": statistics.median(seconds) / statistics.median(base)}


def build_group(encoder: str, output_stride: int, variants: dict[str, Variant], device: str) -> dict[str, nn.Module]:
    """One model per variant, each built apart from the same seed (so plain and its A/A share weights)."""
    models = {}
    for name, v in variants.items():
        torch.manual_seed(0)
        encoder_name, attention = variant_encoder(encoder, v.attention)
        models[name] = build_variant(encoder_name, output_stride, attention)
        use_fused(models[name], v.fused)
        if v.fused:
            for block in optimize_for_inference(models[name]).modules():
                if isinstance(block, FastExpandedConv):
                    block.prologue = block.train_prologue = v.prologue
        if v.lean:
            for block in optimize_for_inference(models[name]).modules():
                if isinstance(block, FastCoordAttention):
                    block.lean_eval_devices = (*block.lean_eval_devices, torch.device(device).type)
    return models


def bench_group(encoder: str, output_stride: int, setup: BenchSetup, mode: str,
                variants: dict[str, Variant] = VARIANTS) -> list[dict]:
    """Rows for every variant of ``encoder`` in ``mode``; the first variant is the baseline."""
    models = build_group(encoder, output_stride, variants, setup.device)
    rows, flops = [], {}
    for name, model in models.items():  # counted before timing swaps in CA's fast paths
        encoder_name, attention = variant_encoder(encoder, variants[name].attention)
        # variants of one network (plain and its A/A copy, CA with and without its kernels) share a count
        if (encoder_name, attention) not in flops:
            flops[encoder_name, attention] = gflops(model, setup.flops_size)
        rows.append({"encoder": encoder, "variant": name, "encoder_name": encoder_name, "attention": attention,
                     "os": output_stride, "mode": mode, "params": count_params(model),
                     "gflops": flops[encoder_name, attention], "flops_size": setup.flops_size})
    times = time_models(models, setup, mode, variants)
    return [{**row, **times[row["variant"]]} for row in rows]


def pick_variants(groups: dict[str, dict[str, Variant]], names: list[str] | None,
                  strict: bool = True) -> dict[str, dict[str, Variant]]:
    """Per mode, the variants of ``names`` that can run in it (None or ["all"]: every one), plain first.

    With ``strict``, a name no mode can run is refused, before anything is timed.
    """
    if names in (None, ["all"]):
        return groups
    names = ["plain", *(n for n in names if n != "plain")]
    unknown = [n for n in names if not any(n in available for available in groups.values())]
    if unknown and strict:
        known = list(dict.fromkeys(n for available in groups.values() for n in available))
        raise ValueError(f"unknown variants {unknown}; expected some of {known}")
    # a name's onnxruntime twin without NCHWc comes along where --ort-without-nchwc made one
    names = [m for n in names for m in (n, n + NO_NCHWC)]
    return {mode: {n: available[n] for n in names if n in available} for mode, available in groups.items()}


def run_bench(setup: BenchSetup, encoders: tuple[str, ...] = ENCODERS, output_strides: tuple[int, ...] = (16, 8),
              modes: tuple[str, ...] = ("eager",), names: list[str] | None = None,
              ort_without_nchwc: bool = False, strict: bool = True) -> dict:
    """Every (mode, encoder, OS) group; returns ``{"setup": ..., "rows": [...]}`` for the table and JSON.

    ``names`` picks variants (default: all that can run in each mode; ``strict``: refuse a name that
    none can run); plain always runs first.
    """
    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    for os_ in output_strides:
        if os_ not in ATROUS_RATES:
            raise ValueError(f"output stride must be one of {sorted(ATROUS_RATES)}, got {os_}")
    kind = torch.device(setup.device).type
    if "graphs" in modes and kind != "cuda":
        raise ValueError("mode 'graphs' (CUDA graphs) needs --device cuda")
    if "onnxruntime" in modes and kind != "cpu":
        raise ValueError("backend onnxruntime runs on the CPU here: use --device cpu")
    groups = pick_variants({mode: available_variants(setup.device, mode, ort_without_nchwc) for mode in modes}, names,
                           strict)
    rows = []
    for mode, variants in groups.items():
        for encoder in encoders:
            for os_ in output_strides:
                rows += bench_group(encoder, os_, setup, mode, variants)
                if kind == "cuda":
                    torch.cuda.empty_cache()
    return {"setup": {**asdict(setup), "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name()},
            "rows": rows}
