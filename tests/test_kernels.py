"""seg.kernels on CPU tensors through Triton's interpreter: ops, CA block, compile, a short training.

Triton decides at import whether it interprets, from ``TRITON_INTERPRET``, and other modules of
this suite import it first; so this file runs only in the child process that
``test_kernels_interpreter.py`` starts with ``TRITON_INTERPRET=1``. Run it alone with
``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py``.
"""

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in a child process under TRITON_INTERPRET=1 (see test_kernels_interpreter.py)",
                allow_module_level=True)
pytest.importorskip("triton")

import seg.kernels  # noqa: E402
from kernel_cases import (  # noqa: E402
    EPS, assert_fused_as_accurate, assert_same_gradients, deeplab_ca, fused_reference_exact, memory_format, tiny_ca_net,
    train_losses)
from numerics import with_measured_bn  # noqa: E402
from seg.config import ModelConfig  # noqa: E402
from seg.kernels import coord_attention as kernels  # noqa: E402
from seg.kernels import ops  # noqa: E402
from seg.kernels import projection  # noqa: E402
from seg.kernels.fast import use_fused  # noqa: E402
from seg.modeling.attention import CoordAttention  # noqa: E402
from seg.modeling.models import model_from_config  # noqa: E402

SHAPES = {"odd": (2, 5, 5, 7), "1xW": (2, 5, 1, 9), "Hx1": (2, 5, 9, 1), "batch1": (1, 5, 6, 3)}


@pytest.fixture(params=["one-tile", "many-tiles"])
def tiles(request, monkeypatch):
    """Default tiles, or tiles so small that C, H and W each span several blocks with a ragged end."""
    if request.param == "many-tiles":
        for name, value in (("MAX_TILE", 8), ("MAX_BLOCK_W", 4), ("MAX_BLOCK_C", 2), ("MAX_ROWS", 2)):
            monkeypatch.setattr(kernels, name, value)
    return request.param


