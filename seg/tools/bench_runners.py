"""How ``seg.tools.bench`` runs one model: a PyTorch train step and inference call (eager,
``torch.compile`` or CUDA graphs), or an onnxruntime session; :mod:`seg.tools.bench_models` times them."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from seg.engine.graphs import GraphedInference, graph_training
from seg.engine.loop import TrainState, autocast, train_step
from seg.export.onnx import export_onnx
from seg.kernels import cpu
from seg.kernels.fast import optimize_for_inference

STEPS = ("train", "infer")
FLOPS_SIZE = 512


@dataclass
class BenchSetup:
    """How to measure: the device, batch and input size, repeats, precision, and which steps to time."""

    device: str = "cpu"
    batch: int = 2
    size: int = 256
    repeats: int = 5
    warmup: int = 2
    amp: str = "none"
    channels_last: bool = False
    flops_size: int = FLOPS_SIZE
    threads: int | None = None
    steps: tuple[str, ...] = STEPS


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One variant on PyTorch: its train step and inference call, and its CUDA peak memory."""

    def __init__(self, model: nn.Module, setup: BenchSetup, mode: str = "eager", cpu_kernels: bool = True) -> None:
        self.setup, self.mode, self.cpu_kernels = setup, mode, cpu_kernels
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
        self.peak_gib: float | None = None
        self.calls = {"train": self.train_once, "infer": self.infer_once}  # what it can time, by step

    def train_once(self) -> None:
        self.step_model.train()
        train_step(self.state, self.images, self.targets, amp=self.setup.amp, aux_weight=0.0, grad_clip=None)

    @torch.no_grad()
    def infer_once(self) -> None:
        self.model.eval()
        with autocast(self.device, self.setup.amp), nullcontext() if self.cpu_kernels else cpu.disabled():
            self.infer(self.images)

    def resident_bytes(self) -> int:
        """Bytes this variant keeps between steps: weights, buffers, gradients, momentum."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for s in self.state.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def measure_peak(self) -> None:
        """Peak memory of one train step as if this variant were alone on the GPU."""
        if self.device.type != "cuda" or self.mode == "graphs" or "train" not in self.setup.steps:
            return  # graphs keep their memory in private pools, allocated at capture: not a step's peak
        synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.train_once()
        synchronize(self.device)
        # the other variants' weights are resident too; count only this one's
        extra = torch.cuda.max_memory_allocated(self.device) - before
        self.peak_gib = (extra + self.resident_bytes()) / 2**30


def ort_session(path: Path, threads: int, without_nchwc: bool = False, optimized_path: Path | None = None):
    """An onnxruntime CPU session for ``path``; ``without_nchwc`` switches ORT's NCHWc layout transformer
    off (ORT ignores unknown optimizer names silently, so tests check the optimized graph it saves
    to ``optimized_path``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    disabled = {"disabled_optimizers": ["NchwcTransformer"]} if without_nchwc else {}
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], **disabled)


class OrtRunner:
    """One variant exported to ONNX and run by onnxruntime on the CPU: inference only."""

    device = torch.device("cpu")
    peak_gib = None

    def __init__(self, model: nn.Module, setup: BenchSetup, nchwc: bool = True) -> None:
        with tempfile.TemporaryDirectory() as tmp:  # the session holds the graph; the file can go
            path = Path(tmp) / "model.onnx"
            export_onnx(model.eval(), path, setup.size, setup.size)
            self.session = ort_session(path, torch.get_num_threads(), without_nchwc=not nchwc)
        self.image = np.random.default_rng(0).standard_normal((setup.batch, 3, setup.size, setup.size),
                                                              dtype=np.float32)
        self.calls = {"infer": self.infer_once}

    def infer_once(self) -> None:
        self.session.run(None, {"image": self.image})

    def measure_peak(self) -> None:
        pass
