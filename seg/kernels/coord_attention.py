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

Every program owns one 3-D tile of one sample: BLOCK_C channels x ROWS rows x BLOCK_W columns.
Addresses come from the tensors' strides, so NCHW, channels_last and any other strided layout
work; the tile is widest along the dimension that is contiguous in memory.
Sums accumulate in fp32 (fp64 for fp64 inputs). Row sums of different column blocks, and column
sums of different row blocks, go to separate partial buffers that PyTorch adds up afterwards:
no atomics, so results are deterministic.
"""

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Tile limits. Module-level so tests can shrink them to make C, H and W span several blocks.
# MAX_TILE and MAX_ROWS from `python -m seg.tools.bench --scope tiles` on an H200 (Triton 3.6): the
# three kernels over the four block shapes, bf16, took 1.05 ms NCHW / 1.71 ms NHWC at 8192 / 32,
# against 1.68 / 2.16 ms at the first guess, 4096 / 16.
MAX_TILE = 8192  # elements per tile: BLOCK_C * ROWS * BLOCK_W
MAX_BLOCK_W = 128  # NCHW: columns are contiguous, so the tile is wide
MAX_BLOCK_C = 64  # channels_last: channels are contiguous, so the tile is tall
MAX_ROWS = 32


@triton.jit
def _tile_offsets(pid_nc, pid_h, pid_w, C, H, W,
                  BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Sample n and the channel, row and column index vectors of this program's tile."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (pid_nc // c_blocks).to(tl.int64)
    c = (pid_nc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    h = pid_h * ROWS + tl.arange(0, ROWS)
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    return n, c, h, w


@triton.jit
def _load_strips(a_h_ptr, a_w_ptr, strip, c3, h3, w3, C, H, W, ACC: tl.constexpr):
    """The tile's a_h (BLOCK_C, ROWS, 1) and a_w (BLOCK_C, 1, BLOCK_W) from contiguous strips;
    ``strip`` (BLOCK_C, 1, 1) is each channel's row in the (N * C, L) strip tensors."""
    a_h = tl.load(a_h_ptr + strip * H + h3, mask=(c3 < C) & (h3 < H), other=0.0).to(ACC)
    a_w = tl.load(a_w_ptr + strip * W + w3, mask=(c3 < C) & (w3 < W), other=0.0).to(ACC)
    return a_h, a_w