def _strips(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = shape
    return torch.rand(n, c, h).to(dtype), torch.rand(n, c, w).to(dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_pool_and_gate_ops_match_torch(shape, channels_last, tiles):
    x = torch.randn(shape).to(memory_format=memory_format(channels_last))
    pooled = ops.ca_pool(x)
    expected = torch.cat([x.double().mean(3), x.double().mean(2)], dim=2)
    torch.testing.assert_close(pooled.double(), expected, atol=1e-6, rtol=1e-6)
    a_h, a_w = _strips(shape)
    y = ops.ca_gate(x, a_h, a_w)
    # Same product order as the reference, so fp32 agrees to the bit; the layout is x's.
    assert torch.equal(y, x * a_h[..., None] * a_w[:, :, None, :])
    assert y.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ops_round_once_from_fp32(dtype):
    x = torch.randn(2, 3, 5, 7).to(dtype)
    a_h, a_w = _strips(x.shape, dtype)
    pooled = ops.ca_pool(x)
    assert pooled.dtype == dtype
    exact = torch.cat([x.float().mean(3), x.float().mean(2)], dim=2)
    assert torch.equal(pooled, exact.to(dtype))  # fp32 sums, one rounding at the end
    y = ops.ca_gate(x, a_h, a_w)
    assert y.dtype == dtype
    # Within one unit in the last place of the fp32 product: the interpreter narrows to bf16 by
    # truncation, the GPU rounds to nearest (test_kernels_cuda.py checks that to the bit).
    product = x.float() * a_h.float()[..., None] * a_w.float()[:, :, None, :]
    torch.testing.assert_close(y.float(), product, atol=0, rtol=2 * EPS[dtype])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_op_gradients_match_finite_differences(channels_last, monkeypatch):
    if channels_last:  # several tiles in one layout keeps the interpreter's time down
        monkeypatch.setattr(kernels, "MAX_TILE", 4)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64).to(memory_format=memory_format(channels_last))
    a_h, a_w = _strips(x.shape, torch.float64)
    inputs = [t.requires_grad_() for t in (x, a_h, a_w)]
    assert torch.autograd.gradcheck(ops.ca_gate, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(ops.ca_pool, (inputs[0],), fast_mode=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eager_functions_equal_the_custom_ops_with_gradients(channels_last):
    # CoordAttention calls ops.pool / ops.gate: autograd.Functions in eager, the custom ops when compiled.
    x = torch.randn(2, 3, 5, 6).to(memory_format=memory_format(channels_last))
    a_h, a_w = _strips(x.shape)
    grads = []
    for pool, gate in ((ops.pool, ops.gate), (ops.ca_pool, ops.ca_gate)):
        inputs = [t.detach().clone().requires_grad_() for t in (x, a_h, a_w)]
        pooled = pool(inputs[0])
        y = gate(*inputs)
        (y * torch.cos(y)).sum().backward()
        (pooled * pooled).sum().backward()
        grads.append([pooled, y, *(t.grad for t in inputs)])
    for eager, op in zip(*grads):
        assert torch.equal(eager, op)


def test_ops_pass_torch_library_checks():
    # Schema, fake (meta) implementation against the real one, autograd registration, AOT dispatch.
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    # Strips as CoordAttention passes them from channels_last convs: (N, C, L, 1) flattened, not contiguous.
    a_h, a_w = (torch.rand(2, 3, length, 1).to(memory_format=torch.channels_last).flatten(2).requires_grad_()
                for length in (4, 5))
    assert not a_h.is_contiguous()
    torch.library.opcheck(ops.ca_pool, (x,))
    torch.library.opcheck(ops.ca_gate, (x, a_h, a_w))
    torch.library.opcheck(ops.ca_gate_backward, (torch.randn_like(x), x.detach(), a_h.detach(), a_w.detach()))


BLOCK_CASES = [(name, fmt, "train") for name in SHAPES for fmt in ("nchw", "nhwc")]
BLOCK_CASES += [("odd", "nchw", "eval"), ("odd", "nhwc", "eval")]  # eval: BN uses running stats


@pytest.mark.parametrize("shape, fmt, mode", BLOCK_CASES, ids=["-".join(case) for case in BLOCK_CASES])
def test_block_forward_and_every_gradient_match_reference_fp32(shape, fmt, mode):
    out = fused_reference_exact(SHAPES[shape], torch.float32, fmt == "nhwc", mode == "train")
    for fused, ref in zip(out["fused"], out["reference"]):
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    assert_fused_as_accurate(out, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_in_low_precision_is_as_accurate_as_reference(dtype, channels_last):
    # 70 channels: more than one channel block of the default tiles in channels_last.
    assert_fused_as_accurate(fused_reference_exact((2, 70, 5, 6), dtype, channels_last, True), dtype)


def test_fused_flag_dispatches_and_keeps_state_dict(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "gate", lambda *a: calls.append(1) or ops.kernels.gate(*a))
    block = CoordAttention(8).eval()
    keys = list(block.state_dict())
    x = torch.randn(1, 8, 4, 4)
    reference = block(x)
    use_fused(block, True)
    fused = block(x)
    assert calls == [1] and list(block.state_dict()) == keys
    torch.testing.assert_close(fused, reference)
    monkeypatch.setattr(seg.kernels, "INTERPRET", False)  # as on CPU without the interpreter
    assert torch.equal(block(x), reference) and calls == [1]


@pytest.mark.parametrize("enabled", [True, False])
def test_model_from_config_sets_every_ca_block(enabled):
    model = model_from_config(ModelConfig(encoder="mobilenet_v2_ca", fused_ca=enabled), 3)
    flags = [getattr(m, "fused", False) for m in model.modules() if isinstance(m, CoordAttention)]
    assert flags == [enabled] * 16  # the paper's 16 CA blocks in MobileNetV2


def test_compile_fullgraph_keeps_each_op_as_one_node():
    block = CoordAttention(6).train()
    use_fused(block, True)
    x = torch.randn(2, 6, 5, 3).requires_grad_()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0
    ops_in_graph = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"seg.ca_pool.default", "seg.ca_gate.default"} <= ops_in_graph
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    block(x).square().sum().backward()
    torch.testing.assert_close(grad_compiled, x.grad)


def test_short_training_follows_reference_loss_curve():
    reference = train_losses(tiny_ca_net, False, steps=6, size=16, batch=4, lr=0.3)
    fused = train_losses(tiny_ca_net, True, steps=6, size=16, batch=4, lr=0.3)
    assert reference[-1] < 0.95 * reference[0]  # it learns, so the curve carries information
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), atol=1e-5, rtol=1e-5)


def test_deeplab_with_all_16_blocks_fused_gives_reference_gradients():
    # The real encoder (its strides, dilation, channels_last). BN frozen (see train_losses), at
    # measured statistics: at its init ones every gradient in the encoder is below 1e-17. Over 12
    # seeds the fused gradients were within 1.2e-5 of each tensor's scale; a wrong term errs by O(1).
    reference = with_measured_bn(deeplab_ca(), 8, 3, 64, 64).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(reference)
    assert use_fused(fused, True) == 16
    images = torch.randn(1, 3, 32, 32).to(memory_format=torch.channels_last)
    targets = images.argmax(1)
    for model in (reference, fused):
        F.cross_entropy(model(images), targets).backward()
    assert_same_gradients(reference, fused)


def test_compiled_training_with_fused_ops_matches_eager():
    kwargs = dict(steps=3, size=16, batch=4, lr=0.3, channels_last=True)
    eager = train_losses(tiny_ca_net, True, **kwargs)
    compiled = train_losses(tiny_ca_net, True, compile_backend="aot_eager", **kwargs)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-5, rtol=1e-5)


