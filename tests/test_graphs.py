"""CUDA graphs (train.cuda_graphs, seg.engine.graphs) and compile modes: refusals on CPU, equality on a GPU."""

import pytest
import torch

from numerics import with_measured_bn
import train_seg
from seg.config import ConfigError, load_config
from seg.kernels.fast import use_fused
from seg.modeling.models import build_model

TINY = ["data.synthetic_train_images=4", "data.synthetic_val_images=2", "data.synthetic_image_size=64",
        "data.crop_size=64", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "train.iters=2",
        "train.eval_interval=2", "train.log_interval=1", "train.vis_images=0", "train.ca_maps=false",
        "optim.warmup_iters=0", "model.decoder_channels=32"]


@pytest.mark.parametrize("overrides, message", [
    (["train.cuda_graphs=true", "train.device=cpu"], "train.cuda_graphs needs a CUDA device, but train.device=cpu"),
    (["train.cuda_graphs=true", "train.compile=true"], "exclude each other"),
    (["train.compile_mode=reduce-overhead"], "train.compile_mode=reduce-overhead needs train.compile=true"),
])
def test_config_refuses_what_cannot_apply(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_on_a_cpu_machine_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--out", str(out), f"data.root={tmp_path / 'data'}", *TINY, "train.device=auto", "train.cuda_graphs=true"]
    assert train_seg.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: train.cuda_graphs needs a CUDA device; this run trains on cpu"
    assert not (out / "last.pt").exists() and not (out / "config.yaml").exists()


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: modes.append(mode) or model)
    argv = ["--out", str(tmp_path / "run"), f"data.root={tmp_path / 'data'}", *TINY, "train.device=cpu",
            "train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs"]
    assert train_seg.main(argv) == 0
    assert modes == ["max-autotune-no-cudagraphs"]


def _train_steps(model, graphed: bool, steps: int = 3):
    from seg.engine.loop import TrainState, train_step
    from seg.engine.graphs import graph_training

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 64, 64, generator=gen).cuda(), torch.randint(0, 5, (4, 64, 64), generator=gen).cuda())
               for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / 10)
    step_model = graph_training(model, batches[0][0]) if graphed else model
    state = TrainState(step_model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False))
    torch.manual_seed(0)  # the same dropout draws for both runs
    losses = [train_step(state, x, y, amp="none", aux_weight=0.0, grad_clip=None).item() for x, y in batches]
    return losses, model, optimizer


def _max_diffs(a, b) -> dict[str, float]:
    """Largest |a - b| per tensor: losses, weights and BN buffers, gradients, momentum."""
    (losses_a, model_a, opt_a), (losses_b, model_b, opt_b) = a, b
    diffs = {"loss": max(abs(x - y) for x, y in zip(losses_a, losses_b))}
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        diffs[name] = (x.float() - y.float()).abs().max().item()
    for (name, x), y in zip(model_a.named_parameters(), model_b.parameters()):
        diffs[f"grad {name}"] = (x.grad - y.grad).abs().max().item()
    for i, (x, y) in enumerate(zip(opt_a.state.values(), opt_b.state.values())):
        diffs[f"momentum {i}"] = (x["momentum_buffer"] - y["momentum_buffer"]).abs().max().item()
    return diffs


@pytest.mark.cuda
@pytest.mark.parametrize("encoder, fused", [("mobilenet_v2", False), ("mobilenet_v2_ca", False),
                                            ("mobilenet_v2_ca", True)])
def test_graphed_steps_equal_eager_steps(encoder, fused):
    """Graphed vs eager, against eager vs eager: some CUDA backward kernels (atomics) differ run to run,
    so the graphs may differ from eager by as much as eager differs from itself, and not much more.
    Dropout is off: a graph draws its masks from the graph RNG stream, not the eager one."""
    runs = []
    for graphed in (False, False, True):
        torch.manual_seed(0)
        model = build_model("deeplabv3", encoder, 5, decoder_channels=32).cuda()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        use_fused(model, fused)
        runs.append(_train_steps(model, graphed))
    control, graph = _max_diffs(runs[0], runs[1]), _max_diffs(runs[0], runs[2])
    worse = {k: (graph[k], control[k]) for k in graph if graph[k] > 4 * control[k] + 1e-5}
    assert not worse, f"graphed differs from eager more than eager from itself: {worse}"


