"""``FastExpandedConv``: MobileNetV2's expanded block with CA fused into its neighbours, on CPU (C++)
and on CUDA (the projection GEMM with CA's gate in its prologue). Made by
``seg.kernels.fast.optimize_for_inference``; the overview is there.
"""

from __future__ import annotations

import torch
from torch import nn

from seg.kernels import kernels_can_run
from seg.kernels.calibrate import prefers_kernel
from seg.kernels.cpu import kernels_for as cpu_kernels_for
from seg.kernels.fast_attention import FastCoordAttention, cached_fold, has_forward_hooks
from seg.modeling.encoders.mobilenet_v2 import ATTENTION_SLOT, ExpandedConv


class FastExpandedConv(ExpandedConv):
    """MobileNetV2's expanded ``conv`` (pw, dw, CA, pw-linear, BN) with its inference fusions.

    - With CA's Triton kernels on (:func:`use_fused`) where they can run: CA's strips come from one
      pooling kernel, and the pw-linear conv + BN run as one GEMM that gates its input tiles as it
      loads them (``seg.kernels.projection``), so the gated map is never written. ``prologue =
      False`` keeps the gate a kernel of its own (the bench times both).
    - On CPU: the depthwise ReLU6, CA and the pw-linear 1x1 conv run as one C++ call of
      ``seg.kernels.cpu``: the ReLU6 is applied by CA's pooling pass, and the map is gated tile by
      tile inside the conv's matmul.
    - In training, with ``train_prologue`` (off by default: not yet timed on a GPU), the same GEMM
      without the BN, differentiable (``seg.kernels.projection_grad``): the gated map is neither
      written nor kept for backward.

    Same function, same state dict; equal to the layer-by-layer result within rounding (the GEMMs
    sum in another order than the conv). Training, grad and hooks run layer by layer, as
    ``nn.Sequential`` does.
    """

    prologue: bool = True
    # training with the prologue (seg.kernels.projection_grad): off until a GPU has timed it against
    # the fused gate (the bench's "CA prologue" turns it on)
    train_prologue: bool = False
    _projection_cache: tuple | None = None  # see cached_fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or torch.is_grad_enabled()):
            if _fusable(self):
                return self._forward_projected(x) if self[ATTENTION_SLOT].fused else self._forward_fused(x)
        elif self.train_prologue and self[ATTENTION_SLOT].fused and _fusable(self, training=True) \
                and not torch.compiler.is_compiling():  # compiled, the CA custom ops take over
            return self._forward_projected_train(x)
        return super().forward(x)

    def _forward_projected_train(self, x: torch.Tensor) -> torch.Tensor:
        expand, depthwise, attention, project, bn = self
        x = depthwise(expand(x))
        if not (kernels_can_run(x) and x.dtype in PROLOGUE_DTYPES):
            return bn(project(attention(x)))
        from seg.kernels.projection_grad import gated_projection_trainable

        return bn(gated_projection_trainable(x, *attention.gate_strips(x), project.weight))

    def _forward_projected(self, x: torch.Tensor) -> torch.Tensor:
        expand, depthwise, attention, project, bn = self
        x = depthwise(expand(x))
        if not (self.prologue and kernels_can_run(x) and x.dtype in PROLOGUE_DTYPES and _folds(bn)):
            return bn(project(attention(x)))
        from seg.kernels.projection import gated_projection  # imports Triton: only when a kernel will run

        weight, bias = cached_fold(self, "_projection_cache", [project.weight, bn.weight, bn.bias, bn.running_mean,
                                                               bn.running_var], self._fold_projection)
        return gated_projection(x, *attention.gate_strips(x), weight, bias)

    def _fold_projection(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pw-linear conv's weight (O, C) and a bias with the BN after it folded in, in fp32."""
        weight, gamma, beta, mean, var = (t.detach().float() for t in sources)
        scale = gamma * torch.rsqrt(var + self[4].eps)
        return weight.flatten(1) * scale[:, None], beta - mean * scale

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        expand, depthwise, attention, project, bn = self
        *conv_bn, relu6 = depthwise
        x = expand(x)
        for layer in conv_bn:
            x = layer(x)
        kernels = cpu_kernels_for(x)

        def layer_by_layer(t: torch.Tensor) -> torch.Tensor:
            return bn(project(attention(relu6(t))))

        def fused(t: torch.Tensor) -> torch.Tensor:
            return bn(kernels.forward_project(t, attention._fold_sources(), attention.bn1.eps, project.weight, True))

        # not a contiguous fp32 CPU map, no compiler, or slower than the layers on this CPU: layer by layer
        if kernels is None or not prefers_kernel(("block", tuple(x.shape), tuple(project.weight.shape)), fused,
                                                  layer_by_layer, x):
            return layer_by_layer(x)
        return fused(x)

    def train(self, mode: bool = True) -> "FastExpandedConv":
        self._projection_cache = None
        return super().train(mode)


PROLOGUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _folds(bn: nn.Module) -> bool:
    """Whether ``bn`` is an affine BatchNorm2d at its running statistics, foldable into the conv before it."""
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.affine and bn.track_running_stats
            and not has_forward_hooks([bn]))


def _fusable(conv: nn.Sequential, training: bool = False) -> bool:
    """Whether the depthwise ReLU6, CA and the projection of ``conv`` may run fused: a depthwise
    block ending in ReLU6, CA in eval mode (its BN uses running statistics; any mode with
    ``training``), a bias-free 1x1 conv that acts per pixel, and no hooks on any of them that expect
    to see the layers run one by one."""
    if len(conv) != 5:
        return False
    depthwise, attention, project = conv[1], conv[ATTENTION_SLOT], conv[ATTENTION_SLOT + 1]
    if not (isinstance(depthwise, nn.Sequential) and len(depthwise) > 0 and isinstance(depthwise[-1], nn.ReLU6)):
        return False
    if not (isinstance(attention, FastCoordAttention) and (training or not attention.training)):
        return False
    if not (isinstance(project, nn.Conv2d) and project.kernel_size == (1, 1) and project.stride == (1, 1)
            and project.padding == (0, 0) and project.groups == 1 and project.bias is None):
        return False
    return not has_forward_hooks([depthwise, depthwise[-1], attention, *attention.children(), project])
