"""seg.inference.paths and seg.engine.graphs.ShapeGraphs: which implementation evaluation and
prediction run, and the per-shape graph cache (with a fake capture: a real one needs a GPU, see
test_graphs.py's CUDA tests)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numerics import with_measured_bn
from seg.engine.graphs import ShapeGraphs
from seg.inference import paths
from seg.inference.tta import predict_labels
from seg.kernels.fast import FastCoordAttention, FastExpandedConv
from seg.modeling.attention import CoordAttention
from seg.modeling.models import build_model


@pytest.mark.parametrize("fast, device, triton, ca, expected", [
    (False, "cuda", True, True, "reference"),
    (False, "cpu", True, True, "reference"),
    (True, "cpu", True, True, "lean"),
    (True, "cpu", False, False, "lean"),
    (True, "cuda", True, True, "fused+graphs"),
    (True, "cuda", False, True, "graphs"),  # no Triton: CA's reference layers, under graphs
    (True, "cuda", True, False, "graphs"),  # plain and SE have no CA to fuse
])
def test_path_choice(fast, device, triton, ca, expected):
    assert paths.choose_path(fast, device, triton, ca) == expected


def _ca_model(fused_ca: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = with_measured_bn(build_model("deeplabv3", "mobilenet_v2_ca", 3, output_stride=16, decoder_channels=16),
                             2, 3, 64, 96)
    if fused_ca:  # as a config with model.fused_ca=true builds it
        for block in model.modules():
            if isinstance(block, CoordAttention):
                block.__class__, block.fused = FastCoordAttention, True
    return model


def test_cpu_takes_the_lean_path_and_the_reference_is_the_papers_layers():
    lean, path = paths.prepare_inference(_ca_model(), torch.device("cpu"))
    assert path == "lean" and not lean.training
    assert sum(isinstance(m, FastExpandedConv) for m in lean.modules()) == 16
    # the reference undoes a config's fused_ca, and swaps in no fast class
    reference, path = paths.prepare_inference(_ca_model(fused_ca=True), torch.device("cpu"), fast=False)
    assert path == "reference"
    blocks = [m for m in reference.modules() if isinstance(m, CoordAttention)]
    assert len(blocks) == 16 and not any(getattr(b, "fused", False) for b in blocks)
    assert not any(isinstance(m, FastExpandedConv) for m in reference.modules())
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = reference(images)
        torch.testing.assert_close(lean(images), expected, atol=1e-4, rtol=1e-4)
    assert expected.std(dim=(2, 3)).min() > 0.01  # logits vary over the image, 100x the atol: every block counts


class FakeGraph:
    """Stands in for GraphedInference: runs the model, but into one output buffer that every call
    overwrites, as a replayed graph's static output is."""

    captures: list = []

    def __init__(self, model, images, amp):
        FakeGraph.captures.append((tuple(images.shape), amp))
        self.model, self.out = model, None

    def __call__(self, images):
        result = self.model(images)
        if self.out is None:
            self.out = result
        else:
            self.out.copy_(result)
        return self.out


@pytest.fixture
def graphs():
    FakeGraph.captures = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    return ShapeGraphs(model, max_graphs=2, capture=FakeGraph)


def test_a_shape_is_captured_the_second_time_it_comes(graphs):
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = graphs(a)
        assert FakeGraph.captures == []  # once: eager
        second = graphs(b)
        assert FakeGraph.captures == [((1, 3, 8, 8), "none")]
        third = graphs(a)
        assert len(FakeGraph.captures) == 1  # replayed, not captured again
    torch.testing.assert_close(third, first)
    # every result is the caller's own: the next replay does not overwrite the one before
    torch.testing.assert_close(second, graphs.model(b))


