"""CUDA graphs for fixed-shape training and inference: one replay instead of hundreds of launches.

At DeepLabV3-MobileNetV2 sizes a fast GPU waits on Python launching small kernels (CA adds about
a dozen per block), so replaying a captured graph removes the cost that eager mode pays per op.
Training graphs the model's forward and backward with ``torch.cuda.make_graphed_callables``; the
loss and the optimizer step stay eager (a few fused launches), so every optimizer, scheduler and
GradScaler works unchanged. Shapes must stay fixed: training batches are (``drop_last``).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Callable

import torch
from torch import nn

from seg.engine.loop import autocast
from seg.kernels.fast import fold_caches

log = logging.getLogger(__name__)


def graph_training(model: nn.Module, images: torch.Tensor, amp: str = "none") -> nn.Module:
    """``model`` with its train-mode forward and backward replayed from CUDA graphs for inputs shaped
    like ``images``; in eval mode (validation) it runs eagerly as before.

    Capturing runs a few warm-up steps; the model's buffers (BatchNorm statistics) are put back
    afterwards, so a graphed run trains exactly as the eager one from the same state.
    """
    if images.device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors, got images on {images.device}")
    model.train()
    saved = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.cuda.get_rng_state(images.device)  # the warm-up's dropout draws must not shift the run's
    with autocast(images.device, amp, cache=False):
        graphed = torch.cuda.make_graphed_callables(model, (images,))
    with torch.no_grad():
        for name, b in graphed.named_buffers():
            b.copy_(saved[name])  # in place: the graphs hold these tensors' addresses
    torch.cuda.set_rng_state(rng, images.device)
    return graphed


class GraphedInference:
    """Eval-mode forward of ``model`` captured for inputs shaped like ``images``; call it with a new batch.

    The returned logits live in a static buffer that the next call overwrites. The graph reads the
    model's parameters in place, but BN folded into a projection was folded at capture: after
    changing the weights, capture anew.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, amp: str = "none", warmup: int = 3) -> None:
        if images.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors, got images on {images.device}")
        self.model = model.eval()  # kept alive: the graph reads its parameters
        self.static_in = images.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), autocast(images.device, amp, cache=False):
            for _ in range(warmup):  # lets cuDNN pick its algorithms before capture
                model(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad(), autocast(images.device, amp, cache=False):
            self.static_out = model(self.static_in)
        # BN folded into weights (seg.kernels.fast) is cached outside the graph's pool; it must
        # outlive the module's cache, which eval()/train() drop
        self._folds = fold_caches(model)

    def __call__(self, images: torch.Tensor):
        self.static_in.copy_(images)
        self.graph.replay()
        return self.static_out


class ShapeGraphs(nn.Module):
    """Eval-mode ``model`` that replays a CUDA graph per input shape: evaluation and prediction.

    Shapes are whatever the caller runs, padded as :mod:`seg.inference.tta` pads them (to the
    output stride, or a sliding window's crop), so no prediction changes. Padding further, to a few
    size buckets, would change them: CA's strip means and ASPP's image pooling average over the
    padding too. A shape is captured the second time it comes (most of VOC's whole-image sizes come
    once, and a capture costs a few forwards); the ``max_graphs`` most recently used are kept.
    Training mode, grad, or a shape seen once run ``model`` eagerly. Switching to training mode
    drops the graphs (the weights are about to change, and BN folds are fixed at capture).
    """

    def __init__(self, model: nn.Module, max_graphs: int = 8,
                 capture: Callable[[nn.Module, torch.Tensor, str], Callable] | None = None) -> None:
        super().__init__()
        self.model = model
        self.max_graphs = max_graphs
        self._capture = capture or _capture_warm  # tests swap in a fake: capturing needs a GPU
        self._graphs: OrderedDict[tuple, GraphedInference] = OrderedDict()
        self._seen: Counter[tuple] = Counter()
        self.train(model.training)

    def train(self, mode: bool = True) -> "ShapeGraphs":
        if mode:
            self._graphs.clear()
            self._seen.clear()
        return super().train(mode)

    def forward(self, images: torch.Tensor):
        if self.training or torch.is_grad_enabled():
            return self.model(images)
        amp = _autocast_amp(images.device.type)
        key = (tuple(images.shape), images.stride(), images.dtype, images.device, amp)
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] += 1
            if self._seen[key] != 2:  # once, or a shape whose capture failed: eagerly
                return self.model(images)
            try:
                graph = self._capture(self.model, images, amp)
            except RuntimeError as err:  # e.g. out of memory for one more graph: this shape stays eager
                log.warning("CUDA graph capture for input %s failed, so it runs eagerly: %s", tuple(images.shape),
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
                return self.model(images)
            self._graphs[key] = graph
            if len(self._graphs) > self.max_graphs:
                dropped, _ = self._graphs.popitem(last=False)
                self._seen[dropped] = 1  # seen again, it is captured again
        self._graphs.move_to_end(key)
        # the graph's output buffer is overwritten by its next replay; callers keep and edit outputs
        return _clone(graph(images))


def _capture_warm(model: nn.Module, images: torch.Tensor, amp: str) -> GraphedInference:
    # the shape has run eagerly once already (cuDNN and Triton are ready for it): one warm-up
    # on the capture's side stream is all the capture needs
    return GraphedInference(model, images, amp, warmup=1)


def _autocast_amp(device_type: str) -> str:
    """The amp setting (``seg.engine.loop.autocast``'s names) in force on ``device_type``."""
    if not torch.is_autocast_enabled(device_type):
        return "none"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[torch.get_autocast_dtype(device_type)]


def _clone(out):
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out.clone()
