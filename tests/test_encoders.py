"""Encoder contract for every registered attention encoder: one base tester, one subclass each."""

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn

from numerics import with_measured_bn, zero_init
from seg.modeling.attention import ATTENTIONS
from seg.modeling.encoders import register as registry
from seg.tools.complexity import count_params

SIZE = 64


class EncoderTester:
    """Checks smp's encoder contract; subclasses set the name and how many cases to run."""

    name: str
    n_attention: int
    depths = (1, 2, 3, 4, 5)
    in_channels = (1, 3, 4)
    output_strides = (8, 16)
    # script/export/compile cost seconds each; a few subclasses cover every attention type
    check_export = False
    check_compile = False

    def build(self, **kwargs) -> nn.Module:
        return smp.encoders.get_encoder(self.name, **kwargs).eval()

    def build_for_shapes(self, **kwargs) -> nn.Module:
        """:meth:`build` with zero weights, for the tests of shapes and counts (see numerics.zero_init)."""
        with zero_init():
            return self.build(**kwargs)

    def forward(self, encoder: nn.Module, in_channels: int = 3) -> list[torch.Tensor]:
        with torch.no_grad():
            return encoder(torch.randn(1, in_channels, SIZE, SIZE))

    def test_features_have_stated_channels_and_strides(self):
        encoder = self.build_for_shapes()
        assert isinstance(encoder.out_channels, list)
        features = self.forward(encoder)
        assert len(features) == 6
        for i, (feature, channels) in enumerate(zip(features, encoder.out_channels)):
            assert feature.shape == (1, channels, SIZE >> i, SIZE >> i), f"feature {i}"

    def test_depth(self):
        for depth in self.depths:
            encoder = self.build_for_shapes(depth=depth)
            features = self.forward(encoder)
            assert len(features) == depth + 1 == len(encoder.out_channels), f"depth {depth}"
            assert features[-1].shape[1] == encoder.out_channels[-1]
            assert features[-1].shape[-1] == SIZE >> depth

    @pytest.mark.parametrize("depth", [0, 6])
    def test_bad_depth_raises(self, depth):
        with pytest.raises(ValueError, match="depth"):
            self.build_for_shapes(depth=depth)

    def test_output_stride_dilates(self):
        for stride in self.output_strides:
            encoder = self.build_for_shapes(output_stride=stride)
            assert encoder.output_stride == stride
            sizes = [f.shape[-1] for f in self.forward(encoder)]
            assert sizes == [SIZE // min(2**i, stride) for i in range(6)], f"OS {stride}"

    def test_in_channels(self):
        for in_channels in self.in_channels:
            encoder = self.build_for_shapes(in_channels=in_channels)
            features = self.forward(encoder, in_channels)
            assert features[0].shape[1] == in_channels == encoder.out_channels[0]
            assert features[-1].shape[1] == encoder.out_channels[-1]

    def test_attention_count(self):
        attention_cls = ATTENTIONS[self.name.rsplit("_", 1)[1]]
        modules = [m for m in self.build_for_shapes().modules() if type(m) is attention_cls]
        assert len(modules) == self.n_attention

    @pytest.mark.slow  # torch.export traces the whole encoder with dynamo (4 to 6 s each)
    @pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
    def test_script_and_export_match_eager(self):
        if not self.check_export:
            pytest.skip("covered by other encoders of the same family")
        encoder = with_measured_bn(self.build(), 2, 3, SIZE, SIZE)  # at init, MobileNetV2's deep features are ~0
        assert encoder._is_torch_scriptable and encoder._is_torch_exportable
        x = torch.randn(1, 3, SIZE, SIZE)
        with torch.no_grad():
            expected = encoder(x)
            outputs = [torch.jit.script(encoder)(x), torch.export.export(encoder, (x,)).module()(x)]
        for out in outputs:
            assert len(out) == len(expected)
            for got, want in zip(out, expected):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    @pytest.mark.slow  # dynamo traces the whole encoder
    def test_compiles_fullgraph(self):
        if not self.check_compile:
            pytest.skip("covered by other encoders of the same family")
        # Dynamo tracing is what breaks on unsupported Python; inductor codegen only costs time.
        encoder = with_measured_bn(self.build(), 2, 3, SIZE, SIZE)  # features that depend on the input
        assert encoder._is_torch_compilable
        x = torch.randn(1, 3, SIZE, SIZE)
        with torch.no_grad():
            expected = encoder(x)[-1]
            got = torch.compile(encoder, fullgraph=True, backend="eager")(x)[-1]
        torch.testing.assert_close(got, expected)


class TestMobileNetV2CA(EncoderTester):
    name = "mobilenet_v2_ca"
    n_attention = 16
    check_export = True
    check_compile = True

    def test_param_count_matches_official_backbone(self):
        # Official MobileNetV2-CA minus its 1000-class classifier (1,281,000 params).
        assert count_params(self.build()) == 2_669_648
        assert count_params(smp.encoders.get_encoder("mobilenet_v2")) == 2_223_872

    def test_block_layout_for_weight_mapping(self):
        features = self.build().features
        assert [type(m).__name__ for m in features[1].conv] == [
            "Conv2dNormActivation", "Conv2d", "BatchNorm2d"
        ]
        for i in range(2, 18):
            names = [type(m).__name__ for m in features[i].conv]
            assert names == [
                "Conv2dNormActivation", "Conv2dNormActivation", "CoordAttention", "Conv2d",
                "BatchNorm2d",
            ], f"features.{i}"
        assert "features.18.0.weight" in self.build().state_dict()


class TestMobileNetV2SE(EncoderTester):
    name = "mobilenet_v2_se"
    n_attention = 16


class TestMobileNetV2CBAM(EncoderTester):
    name = "mobilenet_v2_cbam"
    n_attention = 16
    check_export = True


class TestResNet50CA(EncoderTester):
    name = "resnet50_ca"
    n_attention = 16
    check_export = True
    check_compile = True

    def test_torchvision_keys_still_load(self):
        state = torchvision.models.resnet50().state_dict()
        result = self.build().load_state_dict(state, strict=False)
        assert not result.unexpected_keys  # the fc classifier is dropped...
        assert "fc.weight" in state  # ...without touching the caller's dict
        assert result.missing_keys and all(".attention." in k for k in result.missing_keys)


class TestResNet50SE(EncoderTester):
    name = "resnet50_se"
    n_attention = 16
    check_export = True


class TestResNet50CBAM(EncoderTester):
    name = "resnet50_cbam"
    n_attention = 16


class _ResNet101Tester(EncoderTester):
    # Same code path as ResNet-50 with more blocks: a few cases are enough.
    n_attention = 33
    depths = (5,)
    in_channels = (4,)
    output_strides = (8,)


class TestResNet101CA(_ResNet101Tester):
    name = "resnet101_ca"


class TestResNet101SE(_ResNet101Tester):
    name = "resnet101_se"


class TestResNet101CBAM(_ResNet101Tester):
    name = "resnet101_cbam"


def test_every_registered_name_is_tested():
    # only this file's testers: tests/test_attach.py subclasses EncoderTester for other encoders
    tested = {cls.name for cls in EncoderTester.__subclasses__() + _ResNet101Tester.__subclasses__()
              if hasattr(cls, "name") and cls.__module__ == __name__}
    assert tested == set(registry.ENCODER_NAMES)


def test_register_is_idempotent():
    before = dict(smp.encoders.encoders)
    registry.register()
    assert smp.encoders.encoders == before
    assert set(registry.ENCODER_NAMES) <= set(smp.encoders.get_encoder_names())


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(KeyError, match="mobilenet_v2_ca"):
        smp.encoders.get_encoder("mobilenet_v2_eca")
