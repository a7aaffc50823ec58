"""Checkpoint loading: the official MobileNetV2-CA layout, torchvision layouts, reports and errors."""

import math
import re
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from numerics import with_measured_bn
import seg  # noqa: F401  (registers our encoders in smp)
from seg.modeling import weights
from seg.modeling.weights import load_encoder_weights, resolve_weights
from tests.conftest import shared_path

FIXTURE_DIR = ("fixtures", "official_ca")
OFFICIAL_TENSORS = 490
OFFICIAL_HEAD = ["classifier.1.weight", "classifier.1.bias"]
SENTINEL = 7.0


def _encoder(name: str, **kwargs) -> nn.Module:
    return smp.encoders.get_encoder(name, weights=None, **kwargs)


def _save(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path


def _tv_key_in_attention_encoder(key: str) -> str:
    """Where a torchvision MobileNetV2 key lives in our encoders: expanded blocks (2..17)
    push the pw-linear conv and its BN one slot on, past the attention at conv.2."""
    m = re.fullmatch(r"features\.(\d+)\.conv\.([23])\.(.+)", key)
    if m and int(m.group(1)) >= 2:
        return f"features.{m.group(1)}.conv.{int(m.group(2)) + 1}.{m.group(3)}"
    return key


def _attention_modules(encoder: nn.Module) -> dict[str, nn.Module]:
    if hasattr(encoder, "layer1"):
        return {n: m for n, m in encoder.named_modules() if n.endswith(".attention")}
    # only blocks with a fifth layer have an attention slot; elsewhere conv.2 is a projection or BN
    return {f"features.{i}.conv.2": block.conv[2] for i, block in enumerate(encoder.features)
            if hasattr(block, "conv") and len(block.conv) == 5}


def _fill_attention(encoder: nn.Module) -> None:
    with torch.no_grad():
        for module in _attention_modules(encoder).values():
            for tensor in module.state_dict(keep_vars=True).values():
                if tensor.is_floating_point():
                    tensor.fill_(SENTINEL)


def _assert_official_init(module: nn.Module) -> None:
    """Kaiming-normal fan_out convs with zero bias, BN (1, 0) with fresh statistics."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.bias is not None:
                assert torch.all(m.bias == 0), name
            if m.weight.numel() >= 1000:  # enough samples for the std to be telling
                fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
                assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15), name
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1), name
        elif isinstance(m, nn.Linear):
            assert m.weight.std().item() == pytest.approx(0.01, rel=0.3), name
    for tensor in module.state_dict().values():
        assert not torch.any(tensor == SENTINEL)


@pytest.fixture(scope="module")
def tv_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    # measured BN statistics: at the init ones its last features are below 1e-8, inside any atol
    return with_measured_bn(torchvision.models.mobilenet_v2(weights=None), 2, 3, 64, 64)


@pytest.fixture(scope="module")
def tv_resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def test_official_fixture_reproduces_reference_features():
    path = shared_path(*FIXTURE_DIR, "mbv2_ca_random_w1.0.pt")
    fixture = torch.load(path, weights_only=True)
    encoder = _encoder("mobilenet_v2_ca")
    report = load_encoder_weights(encoder, path)  # the fixture nests its weights under "state_dict"
    assert report.layout == "official"
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert sorted(report.dropped) == sorted(OFFICIAL_HEAD)
    assert len(report.loaded) == OFFICIAL_TENSORS - len(OFFICIAL_HEAD) == len(encoder.state_dict())
    with torch.no_grad():
        features = encoder.eval()(fixture["x"])[-1]  # x is 64x96, so swapped h/w convs would show
    torch.testing.assert_close(features, fixture["features_1280"], atol=1e-4, rtol=0)


def test_official_key_list_agrees_with_fixture_and_maps_fully(tmp_path):
    lines = shared_path(*FIXTURE_DIR, "mbv2_ca_keys_w1.0.txt").read_text().splitlines()
    listed = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            listed[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    state = torch.load(shared_path(*FIXTURE_DIR, "mbv2_ca_random_w1.0.pt"), weights_only=True)["state_dict"]
    assert len(listed) == OFFICIAL_TENSORS
    assert {k: tuple(v.shape) for k, v in state.items()} == listed
    path = _save({k: torch.zeros(s) for k, s in listed.items()}, tmp_path / "mbv2_ca.pth")
    report = load_encoder_weights(_encoder("mobilenet_v2_ca"), path)
    assert len(report.loaded) == OFFICIAL_TENSORS - len(OFFICIAL_HEAD)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []


def test_official_into_plain_encoder_leaves_out_only_the_attention(tmp_path):
    state = torch.load(shared_path(*FIXTURE_DIR, "mbv2_ca_random_w1.0.pt"), weights_only=True)["state_dict"]
    encoder = _encoder("mobilenet_v2")
    report = load_encoder_weights(encoder, _save(state, tmp_path / "mbv2_ca.pth"))
    assert report.missing == [] and report.mismatched == []
    assert report.unexpected and all(re.fullmatch(r"features\.\d+\.conv\.6\..+", k) for k in report.unexpected)
    assert torch.equal(encoder.state_dict()["features.2.conv.2.weight"], state["features.2.conv.7.weight"])
    assert torch.equal(encoder.state_dict()["features.18.1.running_var"], state["conv.1.running_var"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v2_ca", "mobilenet_v2_se"])
def test_torchvision_mobilenet_v2_loads(tv_mobilenet, tmp_path, name, suffix):
    source = tv_mobilenet.state_dict()
    path = _save(source, tmp_path / f"mobilenet_v2{suffix}")
    encoder = _encoder(name)
    _fill_attention(encoder)
    report = load_encoder_weights(encoder, path)
    loaded = encoder.state_dict()
    key_of = (lambda k: k) if name == "mobilenet_v2" else _tv_key_in_attention_encoder
    for key, tensor in source.items():
        if not key.startswith("classifier."):
            assert torch.equal(loaded[key_of(key)], tensor), key
    attention = _attention_modules(encoder)
    assert len(attention) == (0 if name == "mobilenet_v2" else 16)
    assert sorted(report.missing) == sorted(
        f"{prefix}.{k}" for prefix, m in attention.items() for k in m.state_dict())
    assert report.unexpected == [] and report.mismatched == []
    assert sorted(report.dropped) == ["classifier.1.bias", "classifier.1.weight"]
    for module in attention.values():
        _assert_official_init(module)


def test_plain_encoder_reproduces_torchvision_features(tv_mobilenet, tmp_path):
    encoder = _encoder("mobilenet_v2")
    load_encoder_weights(encoder, _save(tv_mobilenet.state_dict(), tmp_path / "mbv2.pth"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv_mobilenet.features(x)
        assert expected.std() > 0.1  # features that carry the image, so a wrong layer shows
        torch.testing.assert_close(encoder.eval()(x)[-1], expected)


@pytest.mark.parametrize("name, suffix", [("resnet50_ca", ".pth"), ("resnet50", ".safetensors")])
def test_torchvision_resnet50_loads(tv_resnet50, tmp_path, name, suffix):
    source = tv_resnet50.state_dict()
    encoder = _encoder(name)
    _fill_attention(encoder)
    report = load_encoder_weights(encoder, _save(source, tmp_path / f"resnet50{suffix}"))
    loaded = encoder.state_dict()
    for key, tensor in source.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], tensor), key
    attention = _attention_modules(encoder)
    assert len(attention) == (0 if name == "resnet50" else 16)
    assert sorted(report.missing) == sorted(
        f"{prefix}.{k}" for prefix, m in attention.items() for k in m.state_dict())
    assert report.layout == "resnet" and report.unexpected == [] and report.mismatched == []
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    for module in attention.values():
        _assert_official_init(module)


def test_wrong_file_raises_naming_it(tv_mobilenet, tmp_path):
    torch.manual_seed(0)
    resnet = _save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    encoder = _encoder("mobilenet_v2_ca")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(ValueError, match="resnet18.pth"):
        load_encoder_weights(encoder, resnet)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # untouched
    mobilenet = _save(tv_mobilenet.state_dict(), tmp_path / "mbv2.pth")
    with pytest.raises(ValueError, match="mbv2.pth"):
        load_encoder_weights(_encoder("resnet50_se"), mobilenet)


def test_shape_mismatch_is_reported_not_skipped(tv_mobilenet, tmp_path):
    encoder = _encoder("mobilenet_v2", in_channels=1)
    stem = encoder.state_dict()["features.0.0.weight"].clone()
    report = load_encoder_weights(encoder, _save(tv_mobilenet.state_dict(), tmp_path / "mbv2.pth"))
    assert report.mismatched == [("features.0.0.weight", (32, 3, 3, 3), (32, 1, 3, 3))]
    assert "features.0.0.weight" not in report.missing and "1 shape-mismatched" in report.summary
    assert torch.equal(encoder.state_dict()["features.0.0.weight"], stem)


def test_our_attention_layout_round_trips(tmp_path):
    source = _encoder("mobilenet_v2_cbam")
    path = _save(source.state_dict(), tmp_path / "mbv2_cbam.safetensors")
    same = _encoder("mobilenet_v2_cbam")
    report = load_encoder_weights(same, path)
    assert report.layout == "attention" and report.missing == [] and report.unexpected == []
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in source.state_dict().items())
    plain = load_encoder_weights(_encoder("mobilenet_v2"), path)
    assert plain.missing == [] and plain.unexpected  # attention has no place in the plain encoder
    assert all(re.fullmatch(r"features\.\d+\.conv\.2\..+", k) for k in plain.unexpected)


def test_containers_and_ddp_prefix_are_unwrapped(tv_mobilenet, tmp_path):
    wrapped = {"epoch": 3, "model": {f"module.{k}": v for k, v in tv_mobilenet.state_dict().items()}}
    report = load_encoder_weights(_encoder("mobilenet_v2"), _save(wrapped, tmp_path / "ckpt.pt"))
    assert report.layout == "torchvision" and report.missing == [] and report.unexpected == []


def test_missing_and_empty_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_encoder_weights(_encoder("mobilenet_v2"), tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="empty.pth"):
        load_encoder_weights(_encoder("mobilenet_v2"), _save({"note": "no tensors"}, tmp_path / "empty.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_encoder_weights(_encoder("mobilenet_v2"), garbage)


def test_resolve_weights_local_paths(tmp_path):
    path = _save({"w": torch.zeros(1)}, tmp_path / "w.pth")
    assert resolve_weights(str(path)) == path
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        resolve_weights(tmp_path / "absent.pth")


def test_resolve_weights_reuses_cache_and_downloads_only_when_absent(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        Path(dst).write_bytes(b"x")

    monkeypatch.setattr(weights.torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(weights.torch.hub, "download_url_to_file", fake_download)
    cached = tmp_path / "checkpoints" / "mbv2_ca.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"cached")
    assert resolve_weights("https://example.invalid/files/mbv2_ca.pth") == cached
    assert calls == [] and cached.read_bytes() == b"cached"
    fresh = resolve_weights("http://example.invalid/files/other.pth?dl=1")
    assert fresh == tmp_path / "checkpoints" / "other.pth" and fresh.is_file()
    assert calls == ["http://example.invalid/files/other.pth?dl=1"]
