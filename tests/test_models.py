"""build_model on every architecture, output strides, the aux head, errors, and the counters."""

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn
from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPPSeparableConv

from seg.modeling.models import ARCHS, SegModel, build_model
from seg.tools.complexity import count_flops, count_flops_on_meta, count_params

CLASSES = 5
SIZE = 64
CASES = [(arch, enc) for arch in ARCHS for enc in ("mobilenet_v2_ca", "resnet50_ca", "resnet101_ca")]
CASES += [("deeplabv3", "mobilenet_v2_se"), ("deeplabv3plus", "mobilenet_v2_cbam"), ("fpn", "resnet50_se")]


@pytest.mark.parametrize("arch, encoder", CASES)
def test_forward_backward(arch, encoder):
    model = build_model(arch, encoder, CLASSES).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    logits = model(x)
    assert logits.shape == (2, CLASSES, SIZE, SIZE)
    logits.mean().backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ["deeplabv3", "deeplabv3plus"])
@pytest.mark.parametrize("stride", [8, 16])
def test_deeplab_output_stride(arch, stride):
    model = build_model(arch, "mobilenet_v2_ca", CLASSES, output_stride=stride).eval()
    assert model.encoder.output_stride == stride
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 3, SIZE, SIZE))
        assert features[-1].shape[-1] == SIZE // stride
        assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, CLASSES, SIZE, SIZE)


def test_deeplab_decoder_options_reach_smp():
    model = build_model(
        "deeplabv3", "mobilenet_v2_ca", CLASSES,
        decoder_atrous_rates=(6, 12, 18), aspp_separable=True, decoder_channels=64,
    )
    branches = [m for m in model.decoder.modules() if isinstance(m, ASPPSeparableConv)]
    assert [b[0][0].dilation for b in branches] == [(6, 6), (12, 12), (18, 18)]
    assert model.decoder.conv.out_channels == 64


def test_aux_head_in_train_mode_only():
    model = build_model("deeplabv3", "resnet50_ca", CLASSES, aux_loss=True).train()
    assert model.aux_head[0].in_channels == 1024  # stride-16 features of ResNet
    x = torch.randn(2, 3, SIZE, SIZE)
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, CLASSES, SIZE, SIZE)
    (logits.mean() + aux.mean()).backward()
    assert model.aux_head[0].weight.grad is not None
    with torch.no_grad():
        assert model.eval()(x).shape == (2, CLASSES, SIZE, SIZE)


def test_no_aux_returns_plain_logits_in_train_mode():
    model = build_model("unet", "mobilenet_v2_ca", CLASSES).train()
    assert model.aux_head is None
    assert isinstance(model(torch.randn(2, 3, SIZE, SIZE)), torch.Tensor)


def test_state_dict_keys_match_smp_model():
    ours = build_model("deeplabv3plus", "mobilenet_v2_ca", CLASSES, aux_loss=True)
    theirs = smp.create_model(
        "deeplabv3plus", encoder_name="mobilenet_v2_ca", encoder_weights=None, classes=CLASSES,
        encoder_output_stride=16, decoder_aspp_separable=False,
    )
    ours_keys = {k for k in ours.state_dict() if not k.startswith("aux_head.")}
    assert ours_keys == set(theirs.state_dict())
    assert isinstance(ours, SegModel)


def test_in_channels():
    model = build_model("fpn", "mobilenet_v2_ca", CLASSES, in_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, SIZE, SIZE)).shape == (1, CLASSES, SIZE, SIZE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "pspnet"}, r"unknown arch 'pspnet'.*'deeplabv3'"),
        ({"encoder": "mobilenet_v2_eca"}, r"unknown encoder 'mobilenet_v2_eca'.*'mobilenet_v2_ca'"),
        ({"encoder_weights": "imagenet"}, r"encoder_weights must be None"),
        ({"output_stride": 32}, r"output_stride must be 8 or 16"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = {"arch": "deeplabv3", "encoder": "mobilenet_v2_ca", "num_classes": CLASSES}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_model(args.pop("arch"), args.pop("encoder"), args.pop("num_classes"), **args)


def test_count_params_and_flops_of_a_conv():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert count_params(conv) == 8 * 3 * 9 + 8
    macs = 8 * 3 * 9 * 16 * 16
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * macs


def test_count_flops_restores_train_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    count_flops(model, (1, 3, 8, 8))
    assert model.training


def test_meta_count_equals_the_cpu_count_and_leaves_the_model_as_it_was():
    from numerics import ca_with_bn_stats

    block = ca_with_bn_stats(16)  # eval, with the fast path whose folds are cached between calls
    x = torch.randn(2, 16, 12, 9)
    before, state = block(x), {k: v.clone() for k, v in block.state_dict().items()}
    assert count_flops_on_meta(block, x.shape) == count_flops(block, x.shape) > 0
    assert not block.training and all(t.device.type == "cpu" for t in block.state_dict().values())
    torch.testing.assert_close(block.state_dict(), state, rtol=0, atol=0)
    torch.testing.assert_close(block(x), before, rtol=0, atol=0)  # no fold of the meta tensors is reused


def test_missing_encoder_weights_say_how_to_train_from_scratch(tmp_path):
    from seg.config import load_config
    from seg.modeling.models import model_from_config

    missing = tmp_path / "mbv2_ca.pth"
    cfg = load_config(None, [f"model.encoder_weights={missing}", "model.decoder_channels=16"])
    with pytest.raises(FileNotFoundError) as err:
        model_from_config(cfg.model, CLASSES)
    assert str(missing) in str(err.value) and "model.encoder_weights=none" in str(err.value)
    # and that spelling builds a randomly initialised model
    cfg = load_config(None, ["model.encoder_weights=none", "model.decoder_channels=16"])
    assert isinstance(model_from_config(cfg.model, CLASSES), SegModel)
