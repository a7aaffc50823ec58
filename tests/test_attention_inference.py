"""CA's inference path (``seg.kernels.fast``: eval, no grad, the C++ kernels or PyTorch ops) against the
reference forward: values, gating in place, hooks, and the folded-BN cache following every weight change."""

import pytest
import torch

from numerics import ca_with_bn_stats, with_measured_bn
from seg.kernels import cpu
from seg.kernels.fast import optimize_for_inference
from seg.modeling.attention import CoordAttention


def _reference(block: CoordAttention, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return CoordAttention.forward(block, x.clone())


@pytest.fixture(params=["cpu_kernels", "torch_ops"])
def ca_path(request):
    """Run the test through CA's C++ inference kernel and again through its PyTorch-ops fallback."""
    if request.param == "torch_ops":
        with cpu.disabled():
            yield request.param
    else:
        yield request.param


def _inference(block: CoordAttention, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The block's output with the reference path disabled, so the lean path must be the one that ran."""
    def refuse(_x):
        raise AssertionError("the reference path ran")

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(CoordAttention, "forward", lambda self, _x: refuse(_x))  # the reference, reached by super()
        return block(x.clone())


@pytest.mark.parametrize("shape", [(2, 16, 7, 12), (1, 16, 1, 9), (2, 16, 9, 1), (1, 16, 1, 1), (3, 16, 5, 5)])
def test_inference_path_matches_reference(monkeypatch, shape, ca_path):
    block, x = ca_with_bn_stats(), torch.randn(shape)
    torch.testing.assert_close(_inference(block, x, monkeypatch), _reference(block, x), atol=1e-5, rtol=1e-5)


def test_inference_path_under_inference_mode_and_channels_last(monkeypatch):
    block = ca_with_bn_stats(32)
    x = torch.randn(2, 32, 9, 14).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = block(x)
    torch.testing.assert_close(got, _reference(block, x), atol=1e-5, rtol=1e-5)


def test_inplace_gates_the_input_itself(monkeypatch):
    block, x = ca_with_bn_stats(inplace=True), torch.randn(2, 16, 6, 7)
    expected = _reference(block, x)
    with torch.no_grad():
        y = block(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_inplace_leaves_input_alone_when_grad_is_needed():
    block, x = ca_with_bn_stats(inplace=True), torch.randn(2, 16, 6, 7, requires_grad=True)
    before = x.detach().clone()
    block(x).sum().backward()
    assert torch.equal(x.detach(), before) and x.grad is not None


def test_hooks_on_sub_layers_still_fire_at_inference():
    block, x = ca_with_bn_stats(), torch.randn(1, 16, 5, 6)
    seen = []
    block.conv_h.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        block(x)
    assert seen == [torch.Size([1, 16, 5, 1])]


def test_inference_adds_nothing_to_state_dict(ca_path):
    block = ca_with_bn_stats()
    keys = list(block.state_dict())
    with torch.no_grad():
        block(torch.randn(1, 16, 4, 4))
    assert list(block.state_dict()) == keys
    if ca_path == "torch_ops":
        assert block._fold_cache is not None  # the fold was cached, just not as state


def _assert_fresh(block, x, monkeypatch):
    torch.testing.assert_close(_inference(block, x, monkeypatch), _reference(block, x), atol=1e-5, rtol=1e-5)


def test_fold_cache_follows_load_state_dict(monkeypatch, ca_path):
    block, x = ca_with_bn_stats(), torch.randn(2, 16, 6, 5)
    _assert_fresh(block, x, monkeypatch)  # fills the cache
    block.load_state_dict(ca_with_bn_stats().state_dict())
    _assert_fresh(block, x, monkeypatch)


def test_fold_cache_follows_in_place_edits_of_each_source(monkeypatch, ca_path):
    block, x = ca_with_bn_stats(), torch.randn(2, 16, 6, 5)
    for tensor in block._fold_sources():
        _assert_fresh(block, x, monkeypatch)
        with torch.no_grad():
            tensor.add_(0.25)  # running_var stays positive
    _assert_fresh(block, x, monkeypatch)


def test_fold_cache_follows_dtype_change(monkeypatch, ca_path):
    block, x = ca_with_bn_stats(), torch.randn(2, 16, 6, 5)
    _assert_fresh(block, x, monkeypatch)
    block.double()
    got = _inference(block, x.double(), monkeypatch)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(block, x.double()), atol=1e-10, rtol=1e-10)


def test_fold_cache_follows_training_steps(monkeypatch, ca_path):
    block, x = ca_with_bn_stats(), torch.randn(4, 16, 6, 5)
    _assert_fresh(block, x, monkeypatch)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block.train()
    block(x).square().mean().backward()  # also moves BN's running statistics
    opt.step()
    block.eval()
    _assert_fresh(block, x, monkeypatch)


def test_fold_cache_cleared_by_eval_after_data_writes(monkeypatch, ca_path):
    block, x = ca_with_bn_stats(), torch.randn(2, 16, 6, 5)
    _assert_fresh(block, x, monkeypatch)
    block.conv1.weight.data.mul_(-1.0)  # .data bypasses the version counter...
    block.eval()  # ...which is why (re-)entering eval mode drops the cache
    _assert_fresh(block, x, monkeypatch)


def test_mobilenet_v2_ca_gates_in_place_with_unchanged_features():
    import segmentation_models_pytorch as smp

    encoder = smp.encoders.get_encoder("mobilenet_v2_ca", weights=None)
    encoder = optimize_for_inference(with_measured_bn(encoder, 2, 3, 64, 64))
    blocks = [m for m in encoder.modules() if isinstance(m, CoordAttention)]
    assert len(blocks) == 16 and all(b.inplace for b in blocks)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = encoder(x)
        for b in blocks:
            b.inplace = False
        expected = encoder(x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_block_built_under_inference_mode(monkeypatch, ca_path):
    x = torch.randn(2, 16, 6, 5)
    with torch.inference_mode():  # its weights are inference tensors, which have no version counter
        block = ca_with_bn_stats()
        got = block(x)
        with torch.no_grad():
            block.conv_h.bias.add_(1.0)
        got_after = block(x)
        expected_after = CoordAttention.forward(block, x.clone())
    assert not torch.allclose(got, got_after)
    torch.testing.assert_close(got_after, expected_after, atol=1e-5, rtol=1e-5)


def test_fold_cached_under_inference_mode_serves_no_grad_calls(ca_path):
    block, x = ca_with_bn_stats(inplace=True), torch.randn(2, 16, 6, 7)
    expected = _reference(block, x)
    with torch.inference_mode():
        block(x.clone())  # the cached fold is now made of inference tensors
    with torch.no_grad():
        got = block(x.clone())  # a normal tensor gated in place by them
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["mobilenet_v2_ca", "resnet50_ca"])
def test_hooks_on_a_ca_block_see_what_the_reference_sees(encoder):
    """At inference CA may gate its input in place; a hook must still be shown the ungated input."""
    from seg.modeling.encoders import register  # noqa: F401  (our names in smp)
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    encoder_model = optimize_for_inference(smp.encoders.get_encoder(encoder, in_channels=3, depth=5, weights=None).eval())
    block = next(m for m in encoder_model.modules() if isinstance(m, CoordAttention))
    seen = {}
    pre = block.register_forward_pre_hook(lambda m, args: seen.__setitem__("pre", args[0].clone()))
    post = block.register_forward_hook(lambda m, args, out: seen.update(input=args[0].clone(), output=out.clone()))
    with torch.no_grad():
        encoder_model(torch.randn(1, 3, 64, 64))
        reference = CoordAttention.forward(block, seen["pre"].clone())
    pre.remove(), post.remove()
    assert torch.equal(seen["input"], seen["pre"])  # not gated in place behind the hook's back
    torch.testing.assert_close(seen["output"], reference, rtol=1e-5, atol=1e-6)
