"""Block-level timing for ``python -m seg.tools.bench``: one CA block, not the whole model.

- ``--scope block`` (CUDA): the Triton kernels alone (pool, gate, gate backward) as milliseconds and
  as GB/s of the bytes each must move at least, the figure to hold against the GPU's memory
  bandwidth; then a whole ``CoordAttention`` training step, reference against fused, with a second
  reference block timed in the same loop as the A/A control. Shapes: the CA blocks of DeepLabV3 +
  mobilenet_v2_ca (OS 16, 512x512, batch 16).
- ``--scope tiles`` (CUDA): the kernels under a few tile-size limits, to choose ``coord_attention``'s
  defaults (each tile size is a new Triton compile, so this takes a while); then the projection
  GEMM with CA's gate in its prologue (``seg.kernels.projection``) under a few tile shapes, against
  the plain model's 1x1 conv (cuDNN) and the gate kernel + that conv: the floor it aims at and the
  path it replaces.
- ``--scope projections`` (CPU): the CA model's 16 pw-linear projections, PyTorch's 1x1 conv against
  the fused MobileNetV2 block's C++ call with CA's gates forced to 1.

The kernels alone are medians of ``triton.testing.do_bench`` (which flushes L2 between calls); the
rest is timed by :mod:`seg.tools.timing`.
"""

from __future__ import annotations

import copy
import itertools
import statistics

import torch
import torch.nn.functional as F

from seg.kernels import cpu
from seg.kernels.fast import optimize_for_inference, use_fused
from seg.modeling.attention import CoordAttention
from seg.modeling.encoders.mobilenet_v2 import ATTENTION_SLOT, ExpandedConv
from seg.tools.bench_models import build_variant
from seg.tools.timing import interleaved

