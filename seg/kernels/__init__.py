"""Fused Coordinate Attention kernels (Triton), wrapped as ``torch.library`` custom ops.

Importing this package does not import Triton; ``seg.kernels.ops`` does, on first use.

Triton reads ``TRITON_INTERPRET`` once, when a kernel is decorated, so the interpreter (which runs
the kernels on CPU tensors, slowly) must be switched on before ``seg.kernels.ops`` is imported.
That is also when this module reads it, so both agree for the life of the process.
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
