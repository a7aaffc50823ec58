"""Cost of the attention blocks inside DeepLabV3: ``python -m seg.bench [--device cuda] [--json FILE]``.

For plain / SE / CBAM / CA on each encoder and output stride it measures parameters, GFLOPs (at
``--flops-size``, default 512), the training step time (forward + backward + SGD step) and the
inference time, as medians over ``--repeats`` after ``--warmup`` untimed calls. Where the fused CA
kernels can run (CUDA), "CA fused" is CA through them. "plain A/A", a second plain built
apart, is the control: its ratio to plain shows how far the run's noise alone moves a ratio.
The variants of one encoder are timed in turn within every repeat, so a slow spell of a shared
machine hits them all alike, and each variant's ratio to plain comes from that same run.

CUDA defaults: bf16 autocast, channels-last, batch 16 at 512, eager and ``torch.compile``.
CPU defaults: fp32, batch 2 at 256, eager only; peak memory is reported only on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from seg.cli import HelpFormatter
from seg.complexity import count_flops_on_meta, count_params
from seg.encoders.register import ENCODER_NAMES
from seg.kernels.fast import LEAN_EVAL_DEVICES, FastCoordAttention, optimize_for_inference
from seg.engine import TrainState, autocast, train_step
from seg.graphs import GraphedInference, graph_training
from seg.kernels import kernels_can_run
from seg.models import build_model, set_fused_ca
from seg.timing import interleaved

ENCODERS = ("mobilenet_v2", "resnet50")
VARIANTS = {"plain": "none", "SE": "se", "CBAM": "cbam", "CA": "ca"}  # variant -> attention kind
FUSED_CA = "CA fused"  # CA through seg.kernels' Triton kernels; benched only where they run (CUDA)
LEAN_CA = "CA lean eval"  # CA with its lean inference path where it is off by default (CUDA): timed to decide
AA = "plain A/A"  # a second, separately built plain: its ratio to plain is the run's noise floor
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # the paper's DeepLabV3 rates per output stride
NUM_CLASSES = 21
FLOPS_SIZE = 512
DEFAULTS = {"cuda": dict(batch=16, size=512, amp="bf16", channels_last=True, compile="both"),
            "cpu": dict(batch=2, size=256, amp="none", channels_last=False, compile="off")}
COLUMNS = ("encoder", "variant", "OS", "mode", "params (M)", "GFLOPs", "train step (ms)", "train img/s",
           "infer img/s", "peak mem (GiB)", "train / plain", "infer / plain")


@dataclass
class BenchSetup:
    """How to measure: the device, batch and input size, repeats, and the precision settings."""

    device: str = "cpu"
    batch: int = 2
    size: int = 256
    repeats: int = 5
    warmup: int = 2
    amp: str = "none"
    channels_last: bool = False
    flops_size: int = FLOPS_SIZE
    threads: int | None = None


def variant_encoder(encoder: str, kind: str) -> tuple[str, str | None]:
    """Our named encoder for ``kind`` where there is one (``mobilenet_v2_ca``), else ``encoder`` with
    ``kind`` attached by ``seg.attach`` (any ``tu-`` timm backbone; "none" strips its own SE)."""
    named = f"{encoder}_{kind}"
    return (named, None) if named in ENCODER_NAMES else (encoder, kind)


def build_variant(encoder: str, output_stride: int, attention: str | None = None) -> nn.Module:
    """DeepLabV3 with separable ASPP on ``encoder`` at ``output_stride``, with the paper's rates."""
    return build_model("deeplabv3", encoder, NUM_CLASSES, output_stride=output_stride,
                       decoder_atrous_rates=ATROUS_RATES[output_stride], aspp_separable=True, attention=attention)


