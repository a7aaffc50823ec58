"""Triton kernel: MobileNetV2's projection (1x1 conv + BN) with Coordinate Attention's gate in its prologue.

In an expanded block CA gates the depthwise output x (N, C, H, W), and the 1x1 projection reads the
gated map back. Here the projection's GEMM gates each tile of x as it loads it:

    out[n, o, h, w] = bias[o] + sum_c weight[o, c] * (x[n, c, h, w] * a_h[n, c, h] * a_w[n, c, w])

so the gated map is never written: CA costs one read of x for its pooling, plus the two strips.
The BN after the projection is folded into ``weight`` and ``bias`` by the caller (inference only).

Pixels are the GEMM's rows (M = N * H * W), channels its reduction (K = C), the projection's
output channels its columns. Every program owns BLOCK_M pixels x BLOCK_O output channels and walks
C in BLOCK_K steps. Addresses come from strides, so x may be NCHW or channels_last (the fast one:
a row of the tile is contiguous), and so may the strips. The gate is computed in fp32 and rounded
once to the GEMM's input dtype (x's); the GEMM accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seg.kernels import INTERPRET
from seg.kernels.coord_attention import _on_device_of, _pow2

# Tile limits; module-level so tests can shrink them until M, C and O span several blocks.
# tl.dot needs every tile dimension >= 16. First guesses, not tuned on a GPU yet.
BLOCK_M = 64
MAX_BLOCK_O = 64
MAX_BLOCK_K = 32
MIN_DOT = 16
NUM_WARPS = 4

DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _gated_projection_kernel(
    x_ptr, a_h_ptr, a_w_ptr, w_ptr, b_ptr, out_ptr,
    M, C, O, H, W,
    sxn, sxc, sxh, sxw,
    shn, shc, shh,
    swn, swc, sww,
    son, soc, soh, sow,
    DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_o = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_ok, o_ok = m < M, o < O
    n = (m // (H * W)).to(tl.int64)
    h = (m // W) % H
    w = m % W
    x_row = n * sxn + h * sxh + w * sxw  # each pixel's offset; channels step by sxc from it
    h_row = n * shn + h * shh
    w_row = n * swn + w * sww
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for k in range(0, C, BLOCK_K):
        c = k + tl.arange(0, BLOCK_K)
        c_ok = c < C
        mask = m_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + x_row[:, None] + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        a_h = tl.load(a_h_ptr + h_row[:, None] + c[None, :] * shc, mask=mask, other=0.0).to(tl.float32)
        a_w = tl.load(a_w_ptr + w_row[:, None] + c[None, :] * swc, mask=mask, other=0.0).to(tl.float32)
        # the prologue: the reference's ``x * a_h * a_w``, in its order, rounded once
        gated = (x * a_h * a_w).to(DOT)
        weight = tl.load(w_ptr + o[None, :] * C + c[:, None], mask=c_ok[:, None] & o_ok[None, :], other=0.0)
        if UPCAST:  # the same products: bf16 x bf16 is exact in fp32, and the MMA sums in fp32 too
            gated, weight = gated.to(tl.float32), weight.to(tl.float32)
        acc = tl.dot(gated, weight, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + o, mask=o_ok, other=0.0)[None, :]
    out = out_ptr + (n * son + h * soh + w * sow)[:, None] + o[None, :] * soc
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


def dot_block(size: int, limit: int) -> int:
    """A tile side for ``size`` elements: a power of 2, at least tl.dot's minimum, at most ``limit``."""
    return max(MIN_DOT, min(limit, _pow2(size)))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for ``dtype``: fp32 follows cuDNN's TF32 switch, as the reference conv does."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def upcast(dtype: torch.dtype) -> bool:
    """Whether the GEMM takes its (already rounded) bf16 tiles as fp32: Triton's interpreter
    multiplies bf16 as raw 16-bit integers (Triton 3.8), so under it bf16 goes through fp32."""
    return INTERPRET and dtype == torch.bfloat16


def dot_args(dtype: torch.dtype) -> dict:
    """The GEMM kernels' dtype constants for inputs of ``dtype``: the tiles' dtype, tl.dot's input
    precision, and whether the tiles go through fp32 (then at IEEE precision)."""
    up = upcast(dtype)
    return dict(DOT=DOT_DTYPES[dtype], PRECISION="ieee" if up else precision(dtype), UPCAST=up)


def gated_projection(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """``conv1x1(x * a_h * a_w, weight) + bias`` without the gated map, for x (N, C, H, W) in fp32,
    bf16 or fp16, strips a_h (N, C, H) and a_w (N, C, W), weight (O, C) and bias (O,) in x's dtype
    or fp32. Returns (N, O, H, W) in x's dtype, channels_last where x is."""
    if x.dtype not in DOT_DTYPES:
        raise TypeError(f"gated_projection: x must be float32, bfloat16 or float16, got {x.dtype}")
    n, c, h, w = x.shape
    o = weight.shape[0]
    weight = weight.reshape(o, c).to(x.dtype).contiguous()
    bias = bias.float().contiguous()
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, o, h, w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    m = n * h * w
    if m == 0 or o == 0:
        return out
    block_o, block_k = dot_block(o, MAX_BLOCK_O), dot_block(c, MAX_BLOCK_K)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(o, block_o))
    with _on_device_of(x):
        _gated_projection_kernel[grid](
            x, a_h, a_w, weight, bias, out, m, c, o, h, w,
            *x.stride(), *a_h.stride(), *a_w.stride(), *out.stride(),
            **dot_args(x.dtype), BLOCK_M=BLOCK_M, BLOCK_O=block_o, BLOCK_K=block_k, num_warps=NUM_WARPS)
    return out
