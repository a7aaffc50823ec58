"""seg.kernels.projection_grad (training with CA's gate in the projection's prologue) under Triton's interpreter.

Runs only in the child that ``test_kernels_interpreter.py`` starts with ``TRITON_INTERPRET=1``; alone:
``TRITON_INTERPRET=1 python -m pytest tests/test_projection_grad.py``.
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

from kernel_cases import EPS, assert_same_gradients, deeplab_ca, memory_format  # noqa: E402
from numerics import with_measured_bn  # noqa: E402
from seg.kernels import projection_grad  # noqa: E402
from seg.kernels.fast import FastExpandedConv, optimize_for_inference, use_fused  # noqa: E402

SHAPES = {"odd": (2, 37, 5, 7, 19), "batch1": (1, 20, 3, 9, 33)}  # (N, C, H, W, O)


@pytest.fixture(params=["default-tiles", "many-tiles"])
def tiles(request, monkeypatch):
    """Default tiles, or the smallest tl.dot takes and many pixel chunks, so every dimension spans several."""
    if request.param == "many-tiles":
        for name in ("BLOCK_M", "MAX_BLOCK_O", "MAX_BLOCK_C"):
            monkeypatch.setattr(projection_grad, name, 16)
        monkeypatch.setattr(projection_grad, "TARGET_PROGRAMS", 64)
    return request.param


def _inputs(shape, dtype, channels_last, seed):
    n, c, h, w, o = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=gen).mul_(6).to(dtype=dtype, memory_format=memory_format(channels_last))
    a_h, a_w = torch.rand(n, c, h, generator=gen).to(dtype), torch.rand(n, c, w, generator=gen).to(dtype)
    weight = torch.randn(o, c, 1, 1, generator=gen) / c**0.5
    grad = torch.randn(n, o, h, w, generator=gen).to(dtype=dtype, memory_format=memory_format(channels_last))
    return x, a_h, a_w, weight, grad


def _grads(project, x, a_h, a_w, weight, grad):
    """(output, grad x, grad a_h, grad a_w, grad weight) of ``project`` for output gradient ``grad``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, a_h, a_w, weight)]
    out = project(*leaves)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves)]


def _layers(x, a_h, a_w, weight):
    return F.conv2d(x * a_h[..., None] * a_w[:, :, None, :], weight.to(x.dtype))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_every_gradient_are_as_accurate_as_the_layers(shape, dtype, channels_last, tiles):
    inputs = _inputs(shape, dtype, channels_last, sum(shape))
    got = _grads(projection_grad.gated_projection_trainable, *inputs)
    layers = _grads(_layers, *inputs)
    exact = _grads(_layers, *(t.double() for t in inputs))
    names = ["output", "x", "a_h", "a_w", "weight"]
    for name, g, ref, ex in zip(names, got, layers, exact):
        assert g.shape == ex.shape and g.dtype == ref.dtype, name
        scale = max(ex.abs().max().item(), 1.0)
        err, err_ref = (g.double() - ex).abs().max().item(), (ref.double() - ex).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-5 * scale, (name, err)
        else:  # see test_projection_kernel.py: no worse than the layers, within 2x plus a few eps
            assert err <= 2 * err_ref + 4 * EPS[dtype] * scale, (name, err, err_ref)


def test_weight_gradient_sums_the_chunks_of_pixels(monkeypatch):
    # Many chunks, a ragged last one: every pixel counted exactly once.
    monkeypatch.setattr(projection_grad, "BLOCK_M", 16)
    monkeypatch.setattr(projection_grad, "TARGET_PROGRAMS", 1000)
    x, a_h, a_w, weight, grad = _inputs((3, 16, 7, 5, 16), torch.float32, True, 0)
    got = projection_grad.weight_grad(grad, x, a_h, a_w)
    gated = x.double() * a_h.double()[..., None] * a_w.double()[:, :, None, :]
    torch.testing.assert_close(got.double(), torch.einsum("nohw,nchw->oc", grad.double(), gated), atol=1e-5, rtol=1e-5)


def _train_prologue(model):
    model = optimize_for_inference(model)
    use_fused(model, True)
    blocks = [m for m in model.modules() if isinstance(m, FastExpandedConv)]
    for block in blocks:
        block.train_prologue = True
    return model, blocks


def test_deeplab_gradients_with_the_prologue_in_every_block_match_the_reference(monkeypatch):
    # The real encoder, all 16 expanded blocks, channels_last as the GPU trains (both layouts are
    # crossed with every shape and dtype per block above). BN frozen, as in test_kernels.py: with batch
    # statistics a random-init DeepLabV3 turns rounding into O(1) changes (the next test covers them).
    # Frozen at measured statistics: at its init ones every gradient in the encoder is below 1e-17.
    torch.manual_seed(0)
    reference = with_measured_bn(deeplab_ca(), 8, 3, 64, 64).to(memory_format=torch.channels_last)
    fast, blocks = _train_prologue(copy.deepcopy(reference))
    calls = []
    real = projection_grad.gated_projection_trainable
    monkeypatch.setattr(projection_grad, "gated_projection_trainable", lambda *a: calls.append(1) or real(*a))
    # one image, as test_kernels' whole-DeepLab test: the per-block tests above cover batches of several
    images = torch.randn(1, 3, 32, 32).to(memory_format=torch.channels_last)
    targets = images.argmax(1)
    for model in (reference, fast):
        F.cross_entropy(model(images), targets).backward()
    assert len(calls) == len(blocks) == 16
    assert_same_gradients(reference, fast)


def test_block_in_training_mode_is_as_accurate_as_the_layers_with_batch_statistics():
    # One expanded block (96 expanded channels, stride 2) in training mode: the output, the input's
    # and every parameter's gradient, and both BNs' running statistics after the step, each
    # against the layers in float64 (batch statistics cancel, so some values are rounding noise).
    torch.manual_seed(4)
    encoder = deeplab_ca().encoder
    reference = next(m for m in encoder.modules() if type(m).__name__ == "ExpandedConv" and m[0][0].out_channels == 96)
    reference = reference.train()
    fast, _ = _train_prologue(copy.deepcopy(reference))
    x = torch.randn(4, 16, 9, 11).to(memory_format=torch.channels_last)
    results = []
    for block, dtype in ((copy.deepcopy(reference).double(), torch.float64), (reference, torch.float32),
                         (fast, torch.float32)):
        inp = x.to(dtype).clone().requires_grad_()
        out = block(inp)  # (4, 24, 5, 6): this block's depthwise has stride 2
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype))
        results.append([t.double() for t in (out, inp.grad, *(p.grad for p in block.parameters()), *block.buffers())])
    assert isinstance(fast, FastExpandedConv) and fast.training
    for i, (exact, layers, got) in enumerate(zip(*results)):
        scale = max(exact.abs().max().item(), 1.0)
        err, err_layers = (got - exact).abs().max().item(), (layers - exact).abs().max().item()
        assert err <= 4 * err_layers + 8 * EPS[torch.float32] * scale, (i, err, err_layers)


def test_training_prologue_is_off_by_default_and_follows_its_flag(monkeypatch):
    model = optimize_for_inference(deeplab_ca().train())
    use_fused(model, True)
    calls = []
    monkeypatch.setattr(projection_grad, "gated_projection_trainable", lambda *a: calls.append(1))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == []  # not timed on a GPU yet: the layers, with CA's fused gate
