"""CUDA graphs for fixed-shape training and inference: one replay instead of hundreds of launches.

At DeepLabV3-MobileNetV2 sizes a fast GPU waits on Python launching small kernels (CA adds about
a dozen per block), so replaying a captured graph removes the cost that eager mode pays per op.
Training graphs the model's forward and backward with ``torch.cuda.make_graphed_callables``; the
loss and the optimizer step stay eager (a few fused launches), so every optimizer, scheduler and
GradScaler works unchanged. Shapes must stay fixed: training batches are (``drop_last``).
"""

from __future__ import annotations

import torch
from torch import nn

from seg.engine.loop import autocast


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

    The returned logits live in a static buffer that the next call overwrites.
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

    def __call__(self, images: torch.Tensor):
        self.static_in.copy_(images)
        self.graph.replay()
        return self.static_out
