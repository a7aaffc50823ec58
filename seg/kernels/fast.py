"""Faster implementations of ``CoordAttention`` and of MobileNetV2's CA block, swapped in by explicit calls.

``seg.modeling.attention.CoordAttention`` is the paper's block and nothing else. The fast paths are
subclasses that compute the same function with the same state dict, and a model gets them the
way ``torch.ao.quantization.fuse_modules`` rewrites one, by a call here that swaps the modules' classes:

- :func:`optimize_for_inference`: at inference (eval, no grad) on a CPU, CA runs in fewer, cheaper
  ops, or as one C++ call (``seg.kernels.cpu``, chosen per shape by ``seg.kernels.calibrate``), and
  MobileNetV2's depthwise ReLU6 + CA + projection run as one C++ call. Evaluation, prediction,
  export and the benchmarks apply it; training and anything with grad run the reference.
- :func:`use_fused`: the Triton kernels (``seg.kernels.ops``) pool and gate on CUDA
  (``model.fused_ca``, ``seg.kernels.fast.use_fused``); at inference, in MobileNetV2's expanded
  blocks, the gate runs inside the projection's GEMM instead (``seg.kernels.projection``).

The classes live in ``seg.kernels.fast_attention`` (CA) and ``seg.kernels.fast_block`` (MobileNetV2's
block); this module holds the rewrites and is where to import them from. Each is proven equal to
the reference in tests/test_attention.py, tests/test_cpu_kernels.py, tests/test_kernels.py,
tests/test_projection_kernel.py and tests/test_projection_grad.py.
"""

from __future__ import annotations

from torch import nn

# re-exported: seg.kernels.fast is where the fast paths are imported from
from seg.kernels.fast_attention import LEAN_EVAL_DEVICES, FastCoordAttention, fold_caches  # noqa: F401
from seg.kernels.fast_block import FastExpandedConv  # noqa: F401
from seg.modeling.attention import CoordAttention
from seg.modeling.encoders.mobilenet_v2 import ATTENTION_SLOT, ExpandedConv


def _fast(block: CoordAttention) -> FastCoordAttention:
    if not isinstance(block, FastCoordAttention):
        block.__class__ = FastCoordAttention  # same modules and parameters: the state dict is unchanged
    return block


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Give every ``CoordAttention`` in ``model`` its inference fast paths, in place; returns ``model``.

    Inside MobileNetV2's expanded blocks, CA may also gate its input in place (it is the depthwise
    ReLU6's private output) and fuses with its neighbours. Training, grad and hooks still run the
    reference, so the model stays trainable; ``torch.jit.script`` wants the plain model.
    """
    for module in model.modules():
        if isinstance(module, ExpandedConv) and isinstance(module[ATTENTION_SLOT], CoordAttention):
            module.__class__ = FastExpandedConv if type(module) is ExpandedConv else type(module)
            _fast(module[ATTENTION_SLOT]).inplace = True
        elif isinstance(module, CoordAttention):
            _fast(module)
    return model


def use_fused(model: nn.Module, enabled: bool) -> int:
    """Turn the Triton kernels on or off in every ``CoordAttention`` of ``model``; returns how many.

    Where the kernels cannot run (see ``seg.kernels.kernels_can_run``) the block runs as before.
    """
    blocks = [m for m in model.modules() if isinstance(m, CoordAttention)]
    for block in blocks:
        if enabled or isinstance(block, FastCoordAttention):
            _fast(block).fused = enabled
    return len(blocks)
