"""Triton kernels for the two full-size steps of Coordinate Attention, and their launchers.

CA reads a feature map x (N, C, H, W) twice: once to average it into a height strip (N, C, H)
and a width strip (N, C, W), and once to gate it, ``x * a_h * a_w``. Everything in between is
tiny and stays in PyTorch. Both steps are memory-bound, so each kernel reads every full-size
tensor it needs exactly once:

- ``strip_sums``: one pass over x summing rows and columns (the pooling), or one pass over
  (grad_out, x) summing ``grad_out * x`` against the other strip (the gate's gradient strips)
  while writing ``grad_out * a_h * a_w`` (the gate's gradient for x) in the same pass.
- ``strip_apply``: one pass writing ``x * a_h * a_w`` (the gate), or ``b_h + b_w`` broadcast to
  full size (the pooling's gradient).

Every program owns a tile of BLOCK_C channels x BLOCK_W columns of one sample and walks ROWS
rows of it. Addresses come from the tensors' strides, so NCHW, channels_last and any other
strided layout work; the tile is widest along the dimension that is contiguous in memory.
Sums accumulate in fp32 (fp64 for fp64 inputs). Row sums of different column blocks, and column
sums of different row blocks, go to separate partial buffers that PyTorch adds up afterwards:
no atomics, so results are deterministic.
"""

import torch
import triton
import triton.language as tl

# Tile limits. Module-level so tests can shrink them to make C, H and W span several blocks.
MAX_TILE = 2048  # elements per tile: BLOCK_C * BLOCK_W
MAX_BLOCK_W = 128  # NCHW: columns are contiguous, so the tile is wide
MAX_BLOCK_C = 64  # channels_last: channels are contiguous, so the tile is tall
MAX_ROWS = 16


