"""seg.kernels.projection (the projection GEMM with CA's gate in its prologue) under Triton's interpreter.

Like test_kernels.py, this file runs only in the child that ``test_kernels_interpreter.py`` starts
with ``TRITON_INTERPRET=1``. Run it alone with
``TRITON_INTERPRET=1 python -m pytest tests/test_projection_kernel.py``.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in a child process under TRITON_INTERPRET=1 (see test_kernels_interpreter.py)",
                allow_module_level=True)
pytest.importorskip("triton")

from kernel_cases import EPS, deeplab_ca, memory_format  # noqa: E402
from numerics import with_measured_bn  # noqa: E402
from seg.kernels import projection  # noqa: E402
from seg.kernels.fast import FastExpandedConv, optimize_for_inference, use_fused  # noqa: E402
from seg.modeling.encoders.mobilenet_v2 import ExpandedConv  # noqa: E402

# (N, C, H, W, O): odd sizes, batch 1 and > 1, C and O off every power of 2
SHAPES = {"odd": (2, 37, 5, 7, 19), "batch1": (1, 20, 3, 9, 33), "1xW": (3, 24, 1, 6, 16)}


@pytest.fixture(params=["default-tiles", "many-tiles"])
def tiles(request, monkeypatch):
    """Default tiles, or the smallest tl.dot takes, so that M, C and O each span several blocks."""
    if request.param == "many-tiles":
        for name in ("BLOCK_M", "MAX_BLOCK_O", "MAX_BLOCK_K"):
            monkeypatch.setattr(projection, name, projection.MIN_DOT)
    return request.param


def _case(shape, gen):
    n, c, h, w, o = shape
    x = torch.randn(n, c, h, w, generator=gen).clamp_(0, 6)  # a ReLU6 output, as in the block
    a_h, a_w = torch.rand(n, c, h, generator=gen), torch.rand(n, c, w, generator=gen)
    return x, a_h, a_w, torch.randn(o, c, generator=gen) / c**0.5, torch.randn(o, generator=gen)


def _reference(x, a_h, a_w, weight, bias):
    """The layers' order in x's dtype: the gated map, then the conv, then the bias."""
    gated = x * a_h[..., None] * a_w[:, :, None, :]
    return F.conv2d(gated, weight.to(x.dtype)[..., None, None]) + bias.to(x.dtype)[:, None, None]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gated_projection_is_as_accurate_as_the_layers(shape, dtype, channels_last, tiles):
    x, a_h, a_w, weight, bias = _case(shape, torch.Generator().manual_seed(sum(shape)))
    x = x.to(dtype=dtype, memory_format=memory_format(channels_last))
    a_h, a_w = a_h.to(dtype), a_w.to(dtype)
    out = projection.gated_projection(x, a_h, a_w, weight, bias)
    assert out.dtype == dtype and out.shape == (shape[0], shape[4], shape[2], shape[3])
    assert out.is_contiguous(memory_format=memory_format(channels_last))
    exact = _reference(*(t.double() for t in (x, a_h, a_w, weight, bias)))
    err = (out.double() - exact).abs().max().item()
    scale = max(exact.abs().max().item(), 1.0)
    if dtype == torch.float32:
        assert err <= 1e-5 * scale, err
    else:
        # No worse than the layers in the same dtype, within 2x plus a few eps: a wrong index, a
        # missing strip or channel gives errors of the order of the values themselves.
        err_layers = (_reference(x, a_h, a_w, weight, bias).double() - exact).abs().max().item()
        assert err <= 2 * err_layers + 4 * EPS[dtype] * scale, (err, err_layers)


def test_strips_may_be_strided_views():
    # As CA hands them over from channels_last convs: (N, C, L, 1) flattened, not contiguous.
    x, a_h, a_w, weight, bias = _case((2, 20, 4, 5, 17), torch.Generator().manual_seed(1))
    strided = [s[..., None].contiguous(memory_format=torch.channels_last).flatten(2) for s in (a_h, a_w)]
    assert not strided[0].is_contiguous()
    torch.testing.assert_close(projection.gated_projection(x, *strided, weight, bias),
                               projection.gated_projection(x, a_h, a_w, weight, bias), atol=0, rtol=0)


def test_refuses_other_dtypes():
    x, a_h, a_w, weight, bias = _case((1, 16, 2, 2, 16), torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match="float64"):
        projection.gated_projection(x.double(), a_h, a_w, weight, bias)


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """BN statistics and affine terms away from their init, so folding them is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.2, 0.2, generator=gen)


