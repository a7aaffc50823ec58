"""Encoder pretraining (seg.tools.pretrain): the identity warm start, the classifier, the run, and
its encoder.pth loading into segmentation with nothing missing. Tiny synthetic sets, CPU."""

import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from numerics import assert_close_at_scale, with_measured_bn
from seg.config import load_config
from seg.engine import trainer
from seg.engine.pretrainer import ENCODER_FILE, build_classifier
from seg.modeling.attention import CBAM, CoordAttention, SqueezeExcite
from seg.modeling.models import model_from_config
from seg.modeling.warm_start import identity_warm_start
from seg.modeling.weights import load_encoder_weights
from seg.runs.checkpoint import load_checkpoint
from seg.tools import pretrain

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml"))
MOBILENETS = ["mobilenet_v2", "mobilenet_v2_ca", "mobilenet_v2_se", "mobilenet_v2_cbam"]
ATTENTION = (CoordAttention, SqueezeExcite, CBAM)


def tiny(root: Path, iters: int = 4) -> list[str]:
    return [f"data.root={root}", "data.crop_size=32", "data.batch_size=4", "data.val_batch_size=8",
            "data.num_workers=0", "data.synthetic_train_images=16", "data.synthetic_val_images=8",
            "data.synthetic_image_size=32", f"train.iters={iters}", f"train.eval_interval={iters // 2}",
            "train.log_interval=1", "optim.warmup_iters=1", "train.threads=1"]


def plain_checkpoint(path: Path, encoder: str, num_classes: int = 10) -> torch.nn.Module:
    """A plain network in the torchvision layout (MobileNetV2 features + classifier.1, or ResNet + fc) with
    measured BN statistics, saved to ``path``; returns it in eval mode. Near init statistics MobileNetV2's
    last features hardly depend on the input (4e-7 between two), and attention placed or gated wrongly
    there would hide in the atol."""
    plain = with_measured_bn(smp.encoders.get_encoder(encoder, weights=None), 2, 3, 64, 64)
    head = "classifier.1" if encoder.startswith("mobilenet") else "fc"
    state = {**plain.state_dict(), f"{head}.weight": torch.randn(num_classes, plain.out_channels[-1]) * 0.01,
             f"{head}.bias": torch.randn(num_classes)}
    torch.save(state, path)
    return plain.eval(), state[f"{head}.weight"], state[f"{head}.bias"]


@pytest.mark.parametrize("encoder", ["mobilenet_v2_ca", "mobilenet_v2_se", "mobilenet_v2_cbam", "resnet50_ca"])
def test_warm_start_computes_the_plain_network_and_every_attention_parameter_learns(encoder, tmp_path):
    base = encoder.rsplit("_", 1)[0]
    plain, weight, bias = plain_checkpoint(tmp_path / "plain.pth", base)
    cfg = load_config(None, [f"model.encoder={encoder}", "data.num_classes=10", f"pretrain.warm_start={tmp_path / 'plain.pth'}"])
    model = build_classifier(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = [f for f in plain(x)]
        got = model.encoder(x)
        for level, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"feature {level}")
        logits = torch.nn.functional.linear(want[-1].mean(dim=(2, 3)), weight, bias)
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-4)
    # the gates are constant, not absent: a few steps move every attention parameter, by a real
    # gradient (1e-5 and more), not by rounding noise. CA's conv1 bias is left out: the BN right after
    # it subtracts the batch mean, so its gradient is 0 but for noise.
    blocks = [m for m in model.modules() if isinstance(m, ATTENTION)]
    assert blocks and all(m.training is False for m in blocks)
    cancelled = {id(b.conv1.bias) for b in blocks if isinstance(b, CoordAttention)}
    params = {n: p for n, p in model.named_parameters()
              if id(p) not in cancelled and any(p is q for b in blocks for q in b.parameters())}
    start = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        optimizer.step()
    unmoved = [n for n, p in params.items() if (p - start[n]).abs().max() < 1e-6]
    assert not unmoved, unmoved


