"""Fused Coordinate Attention kernels (Triton), wrapped as ``torch.library`` custom ops.

Importing this package does not import Triton; ``seg.kernels.ops`` does, on first use.

Triton's interpreter runs the kernels on CPU tensors (slowly; it is for tests). Triton reads
``TRITON_INTERPRET`` when it is first imported and when it decorates a kernel, so set it at process
start, before anything imports Triton. This module reads it once, at import, and with it on lets
CPU tensors take the fused path.
"""

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_can_run(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``x``: a CUDA tensor, or a CPU one under the interpreter."""
    if not HAS_TRITON:
        return False
    return x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu")