# Both strides and both layouts, each once: the layouts are crossed with every shape and dtype per
# block above, and each whole model costs 2 to 7 s under the interpreter.
@pytest.mark.parametrize("output_stride,channels_last", [(16, False), (8, True)], ids=["os16-nchw", "os8-nhwc"])
def test_deeplab_with_the_prologue_in_every_expanded_block_matches_the_reference(output_stride, channels_last,
                                                                                  monkeypatch):
    # The real encoder: its strides and dilation (OS 8 dilates the last two stages), batch 2,
    # an input that is not square. BN folded from measured statistics: with statistics near the init
    # ones (_randomize_bn's) two inputs' logits were 4e-8 apart, under this test's atol; now 0.37.
    torch.manual_seed(0)
    reference = deeplab_ca() if output_stride == 16 else _deeplab_os8()
    reference = with_measured_bn(reference, 2, 3, 48, 32, seed=output_stride)
    reference = reference.to(memory_format=memory_format(channels_last))
    fast = optimize_for_inference(copy.deepcopy(reference))
    use_fused(fast, True)
    calls = []
    real = projection.gated_projection
    monkeypatch.setattr(projection, "gated_projection", lambda *a: calls.append(a[0].shape) or real(*a))
    images = torch.randn(2, 3, 48, 32).to(memory_format=memory_format(channels_last))
    with torch.no_grad():
        expected, got = reference(images), fast(images)
    expanded = [m for m in fast.modules() if isinstance(m, FastExpandedConv)]
    assert len(calls) == len(expanded) == 16  # every expanded block of MobileNetV2 took the prologue
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert [type(m) for m in reference.modules() if isinstance(m, ExpandedConv)] == [ExpandedConv] * 16


def _deeplab_os8():
    from seg.modeling.models import build_model

    return build_model("deeplabv3", "mobilenet_v2_ca", 3, output_stride=8, decoder_atrous_rates=(12, 24, 36),
                       decoder_channels=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_block_in_low_precision_is_as_accurate_as_the_layers(dtype):
    # One expanded block (C = 96 expanded channels, O = 24) in dtype, against the same block in float64.
    torch.manual_seed(3)
    encoder = deeplab_ca().encoder
    block = next(m for m in encoder.modules() if isinstance(m, ExpandedConv) and m[0][0].out_channels == 96)
    _randomize_bn(block, 3)
    block = block.eval()
    x = torch.randn(2, 16, 9, 11).to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = copy.deepcopy(block).double()(x.double())
        layers = copy.deepcopy(block).to(dtype)(x.to(dtype)).double()
        fast = optimize_for_inference(copy.deepcopy(block).to(dtype))
        use_fused(fast, True)
        got = fast(x.to(dtype))
    assert isinstance(fast, FastExpandedConv) and got.dtype == dtype
    scale = max(exact.abs().max().item(), 1.0)
    err, err_layers = (got.double() - exact).abs().max().item(), (layers - exact).abs().max().item()
    assert err <= 2 * err_layers + 4 * EPS[dtype] * scale, (err, err_layers)


def test_prologue_off_or_grad_on_runs_the_layers(monkeypatch):
    model = optimize_for_inference(deeplab_ca().eval())
    use_fused(model, True)
    calls = []
    monkeypatch.setattr(projection, "gated_projection", lambda *a: calls.append(1))
    images = torch.randn(1, 3, 32, 32)
    for block in model.modules():
        if isinstance(block, FastExpandedConv):
            block.prologue = False
    with torch.no_grad():
        model(images)
    model(images)  # with grad: the reference layers, which autograd can differentiate
    assert calls == []


def test_bench_times_the_gate_kernel_and_the_prologue_apart():
    from seg.tools.bench_models import FUSED_CA, PROLOGUE_CA, available_variants, build_group

    variants = {name: v for name, v in available_variants("cpu", "eager").items() if name in (FUSED_CA, PROLOGUE_CA)}
    models = build_group("mobilenet_v2", 16, variants, "cpu")
    for name, prologue in ((FUSED_CA, False), (PROLOGUE_CA, True)):
        flags = [m.prologue and m.train_prologue for m in models[name].modules() if isinstance(m, FastExpandedConv)]
        assert flags == [prologue] * 16, name
