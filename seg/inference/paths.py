"""Which implementation evaluation and prediction run a checkpoint's model on: the *inference path*.

Every path computes the same function as the paper's layers; they differ in speed, and within
floating-point rounding. ``eval.fast`` (default true) takes the fastest path verified for the
device; ``eval.fast=false`` forces the reference. ``eval_seg.py --json`` records the path taken.

- ``reference``: the layers as built (the paper's CA block), eager.
- ``lean`` (CPU): ``seg.kernels.fast.optimize_for_inference``: CA in fewer ops or the C++ kernels.
- ``graphs`` (CUDA without Triton, or a model without CA): the lean model, channels_last, replayed
  from a CUDA graph per input shape (``seg.engine.graphs.ShapeGraphs``).
- ``fused+graphs`` (CUDA with Triton and CA): as ``graphs``, with CA's Triton kernels, whose
  expanded MobileNetV2 blocks gate inside the projection's GEMM (``seg.kernels.projection``).
"""

from __future__ import annotations

import torch
from torch import nn

from seg.config import Config
from seg.engine.graphs import ShapeGraphs
from seg.kernels import HAS_TRITON, calibrate
from seg.kernels.fast import optimize_for_inference, use_fused
from seg.modeling.attention import CoordAttention
from seg.modeling.models import model_from_checkpoint
from seg.runs.checkpoint import saved_cpu_paths

REFERENCE, LEAN, GRAPHS, FUSED_GRAPHS = "reference", "lean", "graphs", "fused+graphs"


def choose_path(fast: bool, device_type: str, has_triton: bool, has_ca: bool) -> str:
    """The inference path for a model on ``device_type`` (see the module docstring)."""
    if not fast:
        return REFERENCE
    if device_type != "cuda":
        return LEAN
    return FUSED_GRAPHS if has_triton and has_ca else GRAPHS


def prepare_inference(model: nn.Module, device: torch.device, fast: bool = True) -> tuple[nn.Module, str]:
    """``model`` in eval mode on ``device``, on the fastest verified path (``fast``) or the
    reference; returns the module to call and the path's name. The model is changed in place."""
    model = model.to(device).eval()
    has_ca = any(isinstance(m, CoordAttention) for m in model.modules())
    path = choose_path(fast, device.type, HAS_TRITON, has_ca)
    use_fused(model, path == FUSED_GRAPHS)  # also turns off model.fused_ca for the reference
    if path == REFERENCE:
        return model, path
    optimize_for_inference(model)
    if path == LEAN:
        return model, path
    # channels_last: the layout cuDNN's convolutions and the projection kernel are fastest in
    return ShapeGraphs(model.to(memory_format=torch.channels_last)), path


def inference_model(ckpt: dict, cfg: Config, device: torch.device) -> tuple[nn.Module, str]:
    """The checkpoint's model on the inference path ``cfg.eval.fast`` asks for, and that path's name.

    On the CPU, CA blocks run the kernels or PyTorch's ops that the run's validation chose for each
    shape (saved in the checkpoint), so evaluating best.pt repeats its validation to the last bit;
    shapes it did not see are timed afresh (:mod:`seg.kernels.calibrate`).
    """
    calibrate.adopt(saved_cpu_paths(ckpt))
    return prepare_inference(model_from_checkpoint(ckpt, cfg, device, fast=False), device, cfg.eval.fast)
