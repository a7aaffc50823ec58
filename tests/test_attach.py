"""seg.modeling.attach: placement counts, hand-counted parameters, SE replaced not stacked, stage choice,
smp's encoder contract, DeepLabV3 training, mobilenet_v2 + CA == mobilenet_v2_ca, timm weights."""

import logging

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from conftest import shared_path
from test_encoders import EncoderTester
from timm.layers import SEModule
from timm.models._efficientnet_blocks import SqueezeExcite as TimmEffSE

import train_seg
from seg import attach_attention
from seg.config import ConfigError, ModelConfig, load_config
from seg.errors import USER_ERRORS
from seg.modeling.attach import UnsupportedEncoderError
from seg.modeling.attention import ATTENTIONS, CoordAttention, SqueezeExcite
from seg.modeling.models import build_model, model_from_config
from seg.modeling.weights import load_encoder_weights
from seg.tools import bench_models
from seg.tools.complexity import count_params, timm_attention_table

SIZE = 64
# encoder: (blocks with a slot, of which timm built with an SE), counted from the architectures:
# EfficientNet-B0 repeats 1,2,2,3,3,4,1, all with SE; MobileNetV3-L has 1 DS + 14 IR blocks (its last
# stage is a plain 1x1 ConvBnAct), SE in the 8 blocks of its stride-8 stage and the last two IR stages;
# ResNet-50(-D) bottlenecks 3,4,6,3; RegNetY-800MF depths 1,3,8,2, all with SE; MobileNetV2's 16
# expanded blocks.
CASES = {
    "tu-mobilenetv3_large_100": (15, 8),
    "tu-efficientnet_b0": (16, 16),
    "tu-resnet50d": (16, 0),
    "tu-regnety_008": (14, 14),
    "mobilenet_v2": (16, 0),
    "resnet50": (16, 0),
}
TIMM_SE = (TimmEffSE, SEModule)
CA_TENSORS = 11  # conv1 w/b, bn1 w/b/mean/var/count, conv_h w/b, conv_w w/b


def _encoder(name: str, **kwargs) -> torch.nn.Module:
    return smp.encoders.get_encoder(name, weights=None, **kwargs)


def _count(module: torch.nn.Module, cls: type | tuple) -> int:
    return sum(isinstance(m, cls) for m in module.modules())