@pytest.mark.parametrize("encoder", ["mobilenet_v2_ca", "mobilenet_v2_se", "mobilenet_v2_cbam", "resnet50_cbam"])
def test_identity_warm_start_holds_at_any_gate_bias(encoder, tmp_path):
    # At the default bias 0 every gate is 0.5 and CBAM's two gates (sigmoid(2b), sigmoid(b)) are equal,
    # so a wrong fold factor could pass there; at 1.5 they are 0.95 and 0.82.
    plain, _, _ = plain_checkpoint(tmp_path / "plain.pth", encoder.rsplit("_", 1)[0])
    model = smp.encoders.get_encoder(encoder, weights=None)
    load_encoder_weights(model, tmp_path / "plain.pth")
    assert identity_warm_start(model, bias=1.5) == 16  # expanded MobileNetV2 blocks, or ResNet-50 bottlenecks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for level, (got, want) in enumerate(zip(model.eval()(x), plain(x))):
            assert_close_at_scale(got, want, name=f"feature {level}")


def test_warm_start_refuses_an_encoder_without_attention():
    encoder = smp.encoders.get_encoder("mobilenet_v2", weights=None)
    with pytest.raises(ValueError, match="no attention block"):
        identity_warm_start(encoder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny pretraining run per MobileNetV2 variant, through the real command line."""
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for encoder in MOBILENETS:
        out[encoder] = root / encoder
        assert pretrain.main(["--out", str(out[encoder]), *tiny(root / "data"), f"model.encoder={encoder}"]) == 0
    return out


@pytest.mark.parametrize("encoder", MOBILENETS)
def test_encoder_pth_loads_into_segmentation_with_nothing_missing(encoder, runs):
    cfg = load_config(None, [f"model.encoder={encoder}", "data.num_classes=5"])
    model = model_from_config(cfg.model, 5)
    report = load_encoder_weights(model.encoder, runs[encoder] / ENCODER_FILE)
    assert (report.missing, report.unexpected, report.mismatched, report.fraction) == ([], [], [], 1.0)
    best = load_checkpoint(runs[encoder] / "best.pt")["model"]
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, best[f"encoder.{key}"]), key


def test_the_run_records_top1_and_top5_and_keeps_the_run_directory(runs):
    run = runs["mobilenet_v2_ca"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4]
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in records)
    assert load_checkpoint(run / "last.pt")["best_miou"] == max(r["top1"] for r in records)
    assert {"last.pt", "best.pt", "config.yaml", "train.log", ENCODER_FILE} <= {p.name for p in run.iterdir()}


def test_resume_continues_exactly(tmp_path):
    """Stopped right after iteration 2's checkpoint, then --resume: the same weights as a straight run."""
    argv = tiny(tmp_path / "data")
    assert pretrain.main(["--out", str(tmp_path / "straight"), *argv]) == 0

    class Stop(Exception):
        pass

    real = trainer.save_state

    def save_then_stop(path, state, cfg, record=None):
        real(path, state, cfg, record)
        if state.iteration == 2 and path.name == "last.pt":
            raise Stop

    trainer.save_state = save_then_stop
    try:
        with pytest.raises(Stop):
            pretrain.main(["--out", str(tmp_path / "stopped"), *argv])
    finally:
        trainer.save_state = real
    assert pretrain.main(["--out", str(tmp_path / "stopped"), "--resume", *argv]) == 0
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "stopped"))
    assert a["iteration"] == b["iteration"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == (tmp_path / "stopped" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_pretrain_config_starts(path, tmp_path):
    """Each shipped pretraining file trains one step and validates with its own encoder, optimiser and
    schedule, on the synthetic set at a 32 crop (no ImageNet, no weights on disk)."""
    shipped = load_config(path, [])
    overrides = ["data.name=synthetic_classes", "data.num_classes=4", *tiny(tmp_path / "data", iters=2),
                 "train.amp=none", "train.device=cpu", "pretrain.warm_start=null"]
    assert pretrain.main(["--config", str(path), "--out", str(tmp_path / "run"), *overrides]) == 0
    stored = load_config(tmp_path / "run" / "config.yaml", [])
    assert (stored.model, stored.optim.name, stored.optim.schedule, stored.optim.lr) == (
        shipped.model, shipped.optim.name, shipped.optim.schedule, shipped.optim.lr)


def test_a_segmentation_set_is_refused_in_one_line(tmp_path, capsys):
    assert pretrain.main(["--out", str(tmp_path / "run"), "data.name=voc", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.name=voc is a segmentation set") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_file_gone_bad_after_a_checkpoint_says_how_to_resume_and_that_works(tmp_path, capsys, monkeypatch):
    from seg.data import DatasetError
    from seg.engine import pretrainer

    argv, run, real, validations = tiny(tmp_path / "data"), tmp_path / "run", pretrainer.evaluate_topk, []

    def evaluate_topk(*args, **kwargs):  # the second validation meets a val image that went bad
        validations.append(1)
        if len(validations) == 2:
            raise DatasetError(f"cannot read image {tmp_path / 'x.jpg'}: not an image file")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrainer, "evaluate_topk", evaluate_topk)
    assert pretrain.main(["--out", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot read image") and err.endswith(
        f"; once the data is fixed, --resume --out {run} continues from {run / 'last.pt'}")
    monkeypatch.setattr(pretrainer, "evaluate_topk", real)
    assert pretrain.main(["--resume", "--out", str(run)]) == 0
    assert [json.loads(r)["iter"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]


@pytest.mark.slow  # a system test of the tool: five training runs
def test_transfer_tool_pretrains_once_and_fine_tunes_both_starts_per_seed(tmp_path, capsys):
    """The mechanics of seg.tools.transfer (its figure is quoted from a real run, not asserted here:
    a few random steps decide nothing)."""
    from seg.tools import transfer

    out = tmp_path / "transfer"
    argv = ["--out", str(out), "--smoke", "--seeds", "0", "1"]  # --smoke's 2 iterations each
    assert transfer.main(argv) == 0
    result = json.loads((out / "transfer.json").read_text())
    assert [r["seed"] for r in result["rows"]] == [0, 1] and (result["pretrain_iters"], result["seg_iters"]) == (2, 2)
    for row in result["rows"]:
        assert row["margin"] == pytest.approx(row["pretrained"] - row["scratch"])
        stored = load_config(out / "pretrained" / f"seed{row['seed']}" / "config.yaml", [])
        assert stored.model.encoder_weights == str(out / "pretrain" / ENCODER_FILE) and stored.train.seed == row["seed"]
        assert load_config(out / "scratch" / f"seed{row['seed']}" / "config.yaml", []).model.encoder_weights is None
    assert "| 1 |" in capsys.readouterr().out
    lasts = sorted(out.glob("*/**/last.pt"))
    stamps = [p.stat().st_mtime_ns for p in lasts]
    assert len(lasts) == 5 and transfer.main(argv) == 0  # finished runs resume at their end: nothing retrained
    assert [p.stat().st_mtime_ns for p in lasts] == stamps


def test_bench_times_a_pretraining_step_and_the_loader(tmp_path, capsys):
    from seg.tools import bench

    out = tmp_path / "pretrain.json"
    assert bench.main(["--scope", "pretrain", "--device", "cpu", "--batch", "2", "--size", "32", "--repeats", "1",
                       "--warmup", "0", "--workers", "0", "--loader-images", "4", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["model"] for r in record["rows"]] == ["plain", "plain A/A", "CA"]
    assert record["rows"][0]["ratio"] == 1.0 and all(r["img_s"] > 0 for r in record["rows"])
    assert record["loader"]["images"] == 4 and record["epochs"] == 200
    text = capsys.readouterr().out
    assert "200 epochs, model-bound (h)" in text and "loader-bound" in text
