"""CoordAttention against the official block, odd shapes, gradients; SE/CBAM and the factory.
CA's inference path (seg.kernels.fast) is in test_attention_inference.py."""

import pytest
import torch
from torch import nn

from conftest import shared_path
from seg.modeling.attention import CBAM, CoordAttention, SqueezeExcite, make_attention
from seg.tools.complexity import count_params

FIXTURE = ("fixtures", "official_ca", "coordatt_block.pt")


@pytest.fixture(scope="module")
def official():
    return torch.load(shared_path(*FIXTURE), weights_only=True)


@pytest.fixture()
def official_block(official):
    block = CoordAttention(official["x"].shape[1])
    block.load_state_dict(official["state_dict"], strict=True)
    return block


def test_matches_official_in_eval_mode(official, official_block):
    with torch.no_grad():
        y = official_block.eval()(official["x"])
    torch.testing.assert_close(y, official["y_eval"], atol=1e-5, rtol=1e-5)


def test_matches_official_in_train_mode(official, official_block):
    with torch.no_grad():
        y = official_block.train()(official["x"])
    torch.testing.assert_close(y, official["y_train"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [16, 96, 256, 960])
def test_param_count_follows_paper_formula(channels):
    mip = max(8, channels // 32)
    expected = channels * mip + mip + 2 * mip + 2 * (mip * channels + channels)
    assert count_params(CoordAttention(channels)) == expected


@pytest.mark.parametrize(
    "shape",
    [(2, 16, 7, 12), (2, 16, 1, 9), (2, 16, 9, 1), (2, 16, 5, 3), (1, 16, 11, 13), (1, 16, 1, 1)],
    ids=["h!=w", "1xW", "Hx1", "odd", "batch1", "1x1-batch1"],
)
@pytest.mark.parametrize("name", ["ca", "se", "cbam"])
def test_any_shape_in_train_mode(name, shape):
    block = make_attention(name, shape[1]).train()
    x = torch.randn(shape)
    y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_ca_reads_size_at_every_call():
    block = CoordAttention(16).eval()
    for shape in [(1, 16, 8, 8), (1, 16, 4, 20)]:
        x = torch.randn(shape)
        gate = block(x) / x
        # A separable gate: every 2x2 minor of gate[n, c] has zero determinant (rank 1).
        g = gate[0, 0]
        assert torch.allclose(g[0, 0] * g[1:, 1:], g[0, 1:] * g[1:, :1], atol=1e-5)


def test_channels_last_input_gives_same_values():
    block = CoordAttention(32).eval()
    x = torch.randn(2, 32, 9, 14)
    y_cl = block(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, block(x))


def test_gate_is_true_sigmoid_not_hard():
    block = CoordAttention(8).eval()
    with torch.no_grad():
        for conv in (block.conv_h, block.conv_w):
            conv.weight.zero_()
            conv.bias.fill_(1.0)
    x = torch.ones(1, 8, 3, 4)
    expected = torch.sigmoid(torch.tensor(1.0)) ** 2  # hard sigmoid would give (4/6)**2
    torch.testing.assert_close(block(x), torch.full_like(x, expected.item()))


def test_gradcheck_float64():
    block = CoordAttention(8).double().train()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize(
    "name, cls", [("ca", CoordAttention), ("se", SqueezeExcite), ("cbam", CBAM), ("none", nn.Identity)]
)
def test_factory_builds_each_name(name, cls):
    assert type(make_attention(name, 64)) is cls


def test_factory_rejects_unknown_name_listing_valid_ones():
    with pytest.raises(ValueError, match=r"'eca'.*\['ca', 'cbam', 'none', 'se'\]"):
        make_attention("eca", 64)


def test_se_and_cbam_compute_their_papers_equations():
    """SE (Hu et al., eq. 2-3): x * sigmoid(W2 relu(W1 avg(x))). CBAM (Woo et al., eq. 2-3): channel gate
    sigmoid(MLP(avg(x)) + MLP(max(x))), then spatial gate sigmoid(conv7x7([mean_c; max_c])) on the result.
    Written out with the blocks' own weights; the input's spikes keep each max apart from its mean."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 7)
    x[:, :, 1, 2] += 6.0

    def mlp(fc: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.einsum("hc,nc->nh", fc[0].weight[:, :, 0, 0], v) + fc[0].bias)
        return torch.einsum("ch,nh->nc", fc[2].weight[:, :, 0, 0], hidden) + fc[2].bias

    se, cbam = SqueezeExcite(32), CBAM(32)
    with torch.no_grad():
        expected_se = x * torch.sigmoid(mlp(se.fc, x.mean((2, 3))))[:, :, None, None]
        gated = x * torch.sigmoid(mlp(cbam.mlp, x.mean((2, 3))) + mlp(cbam.mlp, x.amax((2, 3))))[:, :, None, None]
        pooled = torch.stack([gated.mean(1), gated.amax(1)], dim=1)
        expected_cbam = gated * torch.sigmoid(nn.functional.conv2d(pooled, cbam.spatial.weight, cbam.spatial.bias,
                                                                   padding=3))
        torch.testing.assert_close(se(x), expected_se)
        torch.testing.assert_close(cbam(x), expected_cbam)


def test_gates_keep_values_bounded_by_input():
    # Every gate lies in (0, 1), so |out| <= |in| elementwise.
    x = torch.randn(2, 32, 6, 6)
    for name in ("ca", "se", "cbam"):
        y = make_attention(name, 32).eval()(x)
        assert (y.abs() <= x.abs() + 1e-6).all(), name
