"""seg.kernels.cpu: what the C++ pooling, gating and projection kernels of CA's CPU inference path
compute, and where CA uses them. How they are built and cached is test_cpu_kernel_build.py's."""

import contextlib

import pytest
import torch

from numerics import assert_close_at_scale, ca_with_bn_stats, with_measured_bn
from seg.kernels import cpu
from seg.kernels.fast import optimize_for_inference
from seg.modeling.attention import CoordAttention
from seg.modeling.encoders.mobilenet_v2 import ExpandedConv


@pytest.fixture(autouse=True)
def kernels_always(monkeypatch):
    """These tests are about the kernels themselves: no calibration may choose PyTorch's ops instead."""
    from seg.kernels import calibrate

    monkeypatch.setattr(calibrate, "MODE", "1")


def test_strip_means_of_a_hand_computed_plane(ext):
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(1, 1, 2, 3)
    mean_h, mean_w = ext.strip_means(x)
    assert mean_h.tolist() == [[[2.0, 5.0]]]
    assert mean_w.tolist() == [[[2.5, 3.5, 4.5]]]


@pytest.mark.parametrize("shape", [(2, 5, 7, 13), (1, 3, 1, 9), (1, 3, 9, 1), (1, 1, 1, 1), (3, 40, 33, 65)])
@pytest.mark.parametrize("threads", [1, 2])
def test_strip_means_match_torch(ext, shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(shape) + 1.0
        mean_h, mean_w = ext.strip_means(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(mean_h, x.mean(3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mean_w, x.mean(2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 7, 13), (1, 3, 1, 9), (3, 40, 33, 65)])
def test_gate_is_bit_identical_to_torch_and_can_write_in_place(ext, shape):
    n, c, h, w = shape
    x, a_h, a_w = torch.randn(shape), torch.rand(n, c, h), torch.rand(n, c, w)
    expected = x * a_h[..., None] * a_w[..., None, :]
    assert torch.equal(ext.gate(x, a_h, a_w, torch.empty_like(x)), expected)
    out = ext.gate(x, a_h, a_w, x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(x, expected)


@pytest.mark.parametrize("bad", ["double", "channels_last", "strip_shape"])
def test_kernels_refuse_what_they_cannot_index(ext, bad):
    x, a_h, a_w = torch.randn(1, 4, 5, 6), torch.rand(1, 4, 5), torch.rand(1, 4, 6)
    if bad == "double":
        x = x.double()
    elif bad == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        a_h = torch.rand(1, 4, 6)
    with pytest.raises(RuntimeError, match="contiguous float32|a_h must be"):
        ext.gate(x, a_h, a_w, torch.empty(1, 4, 5, 6))


def test_kernels_apply_only_to_contiguous_float32_cpu_maps(ext):
    x = torch.randn(1, 4, 5, 6)
    assert cpu.kernels_for(x) is ext
    assert cpu.kernels_for(x.double()) is None
    assert cpu.kernels_for(x.to(memory_format=torch.channels_last)) is None
    assert cpu.kernels_for(x.transpose(2, 3)) is None


def test_strip_means_can_apply_relu6_in_place(ext):
    x = torch.tensor([[-1.0, 2.0, 7.0], [4.0, 9.0, -6.0]]).view(1, 1, 2, 3)
    mean_h, mean_w = ext.strip_means(x, relu6=True)
    assert torch.equal(x, torch.tensor([[0.0, 2.0, 6.0], [4.0, 6.0, 0.0]]).view(1, 1, 2, 3))
    torch.testing.assert_close(mean_h, torch.tensor([[[8 / 3, 10 / 3]]]))
    torch.testing.assert_close(mean_w, torch.tensor([[[2.0, 4.0, 3.0]]]))


def test_ca_inference_runs_the_kernels_and_matches_reference(ext, monkeypatch):
    calls = []
    monkeypatch.setattr(ext, "forward", lambda *a, _fn=ext.forward: calls.append(a[-1]) or _fn(*a))
    block, x = ca_with_bn_stats(), torch.randn(2, 16, 11, 7)
    with torch.no_grad():
        expected = CoordAttention.forward(block, x)
        got = block(x)
    assert len(calls) == 1 and calls[0].data_ptr() != x.data_ptr()  # not in place: a fresh output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_in_place_writes_move_the_version_counter_like_torch(ext):
    x, a_h, a_w = torch.randn(1, 4, 5, 6), torch.rand(1, 4, 5), torch.rand(1, 4, 6)
    before = x._version
    ext.gate(x, a_h, a_w, x)
    assert x._version > before
    with torch.inference_mode():
        frozen = torch.randn(1, 4, 5, 6)
    kept = frozen.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        ext.gate(frozen, a_h, a_w, frozen)
    assert torch.equal(frozen, kept)  # refused before writing


def _projection(block: CoordAttention, out_channels: int = 24) -> torch.Tensor:
    return torch.randn(out_channels, block.conv1.in_channels, 1, 1) * 0.2


# (1, 16, 200, 300): rows of 16 x 300 floats make tiles of 27 rows, the last one partial;
# (3, 16, 5, 300) at 2 threads: each thread's share of the 15 rows crosses an image boundary
@pytest.mark.parametrize("shape", [(2, 16, 11, 7), (1, 16, 200, 300), (3, 16, 5, 300), (3, 16, 1, 1), (1, 16, 1, 40)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("relu6", [False, True])
def test_forward_project_equals_ca_then_conv(ext, shape, threads, relu6):
    block, x = ca_with_bn_stats(), torch.randn(shape) * 4
    weight = _projection(block)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # inference mode, as a caller may run it: its worker threads are not, and must still write the output
        with torch.inference_mode():
            x = x.clone()
            expected = torch.nn.functional.conv2d(CoordAttention.forward(block, x.clamp(0, 6) if relu6 else x), weight)
            got = ext.forward_project(x, block._fold_sources(), block.bn1.eps, weight, relu6)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forward_project_refuses_a_projection_that_does_not_fit(ext):
    block, x = ca_with_bn_stats(), torch.randn(1, 16, 5, 6)
    with torch.no_grad(), pytest.raises(RuntimeError, match="1x1 conv from 16 channels"):
        ext.forward_project(x, block._fold_sources(), block.bn1.eps, torch.randn(8, 16, 3, 3))


def _encoder(attention: str = "ca"):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    encoder = smp.encoders.get_encoder(f"mobilenet_v2_{attention}", weights=None)
    # Measured BN statistics, so that a skipped or stale BN shows and every level's features carry the
    # input: near (0, 1) the last levels' features were the same for any input to 1e-8.
    return optimize_for_inference(with_measured_bn(encoder, 2, 3, 64, 64))


def _spy_projection(ext, monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(ext, "forward_project", lambda *a, _fn=ext.forward_project: calls.append(a) or _fn(*a))
    return calls


def test_mobilenet_v2_ca_fuses_each_block_projection_at_inference(ext, monkeypatch):
    encoder, x = _encoder(), torch.randn(2, 3, 96, 64)
    calls = _spy_projection(ext, monkeypatch)
    with torch.no_grad():
        got = encoder(x)
        assert len(calls) == 16
        with cpu.disabled():
            expected = encoder(x)
    assert len(calls) == 16
    # Both paths are fp32 and sum in different orders; each was off float64 by up to 1e-5 of the deepest
    # level's scale (a 0.1% error shows as 1e-3 of it).
    for g, e in zip(got, expected):
        assert_close_at_scale(g, e, 1e-4)


def test_projection_is_not_fused_in_training_with_grad_or_for_se(ext, monkeypatch):
    calls = _spy_projection(ext, monkeypatch)
    encoder, x = _encoder(), torch.randn(2, 3, 64, 64)
    encoder(x)  # eval, but grad enabled
    with torch.no_grad():
        encoder.train()(x)
        _encoder("se")(x)
    assert calls == []


def test_hooks_keep_their_block_unfused(ext, monkeypatch):
    encoder, x = _encoder(), torch.randn(1, 3, 64, 64)
    blocks = [m for m in encoder.modules() if isinstance(m, CoordAttention)]
    convs = [m for m in encoder.modules() if isinstance(m, ExpandedConv)]
    seen = []
    blocks[3].conv_h.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    convs[5][1][2].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))  # a depthwise ReLU6
    calls = _spy_projection(ext, monkeypatch)
    with torch.no_grad():
        encoder(x)
    assert len(calls) == 14 and len(seen) == 2


def test_a_ca_left_in_training_mode_keeps_its_block_unfused(ext, monkeypatch):
    encoder, x = _encoder(), torch.randn(1, 3, 64, 64)
    [m for m in encoder.modules() if isinstance(m, CoordAttention)][0].train()  # BN on batch statistics
    calls = _spy_projection(ext, monkeypatch)
    with torch.no_grad():
        encoder(x)
    assert len(calls) == 15


def test_flop_counts_see_every_op_of_the_fused_blocks(ext):
    from torch.utils.flop_counter import FlopCounterMode

    encoder, x = _encoder(), torch.randn(1, 3, 64, 64)
    counts = []
    for switch in (cpu.disabled, contextlib.nullcontext):
        counter = FlopCounterMode(display=False)
        with switch(), torch.no_grad(), counter:
            encoder(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