@triton.jit
def _strip_sums_kernel(
    x_ptr, go_ptr, gx_ptr, a_h_ptr, a_w_ptr, part_h_ptr, part_w_ptr,
    NC, C, H, W,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    sdn, sdc, sdh, sdw,
    GATED: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_nc, pid_w, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, c, h, w = _tile_offsets(pid_nc, pid_h, pid_w, C, H, W, BLOCK_C, ROWS, BLOCK_W)
    c3, h3, w3 = c[:, None, None], h[None, :, None], w[None, None, :]
    m = (c3 < C) & (h3 < H) & (w3 < W)
    strip = n * C + c  # row of the (N * C, H) and (N * C, W) strip tensors
    v = tl.load(x_ptr + n * sxn + c3 * sxc + h3 * sxh + w3 * sxw, mask=m, other=0.0).to(ACC)
    if GATED:
        a_h, a_w = _load_strips(a_h_ptr, a_w_ptr, strip[:, None, None], c3, h3, w3, C, H, W, ACC)
        g = tl.load(go_ptr + n * sgn + c3 * sgc + h3 * sgh + w3 * sgw, mask=m, other=0.0).to(ACC)
        tl.store(gx_ptr + n * sdn + c3 * sdc + h3 * sdh + w3 * sdw, (g * a_h * a_w).to(gx_ptr.dtype.element_ty),
                 mask=m)
        v = g * v
        rows = tl.sum(v * a_w, axis=2)
        cols = tl.sum(v * a_h, axis=1)
    else:
        rows = tl.sum(v, axis=2)
        cols = tl.sum(v, axis=1)
    c2, strip2 = c[:, None], strip[:, None]
    tl.store(part_h_ptr + (pid_w * NC + strip2) * H + h[None, :], rows, mask=(c2 < C) & (h[None, :] < H))
    tl.store(part_w_ptr + (pid_h * NC + strip2) * W + w[None, :], cols, mask=(c2 < C) & (w[None, :] < W))


@triton.jit
def _strip_apply_kernel(
    x_ptr, a_h_ptr, a_w_ptr, out_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    GATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_nc, pid_w, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, c, h, w = _tile_offsets(pid_nc, pid_h, pid_w, C, H, W, BLOCK_C, ROWS, BLOCK_W)
    c3, h3, w3 = c[:, None, None], h[None, :, None], w[None, None, :]
    m = (c3 < C) & (h3 < H) & (w3 < W)
    a_h, a_w = _load_strips(a_h_ptr, a_w_ptr, (n * C + c)[:, None, None], c3, h3, w3, C, H, W, ACC)
    if GATE:
        # Same product order as the reference ``x * a_h * a_w``: bit-identical in fp32.
        out = tl.load(x_ptr + n * sxn + c3 * sxc + h3 * sxh + w3 * sxw, mask=m, other=0.0).to(ACC) * a_h * a_w
    else:
        out = a_h + a_w
    tl.store(out_ptr + n * son + c3 * soc + h3 * soh + w3 * sow, out.to(out_ptr.dtype.element_ty), mask=m)


def _pow2(n: int) -> int:
    """The least power of 2 >= n (>= 1). Plain Python: triton.next_power_of_2 is a constexpr
    function whose wrapper costs more CPU time per eager call than the rest of the launcher."""
    return 1 << max(n - 1, 0).bit_length()


def _tile(x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, BLOCK_W) for x, widest along whichever of C and W is contiguous in memory."""
    _, c, h, w = x.shape
    rows = min(MAX_ROWS, _pow2(h))
    if x.stride(1) == 1 and c > 1:
        block_c = min(MAX_BLOCK_C, _pow2(c))
        block_w = min(max(1, MAX_TILE // (block_c * rows)), _pow2(w))
    else:
        block_w = min(MAX_BLOCK_W, _pow2(w))
        block_c = min(max(1, MAX_TILE // (block_w * rows)), _pow2(c))
    return block_c, rows, block_w


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(x: torch.Tensor, block_c: int, rows: int, block_w: int) -> tuple[int, int, int]:
    n, c, h, w = x.shape
    return n * -(-c // block_c), -(-w // block_w), -(-h // rows)  # ceil divisions


def _on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _strips(x: torch.Tensor, *strips: torch.Tensor) -> list[torch.Tensor]:
    """The (N, C, H) / (N, C, W) strips made contiguous, the layout the kernels index."""
    return [s.reshape(x.shape[0], x.shape[1], -1).contiguous() for s in strips]


def _sums(x: torch.Tensor, grad: torch.Tensor | None = None, a_h: torch.Tensor | None = None,
          a_w: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch ``_strip_sums_kernel``, plain (grad None) or gated; add up the partial sums."""
    n, c, h, w = x.shape
    block_c, rows, block_w = _tile(x)
    grid = _grid(x, block_c, rows, block_w)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Every element of the partial buffers is written by exactly one program, so they need no
    # zeroing, except for an empty x, which launches nothing.
    new = x.new_zeros if x.numel() == 0 else x.new_empty
    part_h = new((grid[1], n * c, h), dtype=acc)
    part_w = new((grid[2], n * c, w), dtype=acc)
    gated = grad is not None
    grad_x = torch.empty_like(x) if gated else None
    if gated:
        a_h, a_w = _strips(x, a_h, a_w)
    if x.numel():
        go, gx = (grad, grad_x) if gated else (x, x)  # unread placeholders when not gated
        with _on_device_of(x):
            _strip_sums_kernel[grid](
                x, go, gx, a_h if gated else x, a_w if gated else x, part_h, part_w, n * c, c, h, w,
                *x.stride(), *go.stride(), *gx.stride(),
                GATED=gated, ACC=_acc_dtype(x.dtype), BLOCK_C=block_c, ROWS=rows, BLOCK_W=block_w)
    # A single partial is the sum itself: a view, not another kernel launch.
    sum_h = part_h[0] if grid[1] == 1 else part_h.sum(0)
    sum_w = part_w[0] if grid[2] == 1 else part_w.sum(0)
    return grad_x, sum_h.view(n, c, h), sum_w.view(n, c, w)


def strip_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (N, C, H) and column sums (N, C, W) of x, in the accumulation dtype, in one read."""
    _, sum_h, sum_w = _sums(x)
    return sum_h, sum_w


def gate_grads(grad: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``x * a_h * a_w`` for x, a_h (N, C, H) and a_w (N, C, W), in one read of (grad, x)."""
    grad_x, grad_h, grad_w = _sums(x, grad, a_h, a_w)
    return grad_x, grad_h.to(a_h.dtype), grad_w.to(a_w.dtype)


def _apply(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, out: torch.Tensor, gate: bool) -> torch.Tensor:
    block_c, rows, block_w = _tile(out)
    if out.numel():
        with _on_device_of(out):
            _strip_apply_kernel[_grid(out, block_c, rows, block_w)](
                x, a_h, a_w, out, out.shape[1], out.shape[2], out.shape[3], *x.stride(), *out.stride(),
                GATE=gate, ACC=_acc_dtype(out.dtype), BLOCK_C=block_c, ROWS=rows, BLOCK_W=block_w)
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