SHAPES = {"s2": (16, 96, 256, 256), "s4": (16, 144, 128, 128), "s8": (16, 192, 64, 64),
          "s16": (16, 960, 32, 32)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TILES = [dict(MAX_TILE=t, MAX_ROWS=r) for t, r in ((4096, 16), (8192, 16), (2048, 8), (8192, 32), (16384, 32))]
AA = "A/A"
WARMUP = 3
BLOCK_STEPS, BLOCK_WARMUP = 20, 5  # per repeat, as do_bench's medians had; and before timing
# (N, C, H, W, O) of the expanded blocks' projections in DeepLabV3 + MobileNetV2, OS 16, 512x512, batch 16
PROJECTIONS = {"s2": (16, 96, 256, 256, 24), "s4": (16, 144, 128, 128, 32), "s8": (16, 192, 64, 64, 64),
               "s16": (16, 576, 32, 32, 96), "s16'": (16, 960, 32, 32, 160)}
PROJECTION_TILES = [dict(BLOCK_M=m, MAX_BLOCK_O=o, MAX_BLOCK_K=k, NUM_WARPS=w)
                    for m, o, k, w in ((64, 64, 32, 4), (128, 64, 32, 4), (128, 32, 64, 4), (128, 128, 32, 8),
                                       (256, 64, 32, 8))]


def _ms(fn, repeats: int) -> float:
    import triton.testing  # imported on use: a CPU-only install may lack Triton

    return triton.testing.do_bench(fn, warmup=5, rep=repeats, return_mode="median")


def kernel_rows(x: torch.Tensor, repeats: int) -> list[tuple[str, float, float]]:
    """(kernel, ms, GB/s) for the three full-size kernels on x."""
    from seg.kernels import coord_attention as kernels

    n, c, h, w = x.shape
    a_h = torch.rand(n, c, h, device=x.device, dtype=x.dtype)
    a_w = torch.rand(n, c, w, device=x.device, dtype=x.dtype)
    grad = torch.randn_like(x)
    size = x.numel() * x.element_size()
    rows = []
    for name, fn, moved in (("pool", lambda: kernels.strip_sums(x), size),
                            ("gate", lambda: kernels.gate(x, a_h, a_w), 2 * size),
                            ("gate backward", lambda: kernels.gate_grads(grad, x, a_h, a_w), 3 * size)):
        ms = _ms(fn, repeats)
        rows.append((name, ms, moved / ms / 1e6))
    return rows


def block_rows(x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of a CA training step (forward + backward) per variant, the variants interleaved."""
    torch.manual_seed(0)
    reference = CoordAttention(x.shape[1]).to(device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    blocks = {"reference": reference, "reference A/A": copy.deepcopy(reference), "fused": copy.deepcopy(reference)}
    use_fused(blocks["fused"], True)
    x = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def step(block):
        return lambda: block(x).backward(grad)

    # the variants interleaved by the shared harness
    times = interleaved({name: step(block) for name, block in blocks.items()}, repeats * BLOCK_STEPS,
                        warmup=BLOCK_WARMUP, sync=torch.cuda.synchronize if x.is_cuda else lambda: None)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def block_tables(device: str, repeats: int) -> list[str]:
    """The kernels' ms and GB/s at every shape, dtype and layout, then the block's train step."""
    lines = ["| shape | dtype | layout | kernel | ms | GB/s |", "|---|---|---|---|---:|---:|"]
    for (sname, shape), (dname, dtype), cl in itertools.product(SHAPES.items(), DTYPES.items(), (False, True)):
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        for name, ms, gbs in kernel_rows(x, 100):
            lines.append(f"| {sname} {tuple(shape)} | {dname} | {'NHWC' if cl else 'NCHW'} | {name} | {ms:.3f} "
                         f"| {gbs:.0f} |")
    lines += ["", "| shape | bf16 NHWC train step | reference ms | A/A ms | fused ms | A/A ratio | fused / reference |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for sname, shape in SHAPES.items():
        x = torch.randn(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        t = block_rows(x, repeats)
        lines.append(f"| {sname} | fwd+bwd | {t['reference']:.3f} | {t['reference A/A']:.3f} | {t['fused']:.3f} | "
                     f"{t['reference A/A'] / t['reference']:.3f} | {t['fused'] / t['reference']:.3f} |")
    return lines


def sweep_tiles(device: str) -> list[str]:
    """Sum of the three kernels' ms over every shape, bf16 in both layouts, per tile-size limit."""
    from seg.kernels import coord_attention as kernels

    defaults = {k: getattr(kernels, k) for k in TILES[0]}
    lines = ["| MAX_TILE | MAX_ROWS | NCHW ms | NHWC ms |", "|---:|---:|---:|---:|"]
    try:
        for tile in TILES:
            for key, value in tile.items():
                setattr(kernels, key, value)
            totals = []
            for fmt in (torch.contiguous_format, torch.channels_last):
                xs = [torch.randn(s, device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                      for s in SHAPES.values()]
                totals.append(sum(ms for x in xs for _, ms, _ in kernel_rows(x, 25)))
            lines.append(f"| {tile['MAX_TILE']} | {tile['MAX_ROWS']} | {totals[0]:.3f} | {totals[1]:.3f} |")
    finally:
        for key, value in defaults.items():
            setattr(kernels, key, value)
    return lines


def sweep_projection_tiles(device: str, repeats: int = 25) -> list[str]:
    """Sum over PROJECTIONS of the prologue GEMM's ms (bf16, channels_last) per tile shape, beside
    the plain 1x1 conv and the gate kernel + conv, timed once (they do not depend on the tiles)."""
    from seg.kernels import coord_attention as kernels
    from seg.kernels import projection

    cases = []
    for n, c, h, w, o in PROJECTIONS.values():
        x = torch.rand(n, c, h, w, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        a_h = torch.rand(n, c, h, device=device, dtype=torch.bfloat16)
        a_w = torch.rand(n, c, w, device=device, dtype=torch.bfloat16)
        cases.append((x, a_h, a_w, torch.randn(o, c, device=device), torch.randn(o, device=device)))
    conv = sum(_ms(lambda x=x, wt=wt: F.conv2d(x, wt.to(x.dtype)[..., None, None]), repeats)
               for x, _, _, wt, _ in cases)
    gate_conv = sum(_ms(lambda x=x, a_h=a_h, a_w=a_w, wt=wt: F.conv2d(kernels.gate(x, a_h, a_w),
                                                                      wt.to(x.dtype)[..., None, None]), repeats)
                    for x, a_h, a_w, wt, _ in cases)
    lines = [f"bf16 channels_last projections {list(PROJECTIONS)}, summed: plain 1x1 conv {conv:.3f} ms, "
             f"gate kernel + conv {gate_conv:.3f} ms", "",
             "| BLOCK_M | MAX_BLOCK_O | MAX_BLOCK_K | NUM_WARPS | prologue GEMM ms | / plain conv |",
             "|---:|---:|---:|---:|---:|---:|"]
    defaults = {k: getattr(projection, k) for k in PROJECTION_TILES[0]}
    try:
        for tile in PROJECTION_TILES:
            for key, value in tile.items():
                setattr(projection, key, value)
            ms = sum(_ms(lambda case=case: projection.gated_projection(*case), repeats) for case in cases)
            lines.append(f"| {tile['BLOCK_M']} | {tile['MAX_BLOCK_O']} | {tile['MAX_BLOCK_K']} | {tile['NUM_WARPS']} "
                         f"| {ms:.3f} | {ms / conv:.3f} |")
    finally:
        for key, value in defaults.items():
            setattr(projection, key, value)
    return lines


def _unit_gate_blocks(size: int) -> list[tuple[torch.Tensor, list[torch.Tensor], float, torch.Tensor]]:
    """``(CA input, CA parameters, BN eps, projection weight)`` of each fused block of the CA model at
    ``size``, with CA's gates forced to exactly 1 (zero conv_h/conv_w weights, bias 100: sigmoid(100)
    is 1.0 in fp32), so that the fused call computes the plain model's projection plus CA's pooling."""
    torch.manual_seed(0)
    model = optimize_for_inference(build_variant("mobilenet_v2_ca", 16).eval())
    inputs = []
    blocks = [m for m in model.modules() if isinstance(m, ExpandedConv)]
    hooks = [b[ATTENTION_SLOT].register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
             for b in blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    cases = []
    for block, x in zip(blocks, inputs):
        attention = copy.deepcopy(block[ATTENTION_SLOT])
        with torch.no_grad():
            for conv in (attention.conv_h, attention.conv_w):
                conv.weight.zero_()
                conv.bias.fill_(100.0)
        cases.append((x, attention._fold_sources(), attention.bn1.eps, block[ATTENTION_SLOT + 1].weight))
    return cases


def projection_times(size: int = 512, threads: int = 2, repeats: int = 15) -> dict[str, list[float]]:
    """Seconds per image for the CA model's 16 pw-linear projections, interleaved: PyTorch's 1x1 conv
    ("conv"), the same again (the A/A control, AA), and the fused block's C++ call with CA's gates
    forced to 1 ("fused"). Whether the fused call's tiled matmul is any faster than PyTorch's conv:
    if it were, part of the CA/plain ratio would come from a faster projection rather than cheap CA.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ext, cases = cpu.kernels(), _unit_gate_blocks(size)
        if ext is None:
            raise RuntimeError("the CPU kernels could not be built; see the warning above")
        with torch.no_grad():
            for x, params, eps, weight in cases:  # time only what computes the plain projection
                torch.testing.assert_close(ext.forward_project(x, params, eps, weight), F.conv2d(x, weight),
                                           atol=1e-4, rtol=1e-4)

        def convs():
            with torch.no_grad():
                for x, _, _, weight in cases:
                    F.conv2d(x, weight)

        def fused():
            with torch.no_grad():
                for x, params, eps, weight in cases:
                    ext.forward_project(x, params, eps, weight)

        return interleaved({"conv": convs, AA: convs, "fused": fused}, repeats, warmup=WARMUP)
    finally:
        torch.set_num_threads(previous)