def test_gpu_bench_runs_its_tables_and_restores_the_tiles(monkeypatch, capsys):
    # seg.tools.bench --scope block|tiles is for GPUs; here it runs end to end on tiny CPU shapes, with
    # a fake do_bench, so that its tables and its tile sweep cannot rot unnoticed between GPU sessions.
    from seg.tools import bench, bench_blocks

    monkeypatch.setattr(bench_blocks, "SHAPES", {"a": (2, 6, 5, 7)})
    monkeypatch.setattr(bench_blocks, "TILES", [dict(MAX_TILE=8, MAX_ROWS=2), dict(MAX_TILE=64, MAX_ROWS=4)])
    monkeypatch.setattr(bench_blocks, "PROJECTIONS", {"a": (2, 20, 3, 5, 17)})
    monkeypatch.setattr(bench_blocks, "PROJECTION_TILES", [dict(BLOCK_M=16, MAX_BLOCK_O=16, MAX_BLOCK_K=16, NUM_WARPS=2),
                                                           dict(BLOCK_M=32, MAX_BLOCK_O=32, MAX_BLOCK_K=16, NUM_WARPS=4)])
    monkeypatch.setattr(bench_blocks, "_ms", lambda fn, repeats: (fn(), 0.5)[1])
    monkeypatch.setattr(bench_blocks, "BLOCK_STEPS", 1)  # the interpreter takes 0.1 s a step; 3 steps, not 75
    monkeypatch.setattr(bench_blocks, "BLOCK_WARMUP", 0)
    defaults = (kernels.MAX_TILE, kernels.MAX_ROWS, projection.BLOCK_M, projection.MAX_BLOCK_O, projection.NUM_WARPS)
    assert bench.main(["--scope", "block", "--device", "cpu", "--repeats", "1"]) == 0
    assert bench.main(["--scope", "tiles", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    kernel_lines = [line for line in out.splitlines() if line.startswith("| a (2, 6, 5, 7)")]
    assert len(kernel_lines) == 2 * 2 * 3  # dtypes x layouts x kernels
    # the block rows come from seg.tools.timing's harness (real CPU times), the kernel rows from the fake do_bench
    assert re.search(r"\| a \| fwd\+bwd( \| \d+\.\d{3}){5} \|", out), out
    assert "| 8 | 2 |" in out and "| 64 | 4 |" in out
    assert "| 16 | 16 | 16 | 2 | 0.500 | 1.000 |" in out and "| 32 | 32 | 16 | 4 | 0.500 | 1.000 |" in out
    assert "plain 1x1 conv 0.500 ms, gate kernel + conv 0.500 ms" in out
    assert (kernels.MAX_TILE, kernels.MAX_ROWS, projection.BLOCK_M, projection.MAX_BLOCK_O, projection.NUM_WARPS) == defaults
