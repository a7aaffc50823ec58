"""One CA block, fused kernels against the PyTorch reference: ``python -m seg.kernels.bench``.

Times, at the CA block shapes of DeepLabV3 + mobilenet_v2_ca (OS 16, 512x512, batch 16):

- the kernels alone (pool, gate, gate backward), as milliseconds and as GB/s of the bytes each
  must move at least: the figure to hold against the GPU's memory bandwidth;
- a whole ``CoordAttention`` training step (forward + backward), reference and fused, and their ratio;
- with ``--tiles``, instead: the kernels under a few tile-size limits, to choose ``coord_attention``'s
  defaults (each new tile size is a new Triton compile, so this takes a while).

A second, separately built reference block is timed in the same loop as an A/A control (the
harness of ``seg.timing``). The kernels alone are medians of ``triton.testing.do_bench`` (which
flushes L2 between calls). CUDA only.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics

import torch
import triton.testing

from seg.attention import CoordAttention
from seg.cli import HelpFormatter
from seg.kernels import coord_attention as kernels
from seg.kernels.fast import use_fused
from seg.timing import interleaved

SHAPES = {"s2": (16, 96, 256, 256), "s4": (16, 144, 128, 128), "s8": (16, 192, 64, 64),
          "s16": (16, 960, 32, 32)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = "cuda"
TILES = [dict(MAX_TILE=t, MAX_ROWS=r) for t, r in ((4096, 16), (8192, 16), (2048, 8), (8192, 32), (16384, 32))]


def _ms(fn, repeats: int) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=repeats, return_mode="median")


def kernel_rows(x: torch.Tensor, repeats: int) -> list[tuple[str, float, float]]:
    """(kernel, ms, GB/s) for the three full-size kernels on x."""
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

    # 20 steps per repeat, as do_bench's medians had; the variants interleaved by the shared harness
    times = interleaved({name: step(block) for name, block in blocks.items()}, repeats * 20, warmup=5,
                        sync=torch.cuda.synchronize if x.is_cuda else lambda: None)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seg.kernels.bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds for the block timings")
    p.add_argument("--tiles", action="store_true", help="only the tile-size sweep")
    args = p.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: seg.kernels.bench needs a CUDA GPU")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}")
    if args.tiles:
        return sweep_tiles()
    print("\n| shape | dtype | layout | kernel | ms | GB/s |\n|---|---|---|---|---:|---:|")
    for (sname, shape), (dname, dtype), cl in itertools.product(SHAPES.items(), DTYPES.items(), (False, True)):
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
        for name, ms, gbs in kernel_rows(x, 100):
            print(f"| {sname} {tuple(shape)} | {dname} | {'NHWC' if cl else 'NCHW'} | {name} | {ms:.3f} | {gbs:.0f} |")
    print("\n| shape | bf16 NHWC train step | reference ms | A/A ms | fused ms | A/A ratio | fused / reference |"
          "\n|---|---|---:|---:|---:|---:|---:|")
    for sname, shape in SHAPES.items():
        x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        t = block_rows(x, args.repeats)
        print(f"| {sname} | fwd+bwd | {t['reference']:.3f} | {t['reference A/A']:.3f} | {t['fused']:.3f} | "
              f"{t['reference A/A'] / t['reference']:.3f} | {t['fused'] / t['reference']:.3f} |")
    return 0


def sweep_tiles() -> int:
    """Sum of the three kernels' ms over every shape, bf16 in both layouts, per tile-size limit."""
    defaults = {k: getattr(kernels, k) for k in TILES[0]}
    print("\n| MAX_TILE | MAX_ROWS | NCHW ms | NHWC ms |\n|---:|---:|---:|---:|")
    try:
        for tile in TILES:
            for key, value in tile.items():
                setattr(kernels, key, value)
            totals = []
            for fmt in (torch.contiguous_format, torch.channels_last):
                xs = [torch.randn(s, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                      for s in SHAPES.values()]
                totals.append(sum(ms for x in xs for _, ms, _ in kernel_rows(x, 25)))
            print(f"| {tile['MAX_TILE']} | {tile['MAX_ROWS']} | {totals[0]:.3f} | {totals[1]:.3f} |")
    finally:
        for key, value in defaults.items():
            setattr(kernels, key, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
