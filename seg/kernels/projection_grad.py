"""Training with CA's gate in the projection's prologue: the autograd Function, and the weight
gradient's Triton kernel that recomputes the gated input tile by tile.

Forward is ``seg.kernels.projection``'s GEMM (no bias: in training the BN after the projection
uses batch statistics and stays a layer of its own). Only x and the two strips are saved, never
the gated map. Backward, for the output gradient g (N, O, H, W):

- the gated map's gradient ``W^T g`` (cuDNN's 1x1 conv), then ``seg.kernels.coord_attention``'s
  one-pass ``gate_grads`` for x's gradient and both strips' (exactly the reference's gate backward);
- the weight's gradient ``sum over pixels of g (x) (x * a_h * a_w)``: a GEMM over pixels that
  gates each x tile as it loads it. Pixels are split in chunks whose partial sums PyTorch adds up
  (no atomics, so deterministic), so that small (O, C) weights still fill the GPU.

Against the reference block this skips writing the gated map in forward, reading it back in the
projection and keeping it for backward; backward reads x where the reference reads the gated map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from seg.kernels import coord_attention
from seg.kernels.coord_attention import _on_device_of
from seg.kernels.projection import dot_args, dot_block, gated_projection

# Tile limits (tests shrink them); first guesses, not tuned on a GPU.
BLOCK_M = 64  # pixels per step of the reduction
MAX_BLOCK_O = 64
MAX_BLOCK_C = 64
TARGET_PROGRAMS = 512  # split the pixels until about this many programs run


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, a_h_ptr, a_w_ptr, part_ptr,
    M, C, O, H, W, CHUNK,
    sgn, sgo, sgh, sgw,
    sxn, sxc, sxh, sxw,
    shn, shc, shh,
    swn, swc, sww,
    DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_o, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok, c_ok = o < O, c < C
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for k in range(pid_s * CHUNK, (pid_s + 1) * CHUNK, BLOCK_M):
        m = k + tl.arange(0, BLOCK_M)
        m_ok = m < M
        n = (m // (H * W)).to(tl.int64)
        h = (m // W) % H
        w = m % W
        g = tl.load(g_ptr + (n * sgn + h * sgh + w * sgw)[None, :] + o[:, None] * sgo,
                    mask=o_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_O, BLOCK_M): g transposed
        mask = m_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + c[None, :] * sxc, mask=mask, other=0.0)
        a_h = tl.load(a_h_ptr + (n * shn + h * shh)[:, None] + c[None, :] * shc, mask=mask, other=0.0)
        a_w = tl.load(a_w_ptr + (n * swn + w * sww)[:, None] + c[None, :] * swc, mask=mask, other=0.0)
        gated = (x.to(tl.float32) * a_h.to(tl.float32) * a_w.to(tl.float32)).to(DOT)  # the forward's rounding
        g = g.to(DOT)
        if UPCAST:  # see seg.kernels.projection.upcast
            g, gated = g.to(tl.float32), gated.to(tl.float32)
        acc = tl.dot(g, gated, acc, input_precision=PRECISION)
    part = part_ptr + (pid_s * O + o[:, None]) * C + c[None, :]
    tl.store(part, acc, mask=o_ok[:, None] & c_ok[None, :])


def weight_grad(grad: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """(O, C) fp32: ``sum over (n, h, w) of grad[n, o, h, w] * x[n, c, h, w] * a_h[n, c, h] * a_w[n, c, w]``,
    for grad (N, O, H, W) and x (N, C, H, W) of one dtype (any strides), strips (N, C, H) and (N, C, W)."""
    n, c, h, w = x.shape
    o = grad.shape[1]
    m = n * h * w
    block_o, block_c = dot_block(o, MAX_BLOCK_O), dot_block(c, MAX_BLOCK_C)
    tiles = triton.cdiv(o, block_o) * triton.cdiv(c, block_c)
    steps = triton.cdiv(m, BLOCK_M)
    chunk = triton.cdiv(steps, max(1, min(steps, TARGET_PROGRAMS // tiles))) * BLOCK_M  # pixels per program
    splits = triton.cdiv(m, chunk) if m else 0
    parts = torch.zeros((max(splits, 1), o, c), dtype=torch.float32, device=x.device)
    if splits and o and c:
        with _on_device_of(x):
            _weight_grad_kernel[(triton.cdiv(o, block_o), triton.cdiv(c, block_c), splits)](
                grad, x, a_h, a_w, parts, m, c, o, h, w, chunk,
                *grad.stride(), *x.stride(), *a_h.stride(), *a_w.stride(),
                **dot_args(x.dtype), BLOCK_M=BLOCK_M, BLOCK_O=block_o, BLOCK_C=block_c)
    return parts[0] if splits <= 1 else parts.sum(0)


class GatedProjection(torch.autograd.Function):
    """``conv1x1(x * a_h * a_w, weight)`` (no bias) with its gradients for x, both strips and the weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a_h, a_w, weight)
        out_channels = weight.shape[0]
        return gated_projection(x, a_h, a_w, weight.reshape(out_channels, -1),
                                torch.zeros(out_channels, device=x.device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, a_h, a_w, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        transposed = weight.reshape(weight.shape[0], -1).t().to(x.dtype)[..., None, None]
        grad_x, grad_h, grad_w = coord_attention.gate_grads(F.conv2d(grad, transposed), x, a_h, a_w)
        grad_weight = weight_grad(grad, x, a_h, a_w).reshape(weight.shape).to(weight.dtype)
        return grad_x, grad_h, grad_w, grad_weight


def gated_projection_trainable(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor,
                               weight: torch.Tensor) -> torch.Tensor:
    """The projection of the gated x without the gated map, differentiable in all four inputs;
    ``weight`` is the conv's (O, C, 1, 1) or (O, C). Output in x's dtype and layout."""
    return GatedProjection.apply(x, a_h, a_w, weight)