@triton.jit
def _strip_sums_kernel(
    x_ptr, go_ptr, gx_ptr, a_h_ptr, a_w_ptr, part_h_ptr, part_w_ptr,
    NC, C, H, W,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    sdn, sdc, sdh, sdw,
    GATED: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
):
    pid_nc, pid_w, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (pid_nc // c_blocks).to(tl.int64)
    c1 = (pid_nc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c = c1[:, None]
    w = (pid_w * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    in_cw = (c < C) & (w < W)
    strip1 = n * C + c1  # row of the (N * C, H) and (N * C, W) strip tensors
    strip = strip1[:, None]
    if GATED:
        a_w = tl.load(a_w_ptr + strip * W + w, mask=in_cw, other=0.0).to(ACC)
    col = tl.zeros((BLOCK_C, BLOCK_W), dtype=ACC)
    for i in range(ROWS):
        h = pid_h * ROWS + i
        m = in_cw & (h < H)
        v = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=m, other=0.0).to(ACC)
        if GATED:
            g = tl.load(go_ptr + n * sgn + c * sgc + h * sgh + w * sgw, mask=m, other=0.0).to(ACC)
            a_h = tl.load(a_h_ptr + strip * H + h, mask=(c < C) & (h < H), other=0.0).to(ACC)
            gx = g * a_h * a_w
            tl.store(gx_ptr + n * sdn + c * sdc + h * sdh + w * sdw,
                     gx.to(gx_ptr.dtype.element_ty), mask=m)
            v = g * v
            row = tl.sum(v * a_w, axis=1)
            col += v * a_h
        else:
            row = tl.sum(v, axis=1)
            col += v
        tl.store(part_h_ptr + (pid_w * NC + strip1) * H + h, row, mask=(c1 < C) & (h < H))
    tl.store(part_w_ptr + (pid_h * NC + strip) * W + w, col, mask=in_cw)


@triton.jit
def _strip_apply_kernel(
    x_ptr, a_h_ptr, a_w_ptr, out_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    GATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr,
):
    pid_nc, pid_w, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (pid_nc // c_blocks).to(tl.int64)
    c = ((pid_nc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
    w = (pid_w * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    in_cw = (c < C) & (w < W)
    strip = n * C + c
    a_w = tl.load(a_w_ptr + strip * W + w, mask=in_cw, other=0.0).to(ACC)
    for i in range(ROWS):
        h = pid_h * ROWS + i
        m = in_cw & (h < H)
        a_h = tl.load(a_h_ptr + strip * H + h, mask=(c < C) & (h < H), other=0.0).to(ACC)
        if GATE:
            # Same product order as the reference ``x * a_h * a_w``: bit-identical in fp32.
            v = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=m, other=0.0).to(ACC)
            out = v * a_h * a_w
        else:
            out = a_h + a_w
        tl.store(out_ptr + n * son + c * soc + h * soh + w * sow, out.to(out_ptr.dtype.element_ty), mask=m)


def _tile(x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_W, ROWS) for x, widest along whichever of C and W is contiguous."""
    _, c, h, w = x.shape
    if x.stride(1) == 1 and c > 1:
        block_c = min(MAX_BLOCK_C, triton.next_power_of_2(c))
        block_w = min(max(1, MAX_TILE // block_c), triton.next_power_of_2(w))
    else:
        block_w = min(MAX_BLOCK_W, triton.next_power_of_2(w))
        block_c = min(max(1, MAX_TILE // block_w), triton.next_power_of_2(c))
    return block_c, block_w, min(MAX_ROWS, h)


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(x: torch.Tensor, block_c: int, block_w: int, rows: int) -> tuple[int, int, int]:
    n, c, h, w = x.shape
    return n * triton.cdiv(c, block_c), triton.cdiv(w, block_w), triton.cdiv(h, rows)


def _strips(x: torch.Tensor, *strips: torch.Tensor) -> list[torch.Tensor]:
    """The (N, C, H) / (N, C, W) strips made contiguous, the layout the kernels index."""
    return [s.reshape(x.shape[0], x.shape[1], -1).contiguous() for s in strips]


def _reduce_partials(part_h: torch.Tensor, part_w: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    n, c = shape[0], shape[1]
    return part_h.sum(0).view(n, c, -1), part_w.sum(0).view(n, c, -1)


def strip_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (N, C, H) and column sums (N, C, W) of x, in the accumulation dtype, in one read."""
    n, c, h, w = x.shape
    block_c, block_w, rows = _tile(x)
    grid = _grid(x, block_c, block_w, rows)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part_h = x.new_empty((grid[1], n * c, h), dtype=acc)
    part_w = x.new_empty((grid[2], n * c, w), dtype=acc)
    if x.numel():
        _strip_sums_kernel[grid](
            x, x, x, x, x, part_h, part_w, n * c, c, h, w, *x.stride(), *x.stride(), *x.stride(),
            GATED=False, ACC=_acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_W=block_w, ROWS=rows)
    else:
        part_h.zero_(), part_w.zero_()
    return _reduce_partials(part_h, part_w, x.shape)


def gate_grads(grad: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``x * a_h * a_w`` for x, a_h (N, C, H) and a_w (N, C, W), in one read of (grad, x)."""
    n, c, h, w = x.shape
    a_h, a_w = _strips(x, a_h, a_w)
    block_c, block_w, rows = _tile(x)
    grid = _grid(x, block_c, block_w, rows)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = torch.empty_like(x)
    part_h = x.new_empty((grid[1], n * c, h), dtype=acc)
    part_w = x.new_empty((grid[2], n * c, w), dtype=acc)
    if x.numel():
        _strip_sums_kernel[grid](
            x, grad, grad_x, a_h, a_w, part_h, part_w, n * c, c, h, w,
            *x.stride(), *grad.stride(), *grad_x.stride(),
            GATED=True, ACC=_acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_W=block_w, ROWS=rows)
    else:
        part_h.zero_(), part_w.zero_()
    grad_h, grad_w = _reduce_partials(part_h, part_w, x.shape)
    return grad_x, grad_h.to(a_h.dtype), grad_w.to(a_w.dtype)


def _apply(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, out: torch.Tensor, gate: bool) -> torch.Tensor:
    block_c, block_w, rows = _tile(out)
    if out.numel():
        _strip_apply_kernel[_grid(out, block_c, block_w, rows)](
            x, a_h, a_w, out, out.shape[1], out.shape[2], out.shape[3], *x.stride(), *out.stride(),
            GATE=gate, ACC=_acc_dtype(out.dtype), BLOCK_C=block_c, BLOCK_W=block_w, ROWS=rows)
    return out


def gate(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """``x * a_h * a_w`` for strips a_h (N, C, H) and a_w (N, C, W), in x's memory format."""
    a_h, a_w = _strips(x, a_h, a_w)
    out = torch.empty_like(x, dtype=gate_dtype(x, a_h, a_w))
    return _apply(x, a_h, a_w, out, gate=True)


def gate_dtype(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.dtype:
    """The dtype of ``x * a_h * a_w`` under PyTorch's type promotion."""
    return torch.promote_types(torch.promote_types(x.dtype, a_h.dtype), a_w.dtype)


def broadcast_sum(b_h: torch.Tensor, b_w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``b_h[..., None] + b_w[..., None, :]`` into ``out`` (N, C, H, W), any layout; return it."""
    b_h, b_w = _strips(out, b_h, b_w)
    return _apply(out, b_h, b_w, out, gate=False)
