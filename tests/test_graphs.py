"""CUDA graphs (train.cuda_graphs, seg.graphs) and compile modes: refusals on CPU, equality on a GPU."""

import pytest
import torch

import train_seg
from seg.config import ConfigError, load_config
from seg.models import build_model, set_fused_ca

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
    from seg.engine import TrainState, train_step
    from seg.graphs import graph_training

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


@pytest.mark.cuda
@pytest.mark.parametrize("encoder, fused", [("mobilenet_v2", False), ("mobilenet_v2_ca", False),
                                            ("mobilenet_v2_ca", True)])
def test_graphed_steps_equal_eager_steps(encoder, fused):
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model("deeplabv3", encoder, 5, decoder_channels=32).cuda()
        set_fused_ca(model, fused)
        results.append(_train_steps(model, graphed))
    (eager_losses, eager, eager_opt), (graph_losses, graph, graph_opt) = results
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), graph.state_dict().values()):  # weights and BN buffers
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(eager.named_parameters(), graph.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=f"grad {name}")
    for a, b in zip(eager_opt.state.values(), graph_opt.state.values()):
        torch.testing.assert_close(b["momentum_buffer"], a["momentum_buffer"], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_graphed_inference_equals_eager_and_takes_new_inputs():
    from seg.graphs import GraphedInference

    torch.manual_seed(0)
    model = build_model("deeplabv3", "mobilenet_v2_ca", 5, decoder_channels=32).cuda().eval()
    first, second = torch.randn(2, 2, 3, 64, 64, device="cuda")
    graphed = GraphedInference(model, first)
    with torch.no_grad():
        for x in (second, first):
            torch.testing.assert_close(graphed(x).clone(), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_training_with_cuda_graphs_runs_and_validates(tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), f"data.root={tmp_path / 'data'}", *TINY, "train.device=cuda", "train.cuda_graphs=true",
            "train.amp=bf16", "train.channels_last=true"]
    assert train_seg.main(argv) == 0
    assert (out / "best.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 1
