"""seg.kernels.calibrate: the C++ CPU kernels run only where they measured faster, once per shape.

Timings are faked: each path advances a fake clock by a cost the test sets, so each path wins in turn."""

import copy

import pytest
import torch

from kernel_cases import assert_as_accurate
from numerics import ca_with_bn_stats, with_measured_bn
from seg.kernels import calibrate, cpu
from seg.kernels.fast import optimize_for_inference
from seg.modeling.attention import CoordAttention


@pytest.fixture()
def ext(ext, monkeypatch):
    """conftest's built kernels, with calibration on and nothing chosen yet."""
    monkeypatch.setattr(calibrate, "MODE", "auto")
    monkeypatch.setattr(calibrate, "_choices", {})
    return ext


@pytest.fixture()
def clock(monkeypatch, ext):
    """A fake clock: the kernel path costs ``cost["kernel"]``, the PyTorch-ops path ``cost["ops"]``; calls counted."""
    from seg.kernels.fast import FastCoordAttention

    state = {"now": 0.0, "kernel": 1.0, "ops": 2.0, "kernel_calls": 0, "ops_calls": 0}
    monkeypatch.setattr(calibrate, "TIMER", lambda: state["now"])
    real_forward, real_ops = ext.forward, FastCoordAttention._forward_ops

    def forward(*args):
        state["now"] += state["kernel"]
        state["kernel_calls"] += 1
        return real_forward(*args)

    def ops(self, x, inplace):
        state["now"] += state["ops"]
        state["ops_calls"] += 1
        return real_ops(self, x, inplace)

    monkeypatch.setattr(ext, "forward", forward)
    monkeypatch.setattr(FastCoordAttention, "_forward_ops", ops)
    return state


@pytest.mark.parametrize("kernel_cost, ops_cost, kernel_wins", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_the_faster_path_is_chosen_and_outputs_are_equal_either_way(clock, kernel_cost, ops_cost, kernel_wins):
    clock.update(kernel=kernel_cost, ops=ops_cost)
    block, x = ca_with_bn_stats(), torch.randn(2, 16, 11, 7)
    with torch.no_grad():
        expected = CoordAttention.forward(block, x)
        first = block(x)
        assert (clock["kernel_calls"], clock["ops_calls"]) == (calibrate.REPEATS + kernel_wins,
                                                               calibrate.REPEATS + (not kernel_wins))
        second = block(x)
    assert (clock["kernel_calls"], clock["ops_calls"]) == (calibrate.REPEATS + 2 * kernel_wins,
                                                           calibrate.REPEATS + 2 * (not kernel_wins))
    for got in (first, second):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert list(calibrate.choices().values()) == [kernel_wins]


def test_calibration_happens_once_per_shape_and_thread_count(clock):
    block = ca_with_bn_stats()
    with torch.no_grad():
        for shape in [(1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 9, 8), (1, 16, 8, 8)]:
            block(torch.randn(shape))
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads != 1 else 2)
        try:
            block(torch.randn(1, 16, 8, 8))
        finally:
            torch.set_num_threads(threads)
    assert len(calibrate.choices()) == 3  # two shapes, and one shape again at another thread count
    assert "CPU kernels chosen for 3 of 3 CA shapes" == calibrate.summary()


def test_calibration_never_gates_the_callers_tensor_twice(clock):
    """CA may gate its input in place; calibrating works on copies, so the input is gated once."""

    block = ca_with_bn_stats()
    block.inplace = True
    x = torch.randn(1, 16, 8, 8)
    expected = CoordAttention.forward(block, x.clone())
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_always_and_never(monkeypatch, ext):
    block, x = ca_with_bn_stats(), torch.randn(1, 16, 8, 8)
    monkeypatch.setattr(calibrate, "MODE", "1")
    assert calibrate.prefers_kernel(("CA", (1,)), lambda t: pytest.fail("timed"), lambda t: pytest.fail("timed"), x)
    assert calibrate.summary() == "CPU kernels: always on (SEG_CPU_KERNELS=1)"
    with cpu.disabled():  # SEG_CPU_KERNELS=0: the kernels are never asked for, so nothing is calibrated
        with torch.no_grad():
            block(x)
    assert calibrate.choices() == {}


def test_mobilenet_v2_ca_blocks_calibrate_and_equal_the_kernel_free_model(ext):
    import segmentation_models_pytorch as smp

    import seg.modeling.models  # noqa: F401  (registers our encoders)

    torch.manual_seed(0)
    encoder = smp.encoders.get_encoder("mobilenet_v2_ca", in_channels=3, depth=5, weights=None)
    encoder = optimize_for_inference(with_measured_bn(encoder, 2, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = encoder(x)
        with cpu.disabled():
            expected = encoder(x)
        exact = copy.deepcopy(encoder).double()(x.double())
    # Measured BN statistics make every block count, and 16 blocks of fp32 rounding in another order
    # add up: the kernels must be about as accurate as the layers
    # against float64 (a wrong term errs by the values themselves).
    for level, (g, e, x64) in enumerate(zip(got, expected, exact)):
        assert_as_accurate(g, e, x64, torch.float32, factor=4, what=f"level {level}")
    kinds = {key[0][0] for key in calibrate.choices()}
    assert "block" in kinds  # the fused ReLU6 + CA + projection was timed against the layers