@pytest.mark.cuda
def test_graphed_inference_equals_eager_and_takes_new_inputs():
    from seg.engine.graphs import GraphedInference

    torch.manual_seed(0)
    # measured BN statistics: at the init ones the logits are the same for any input, and a graph that
    # kept reading its first input would pass
    model = with_measured_bn(build_model("deeplabv3", "mobilenet_v2_ca", 5, decoder_channels=32), 2, 3, 64, 64)
    model = model.cuda()
    first, second = torch.randn(2, 2, 3, 64, 64, device="cuda")
    graphed = GraphedInference(model, first)
    with torch.no_grad():
        assert (model(first) - model(second)).abs().max() > 0.03  # 0.32 on the CPU
        for x in (second, first):
            expected = model(x)
            torch.testing.assert_close(graphed(x).clone(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.cuda
def test_training_with_cuda_graphs_runs_and_validates(tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), f"data.root={tmp_path / 'data'}", *TINY, "train.device=cuda", "train.cuda_graphs=true",
            "train.amp=bf16", "train.channels_last=true"]
    assert train_seg.main(argv) == 0
    assert (out / "best.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("amp, tolerance", [("none", 1e-3), ("bf16", 1e-2)])
def test_eval_and_predict_take_the_fast_path_and_predict_as_the_reference(tmp_path, amp, tolerance):
    """train_seg -> eval_seg on CUDA: the default path is recorded as fused+graphs (Triton present)
    and predicts what the reference predicts, but for pixels whose top two classes tie within the
    paths' rounding (a wrong kernel disagrees on most pixels). The 1e-4 mIoU goal is for trained
    models: the report measures it."""
    import json

    import cv2
    import numpy as np

    import eval_seg
    from seg.inference.predictor import Predictor

    out = tmp_path / "run"
    argv = ["--out", str(out), f"data.root={tmp_path / 'data'}", *TINY, "train.device=cuda", "train.iters=20",
            "train.eval_interval=20", "data.synthetic_val_images=6"]
    assert train_seg.main(argv) == 0
    paths, masks = {}, {}
    for fast in ("true", "false"):
        report, saved = tmp_path / f"eval_{fast}.json", tmp_path / f"masks_{fast}"
        assert eval_seg.main(["--checkpoint", str(out / "best.pt"), "--json", str(report), "--save-dir", str(saved),
                              f"eval.fast={fast}", f"eval.amp={amp}"]) == 0
        paths[fast] = json.loads(report.read_text())["inference_path"]
        masks[fast] = np.stack([cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in sorted(saved.glob("*[0-9].png"))])
    assert paths == {"true": "fused+graphs", "false": "reference"}
    assert masks["true"].shape == masks["false"].shape and masks["true"].shape[0] == 6
    assert (masks["true"] != masks["false"]).mean() <= tolerance
    assert Predictor.from_checkpoint(out / "best.pt", device="cuda").inference_path == "fused+graphs"


@pytest.mark.cuda
def test_shape_graphs_replay_equals_eager_for_new_inputs_and_sizes():
    from seg.engine.graphs import ShapeGraphs
    from seg.inference.paths import prepare_inference

    torch.manual_seed(0)
    model = build_model("deeplabv3", "mobilenet_v2_ca", 5, decoder_channels=32)
    graphed, path = prepare_inference(model, torch.device("cuda"))
    assert path == "fused+graphs" and isinstance(graphed, ShapeGraphs)
    with torch.no_grad():
        for shape in [(2, 3, 64, 96), (2, 3, 64, 96), (1, 3, 96, 64), (2, 3, 64, 96), (1, 3, 96, 64)]:
            x = torch.randn(shape, device="cuda")
            torch.testing.assert_close(graphed(x), graphed.model(x), rtol=1e-4, atol=1e-5)
    assert len(graphed._graphs) == 2


@pytest.mark.cuda
def test_graph_outlives_the_folds_that_eval_drops():
    """A graph captured with the projection prologue reads BN folded into the weights, cached outside
    its pool; eval() drops the module's cache, so the graph must keep the tensors alive itself."""
    from seg.engine.graphs import GraphedInference
    from seg.kernels.fast import optimize_for_inference

    torch.manual_seed(0)
    model = optimize_for_inference(build_model("deeplabv3", "mobilenet_v2_ca", 5, decoder_channels=32).cuda().eval())
    use_fused(model, True)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 96, device="cuda")
    graphed = GraphedInference(model, x)
    with torch.no_grad():
        expected = model(x).clone()
        for _ in range(3):
            model.eval()  # drops every fold cache
            churn = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]  # reuse freed blocks
            torch.testing.assert_close(graphed(x), expected, rtol=1e-4, atol=1e-5)
            del churn