def gflops(model: nn.Module, size: int) -> float:
    """GFLOPs of one image at ``size`` x ``size``; counted on the meta device, so nothing is computed."""
    return count_flops_on_meta(model, (1, 3, size, size)) / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One variant on the device: its train step and inference call, and the samples timed so far."""

    def __init__(self, name: str, model: nn.Module, setup: BenchSetup, mode: str = "eager") -> None:
        self.name, self.setup, self.mode = name, setup, mode
        self.device = torch.device(setup.device)
        fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
        # inference is timed as evaluation runs it: with CA's fast paths (training runs the reference)
        model = optimize_for_inference(model.to(self.device, memory_format=fmt))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
        self.model = model
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(setup.batch, 3, setup.size, setup.size, generator=gen).to(
            self.device, memory_format=fmt)
        self.step_model = torch.compile(model) if mode == "compile" else model
        self.infer = self.step_model
        if mode == "graphs":
            self.step_model = graph_training(model, self.images, setup.amp)
            self.infer = GraphedInference(model, self.images, setup.amp)
        self.state = TrainState(self.step_model, optimizer, scheduler,
                                torch.amp.GradScaler(self.device.type, enabled=False))
        classes = model.segmentation_head[0].out_channels  # smp's head: conv, upsampling, activation
        self.targets = torch.randint(0, classes, (setup.batch, setup.size, setup.size), generator=gen).to(self.device)
        self.train_ms: list[float] = []
        self.infer_ms: list[float] = []
        self.peak_gib: float | None = None

    def train_once(self) -> None:
        self.step_model.train()
        train_step(self.state, self.images, self.targets, amp=self.setup.amp, aux_weight=0.0, grad_clip=None)

    @torch.no_grad()
    def infer_once(self) -> None:
        self.model.eval()
        with autocast(self.device, self.setup.amp):
            self.infer(self.images)

    def resident_bytes(self) -> int:
        """Bytes this variant keeps between steps: weights, buffers, gradients, momentum."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for s in self.state.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def measure_peak(self) -> None:
        """Peak memory of one train step as if this variant were alone on the GPU."""
        if self.device.type != "cuda" or self.mode == "graphs":
            return  # graphs keep their memory in private pools, allocated at capture: not a step's peak
        _synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.train_once()
        _synchronize(self.device)
        # the other variants' weights are resident too; count only this one's
        extra = torch.cuda.max_memory_allocated(self.device) - before
        self.peak_gib = (extra + self.resident_bytes()) / 2**30


def time_models(models: dict[str, nn.Module], setup: BenchSetup, mode: str = "eager") -> dict[str, dict]:
    """Median train-step and inference ms (and CUDA peak GiB) per model, timed interleaved.

    ``mode`` is "eager", "compile" (``torch.compile``) or "graphs" (CUDA graphs, :mod:`seg.graphs`).
    The first model is the baseline of the ``train_ratio`` / ``infer_ratio`` entries.
    """
    runners = [Runner(name, model, setup, mode) for name, model in models.items()]
    first_s = {}  # the warm-up's seconds: in "compile" mode, mostly compiling
    for runner in runners:
        start = time.perf_counter()
        for _ in range(setup.warmup):
            runner.train_once()
            runner.infer_once()
        _synchronize(runner.device)
        first_s[runner.name] = time.perf_counter() - start
        runner.measure_peak()
    calls = {}
    for runner in runners:
        calls[runner.name, "train"], calls[runner.name, "infer"] = runner.train_once, runner.infer_once
    seconds = interleaved(calls, setup.repeats, sync=lambda: _synchronize(runners[0].device))
    for runner in runners:
        runner.train_ms = [t * 1e3 for t in seconds[runner.name, "train"]]
        runner.infer_ms = [t * 1e3 for t in seconds[runner.name, "infer"]]
    base_train, base_infer = statistics.median(runners[0].train_ms), statistics.median(runners[0].infer_ms)
    times = {}
    for runner in runners:
        train_ms, infer_ms = statistics.median(runner.train_ms), statistics.median(runner.infer_ms)
        times[runner.name] = dict(train_ms=train_ms, train_img_s=setup.batch * 1e3 / train_ms, infer_ms=infer_ms,
                                  infer_img_s=setup.batch * 1e3 / infer_ms, peak_mem_gib=runner.peak_gib,
                                  train_ratio=train_ms / base_train, infer_ratio=infer_ms / base_infer,
                                  warmup_s=first_s[runner.name])
    return times


def bench_group(encoder: str, output_stride: int, setup: BenchSetup, mode: str,
                variants: dict[str, str] = VARIANTS) -> list[dict]:
    """Rows for every attention variant of ``encoder``; the first variant is the baseline."""
    rows, models = [], {}
    for name, kind in variants.items():
        torch.manual_seed(0)
        encoder_name, attention = variant_encoder(encoder, kind)
        models[name] = build_variant(encoder_name, output_stride, attention)
        set_fused_ca(models[name], name == FUSED_CA)
        if name == LEAN_CA:
            for block in optimize_for_inference(models[name]).modules():
                if isinstance(block, FastCoordAttention):
                    block.lean_eval_devices = (*block.lean_eval_devices, torch.device(setup.device).type)
        rows.append({"encoder": encoder, "variant": name, "encoder_name": encoder_name, "attention": attention,
                     "os": output_stride,
                     "mode": mode, "params": count_params(models[name]),
                     "gflops": gflops(models[name], setup.flops_size), "flops_size": setup.flops_size})
    times = time_models(models, setup, mode)
    for row in rows:
        row.update(times[row["variant"]])
    return rows