def _ca_params(c: int) -> int:
    """The paper's CoordAtt block on c channels, counted by hand: mip = max(8, c // 32)."""
    mip = max(8, c // 32)
    return (c * mip + mip) + 2 * mip + 2 * (mip * c + c)  # conv1, bn1, conv_h + conv_w


@pytest.mark.parametrize("name", CASES)
def test_one_block_per_slot_and_existing_se_replaced(name):
    encoder = _encoder(name)
    before = count_params(encoder)
    report = attach_attention(encoder, "ca")
    blocks, with_se = CASES[name]
    assert report.count == blocks == len(set(report.places)) == _count(encoder, CoordAttention)
    assert sum(p.replaced is not None for p in report.placements) == with_se
    assert _count(encoder, TIMM_SE) == 0  # replaced, not stacked
    assert count_params(encoder) - before == report.added_params == report.new_params - report.removed_params
    assert len(report.new_keys) == CA_TENSORS * blocks and set(report.new_keys) <= set(encoder.state_dict())
    with torch.no_grad():
        features = encoder.eval()(torch.randn(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in features] == encoder.out_channels


def test_added_params_match_a_hand_count_for_resnet_bottlenecks():
    encoder = _encoder("tu-resnet50d")
    before = count_params(encoder)
    report = attach_attention(encoder, "ca")
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # bottleneck outputs, before the residual add
    assert [p.channels for p in report.placements] == widths
    assert report.removed_params == 0
    assert count_params(encoder) - before == sum(_ca_params(c) for c in widths) == 1_917_832


def test_attaching_again_replaces_the_blocks_it_put():
    encoder = _encoder("tu-regnety_008")
    first = attach_attention(encoder, "se")
    params = count_params(encoder)
    second = attach_attention(encoder, "se")
    assert second.count == first.count and count_params(encoder) == params
    assert {p.replaced for p in second.placements} == {"SqueezeExcite"}
    assert _count(encoder, SqueezeExcite) == first.count and _count(encoder, TIMM_SE) == 0


@pytest.mark.parametrize("output_stride", [8, 32])
def test_stages_keep_the_deepest_ones_even_when_dilated(output_stride):
    encoder = _encoder("tu-efficientnet_b0", output_stride=output_stride)
    report = attach_attention(encoder, "ca", stages=2)
    # stride 16 holds timm stages 3 and 4 (3 + 3 blocks), stride 32 stages 5 and 6 (4 + 1)
    assert report.count == 11 and {p.stage for p in report.placements} == {4, 5}
    assert all(p.startswith(("model.blocks.3", "model.blocks.4", "model.blocks.5", "model.blocks.6"))
               for p in report.places)
    assert _count(encoder, TimmEffSE) == 5  # the shallow blocks keep their own SE


def test_stages_on_smp_resnet_and_bad_stages():
    encoder = _encoder("resnet50")
    report = attach_attention(encoder, "cbam", stages=1)
    assert report.places == ["layer4.0", "layer4.1", "layer4.2"]
    with pytest.raises(ValueError, match="stages"):
        attach_attention(_encoder("resnet50"), "ca", stages=0)


def test_none_strips_attention():
    encoder = _encoder("tu-efficientnet_b0")
    report = attach_attention(encoder, "none")
    assert report.new_params == 0 and report.removed_params > 0 and _count(encoder, TIMM_SE) == 0


def test_unsupported_encoder_is_refused_naming_it_and_its_blocks():
    encoder = _encoder("tu-convnext_atto")
    keys = list(encoder.state_dict())
    with pytest.raises(UnsupportedEncoderError, match=r"tu-convnext_atto.*ConvNeXtBlock") as err:
        attach_attention(encoder, "ca")
    assert isinstance(err.value, USER_ERRORS) and "\n" not in str(err.value)
    assert list(encoder.state_dict()) == keys


def test_unsupported_encoder_is_one_line_from_the_entry_point(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "run"), "model.encoder=tu-convnext_atto", "model.attention=ca",
            "data.root=" + str(tmp_path / "data"), "data.synthetic_train_images=2", "data.synthetic_val_images=1",
            "data.synthetic_image_size=32", "data.crop_size=32", "data.num_classes=5", "data.num_workers=0",
            "train.device=cpu"]
    handlers = logging.root.handlers[:]
    try:
        assert train_seg.main(argv) == 2
    finally:  # the entry point logs to the captured stderr, which closes after this test
        logging.root.handlers[:] = handlers
    err = capsys.readouterr().err
    assert "Traceback" not in err and "tu-convnext_atto" in err.strip().splitlines()[-1]  # after the log lines


def test_mobilenet_v2_with_ca_is_mobilenet_v2_ca():
    attached, named = _encoder("mobilenet_v2"), _encoder("mobilenet_v2_ca")
    attach_attention(attached, "ca")
    assert count_params(attached) == count_params(named) == 2_669_648
    assert {k: v.shape for k, v in attached.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}


def test_official_weights_load_into_mobilenet_v2_with_ca():
    path = shared_path("fixtures", "official_ca", "mbv2_ca_random_w1.0.pt")
    fixture = torch.load(path, weights_only=True)
    attached = _encoder("mobilenet_v2")
    attach_attention(attached, "ca")
    report = load_encoder_weights(attached, path)
    assert report.layout == "official" and report.missing == [] and report.unexpected == []
    with torch.no_grad():
        features = attached.eval()(fixture["x"])[-1]
    torch.testing.assert_close(features, fixture["features_1280"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, output_stride", [(n, 8 if i % 2 else 16) for i, n in enumerate(CASES)])
def test_deeplabv3_trains_a_few_steps(name, output_stride):
    model = build_model("deeplabv3", name, 3, output_stride=output_stride, attention="ca",
                        decoder_channels=32).train()
    assert model.encoder.output_stride == output_stride and model.attention_report.count == CASES[name][0]
    gates = [p for m in model.modules() if isinstance(m, CoordAttention) for p in m.parameters()]
    start = [p.detach().clone() for p in model.encoder.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.randint(0, 3, (2, SIZE, SIZE))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    # timm zero-initialises each ResNet block's last BN, so the blocks after it get ~0 gradient at
    # first (whether such a tensor moves at all is rounding): check that they are in the graph, and
    # that the loss reaches the stem, through every stage, with a real gradient
    assert all(p.grad is not None for p in gates)
    stem, stem_start = next(model.encoder.parameters()), start[0]
    assert stem.dim() == 4 and stem.shape[1] == 3  # the first conv, on the image
    assert (stem - stem_start).abs().max() > 1e-6


def test_timm_weights_load_without_attention_too(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("efficientnet_b0")
    path = tmp_path / "b0.pth"
    torch.save(source.state_dict(), path)
    model = model_from_config(ModelConfig(encoder="tu-efficientnet_b0", encoder_weights=str(path)), num_classes=3)
    state, src = model.encoder.model.state_dict(), source.state_dict()
    assert model.attention_report is None and set(state) <= set(src)
    assert all(torch.equal(state[k], src[k]) for k in state)


def test_timm_weights_load_through_timm_and_only_new_blocks_are_missing(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("efficientnet_b0")  # a classifier model, as timm releases them
    path = tmp_path / "b0.pth"
    torch.save(source.state_dict(), path)
    cfg = ModelConfig(encoder="tu-efficientnet_b0", encoder_weights=str(path), attention="ca")
    model = model_from_config(cfg, num_classes=3)
    state, src = model.encoder.model.state_dict(), source.state_dict()
    new = {k.removeprefix("model.") for k in model.attention_report.new_keys}
    removed = {k.removeprefix("model.") for k in model.attention_report.removed_keys}
    assert new == set(state) - set(src)
    assert removed and removed <= set(src) and not removed & set(state)
    assert all(torch.equal(state[k], src[k]) for k in set(state) & set(src))


def test_config_keys_reach_the_model():
    cfg = ModelConfig(encoder="resnet50", attention="se", attention_stages=2, decoder_channels=32)
    report = model_from_config(cfg, num_classes=3).attention_report
    assert report.count == 6 + 3 and {p.stage for p in report.placements} == {4, 5}
    assert model_from_config(ModelConfig(encoder="resnet50", decoder_channels=32), 3).attention_report is None


@pytest.mark.parametrize("overrides, message", [
    (["model.attention=eca"], "model.attention"),
    (["model.attention_stages=2"], "needs model.attention"),
    (["model.attention=ca", "model.attention_stages=0"], "model.attention_stages"),
])
def test_bad_attention_config_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["model.attention=none"]).model.attention == "none"  # the word, not YAML null


def test_timm_table_counts_agree_with_the_report():
    table = timm_attention_table(("tu-regnety_008",), num_classes=3, size=SIZE).splitlines()
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in table[2:]}
    assert list(rows) == ["as built", "none", "se", "cbam", "ca"]
    base = float(rows["none"][3])
    for kind in ("se", "cbam", "ca"):
        blocks, new_params, _, encoder_m = rows[kind][:4]
        assert blocks == "14"
        assert float(encoder_m) == pytest.approx(base + int(new_params.replace(",", "")) / 1e6, abs=1.5e-3)


def test_bench_times_timm_variants_with_attention_attached():
    setup = bench_models.BenchSetup(batch=2, size=SIZE, repeats=1, warmup=0, flops_size=SIZE)
    rows = bench_models.bench_group("tu-efficientnet_b0", 16, setup, mode="eager")
    assert [(r["variant"], r["encoder_name"], r["attention"]) for r in rows] == [
        (name, "tu-efficientnet_b0", v.attention) for name, v in bench_models.VARIANTS.items()]
    assert all(r["train_ms"] > 0 and r["gflops"] > 0 for r in rows)
    plain = bench_models.build_variant("tu-efficientnet_b0", 16, "none")
    assert rows[0]["params"] == count_params(plain) and _count(plain, TIMM_SE) == 0


class _AttachedTester(EncoderTester):
    """smp's contract on encoders with attention attached; a few cases each keep it fast."""

    kind = "ca"
    depths = (2, 5)
    in_channels = (1, 4)

    def build(self, **kwargs) -> torch.nn.Module:
        encoder = smp.encoders.get_encoder(self.name, **kwargs)
        attach_attention(encoder, self.kind)
        return encoder.eval()

    def test_attention_count(self):
        assert _count(self.build_for_shapes(), ATTENTIONS[self.kind]) == CASES[self.name][0]


class TestAttachedMobileNetV3(_AttachedTester):
    name = "tu-mobilenetv3_large_100"


class TestAttachedEfficientNetB0(_AttachedTester):
    name = "tu-efficientnet_b0"
    kind = "cbam"
    check_export = True


class TestAttachedResNet50D(_AttachedTester):
    name = "tu-resnet50d"
    kind = "se"


class TestAttachedRegNetY(_AttachedTester):
    name = "tu-regnety_008"


class TestAttachedMobileNetV2(_AttachedTester):  # export/compile: same modules as mobilenet_v2_ca's
    name = "mobilenet_v2"


class TestAttachedResNet50(_AttachedTester):
    name = "resnet50"