def test_least_recently_used_graphs_go_beyond_max_graphs(graphs):
    shapes = [(1, 3, 4, 4), (1, 3, 8, 4), (1, 3, 4, 8)]
    with torch.no_grad():
        for shape in shapes:
            graphs(torch.randn(shape))
            graphs(torch.randn(shape))
        assert len(FakeGraph.captures) == 3
        graphs(torch.randn(shapes[0]))  # dropped when the third came: seen again, captured again
    assert [c[0] for c in FakeGraph.captures] == [*shapes, shapes[0]]


def test_grad_training_and_autocast_are_kept_apart(graphs):
    x = torch.randn(1, 3, 4, 4)
    for _ in range(2):
        graphs(x)  # with grad: eager, never captured
    graphs.train()
    with torch.no_grad():
        graphs(x), graphs(x)
    assert FakeGraph.captures == []
    graphs.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        graphs(x), graphs(x)
    with torch.no_grad():
        graphs(x), graphs(x)
    assert FakeGraph.captures == [((1, 3, 4, 4), "bf16"), ((1, 3, 4, 4), "none")]


@pytest.mark.parametrize("size", [(37, 50), (64, 64), (33, 95)])
def test_graphs_see_the_stride_padded_shapes_and_predict_the_same(size):
    # What ShapeGraphs captures is what tta pads to (a multiple of the output stride), not a bucket:
    # the predictions through it equal the eager ones exactly.
    FakeGraph.captures = []
    model = _ca_model().eval()
    graphed = ShapeGraphs(model, capture=FakeGraph)
    images = torch.randn(2, 3, *size)
    eager = predict_labels(model, images, num_classes=3, output_stride=32)
    for _ in range(2):
        got = predict_labels(graphed, images, num_classes=3, output_stride=32)
        assert torch.equal(got, eager)
    padded = tuple(-(-s // 32) * 32 for s in size)
    assert FakeGraph.captures == [((2, 3, *padded), "none")]


def test_padding_to_a_coarser_bucket_would_change_predictions():
    # Why ShapeGraphs does not pad to a few size buckets: CA's strip means average over the
    # padding (as ASPP's image pooling does), so the output inside the image changes.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), CoordAttention(8), nn.Conv2d(8, 3, 1)).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        exact = model(image)
        bucketed = model(F.pad(image, (0, 32, 0, 64)))[..., :64, :96]
    assert (bucketed - exact).abs().max() > 1e-4  # 1e-3 here; rounding alone would be ~1e-7


def test_without_triton_a_fused_config_falls_back_to_the_lean_path(monkeypatch):
    monkeypatch.setattr(paths, "HAS_TRITON", False)
    model, path = paths.prepare_inference(_ca_model(fused_ca=True), torch.device("cpu"))
    assert path == "lean"
    assert not any(getattr(m, "fused", False) for m in model.modules() if isinstance(m, CoordAttention))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_training_mode_drops_the_graphs(graphs):
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        graphs(x), graphs(x)
        graphs.eval()  # what every predict() call does: the graphs stay
        graphs(x)
        assert len(FakeGraph.captures) == 1
        graphs.train()  # the weights are about to change: captured folds would be stale
        graphs.eval()
        graphs(x)
        assert len(FakeGraph.captures) == 1  # a shape starts over: once eagerly,
        graphs(x)
    assert len(FakeGraph.captures) == 2  # then captured again


def test_a_failed_capture_leaves_that_shape_eager(caplog):
    FakeGraph.captures = []

    def capture(model, images, amp):
        if images.shape[-1] == 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return FakeGraph(model, images, amp)

    model = nn.Conv2d(3, 2, 1).eval()
    graphs = ShapeGraphs(model, capture=capture).eval()
    big, small = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        results = [graphs(big) for _ in range(4)] + [graphs(small) for _ in range(3)]
    for got in results[:4]:
        torch.testing.assert_close(got, model(big))
    assert FakeGraph.captures == [((1, 3, 4, 4), "none")]  # the failing shape was tried once, then left eager
    assert [r.getMessage() for r in caplog.records] == ["CUDA graph capture for input (1, 3, 8, 8) failed, so it "
                                                         "runs eagerly: CUDA out of memory. Tried to allocate 2.00 GiB"]