def run_bench(setup: BenchSetup, encoders: tuple[str, ...] = ENCODERS, output_strides: tuple[int, ...] = (16, 8),
              modes: tuple[str, ...] = ("eager",), names: list[str] | None = None) -> dict:
    """Every (encoder, OS, mode) group; returns ``{"setup": ..., "rows": [...]}`` for the table and JSON.

    ``names`` picks variants (default: all that can run here); plain always runs first, as the baseline.
    """
    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    for os_ in output_strides:
        if os_ not in ATROUS_RATES:
            raise ValueError(f"output stride must be one of {sorted(ATROUS_RATES)}, got {os_}")
    available = {"plain": "none", AA: "none", **VARIANTS}
    if kernels_can_run(torch.empty(0, device=setup.device)):
        available[FUSED_CA] = VARIANTS["CA"]
    if torch.device(setup.device).type not in LEAN_EVAL_DEVICES:
        available[LEAN_CA] = VARIANTS["CA"]  # the lean inference path, where CA does not take it by default
    if "graphs" in modes and torch.device(setup.device).type != "cuda":
        raise ValueError("mode 'graphs' (CUDA graphs) needs --device cuda")
    names = list(available) if names is None else ["plain", *(n for n in names if n != "plain")]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {list(available)}")
    variants = {n: available[n] for n in names}
    rows = []
    for mode in modes:
        for encoder in encoders:
            for os_ in output_strides:
                rows += bench_group(encoder, os_, setup, mode, variants)
                if setup.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return {"setup": {**asdict(setup), "torch": torch.__version__, "threads": torch.get_num_threads()}, "rows": rows}


def format_table(result: dict) -> str:
    """One markdown table of ``run_bench``'s rows, with a header line saying how it was measured."""
    s = result["setup"]
    header = (f"DeepLabV3 (separable ASPP), {s['device']}, batch {s['batch']} at {s['size']}x{s['size']}, "
              f"amp {s['amp']}, channels_last {s['channels_last']}, {s['threads']} threads, median of "
              f"{s['repeats']} after {s['warmup']} warm-up; GFLOPs per image at {s['flops_size']}x{s['flops_size']}")
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 4 + "---:|" * (len(COLUMNS) - 4)]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        cells = (r["encoder"], r["variant"], r["os"], r["mode"], f"{r['params'] / 1e6:.2f}",
                 f"{r['gflops']:.2f}", f"{r['train_ms']:.1f}", f"{r['train_img_s']:.1f}", f"{r['infer_img_s']:.1f}",
                 peak, f"{r['train_ratio']:.3f}", f"{r['infer_ratio']:.3f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg.bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to time")
    p.add_argument("--batch", type=int, help="default: 16 on CUDA, 2 on CPU")
    p.add_argument("--size", type=int, help="input side; default: 512 on CUDA, 256 on CPU")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), help="backbones to time")
    p.add_argument("--os", type=int, nargs="+", default=[16, 8], choices=sorted(ATROUS_RATES),
                   help="DeepLabV3 output strides to time")
    p.add_argument("--compile", choices=["off", "on", "both"], help="default: both on CUDA, off on CPU")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile", "graphs"],
                   help="execution modes to time (overrides --compile); graphs = CUDA graphs, CUDA only "
                        "(default: from --compile)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--flops-size", type=int, default=FLOPS_SIZE, help="input side the GFLOPs are counted at")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help=f"default: all of {['plain', AA, *list(VARIANTS)[1:], FUSED_CA]} that can run here")
    p.add_argument("--json", type=Path, help="also write the rows and setup here (default: print only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    # batch 1 cannot train: the ASPP's pooled branch gives BatchNorm one value per channel
    for key, least in (("batch", 2), ("size", 32), ("repeats", 1), ("warmup", 0)):
        value = getattr(args, key)
        if value is not None and value < least:
            raise SystemExit(f"error: --{key} must be >= {least}, got {value}")
    setup = BenchSetup(device=args.device, batch=args.batch or defaults["batch"], size=args.size or defaults["size"],
                       repeats=args.repeats, warmup=args.warmup, amp=defaults["amp"],
                       channels_last=defaults["channels_last"], flops_size=args.flops_size, threads=args.threads)
    modes = {"off": ("eager",), "on": ("compile",), "both": ("eager", "compile")}[args.compile or defaults["compile"]]
    modes = tuple(args.modes) if args.modes else modes
    try:
        result = run_bench(setup, tuple(args.encoders), tuple(args.os), modes, args.variants)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
