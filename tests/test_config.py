"""Config schema, YAML loading, overrides, error messages and the shipped configs."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import seg.config
from seg.config import Config, ConfigError, config_from_dict, config_to_dict, eval_window, load_config, save_config
from seg.engine.optim import DEFAULT_WEIGHT_DECAY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
ENCODERS = ("mobilenet_v2", "mobilenet_v2_se", "mobilenet_v2_cbam", "mobilenet_v2_ca")
FROM_SCRATCH = ("demo", "camvid_cpu", "camvid_gpu", "synthetic_efficientnet_b0_ca")  # recipes without a pretrained encoder


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_no_file_no_overrides_gives_the_defaults():
    assert load_config(None, []) == Config()


def test_yaml_then_overrides_in_that_order(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n  name: adamw\nmodel:\n  encoder: mobilenet_v2_se\n")
    cfg = load_config(path, ["optim.lr=0.02", "model.output_stride=8"])
    assert cfg.optim.lr == 0.02 and cfg.optim.name == "adamw"
    assert cfg.model.encoder == "mobilenet_v2_se" and cfg.model.output_stride == 8
    assert cfg.optim.momentum == Config().optim.momentum  # untouched keys keep defaults


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n"), []) == Config()
    assert load_config(write(tmp_path, "optim:\n  # lr: 0.1\n"), []) == Config()


@pytest.mark.parametrize("override, key, expected", [
    ("optim.lr=1", "optim.lr", 1.0),  # int accepted for float
    ("optim.grad_clip=null", "optim.grad_clip", None),
    ("optim.grad_clip=5", "optim.grad_clip", 5.0),
    ("model.encoder_weights=local/w.pth", "model.encoder_weights", "local/w.pth"),
    ("model.atrous_rates=[12, 24, 36]", "model.atrous_rates", (12, 24, 36)),
    ("eval.scales=[0.75, 1, 1.25]", "eval.scales", (0.75, 1.0, 1.25)),
    ("data.train_split=2012", "data.train_split", "2012"),  # a str field keeps the typed text
    ("train.amp=bf16", "train.amp", "bf16"),
    ("data.hflip=false", "data.hflip", False),
])
def test_overrides_are_parsed_and_coerced(override, key, expected):
    section, name = key.split(".")
    value = getattr(getattr(load_config(None, [override]), section), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, fragments", [
    ("optim.lr=fast", ["optim.lr", "float", "'fast'"]),
    ("data.hflip=1", ["data.hflip", "bool", "1"]),
    ("data.crop_size=96.5", ["data.crop_size", "int", "96.5"]),
    ("train.amp=fp32", ["train.amp", "'none', 'bf16', 'fp16'", "'fp32'"]),
    ("model.output_stride=32", ["model.output_stride", "8, 16", "32"]),
    ("model.atrous_rates=[6, 12]", ["model.atrous_rates", "list of 3 int", "[6, 12]"]),
    ("eval.scales=[1, x]", ["eval.scales", "list of float", "'x'"]),
    ("train.iters=null", ["train.iters", "int", "None"]),
])
def test_type_errors_name_key_expected_type_and_value(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("override, suggestion", [
    ("optim.lrr=0.1", "'optim.lr'"),
    ("optimizer.lr=0.1", "'optim'"),
    ("lr=0.1", "'optim.lr'"),  # a field outside its section
    ("train.crop_size=64", "'data.crop_size' or 'eval.crop_size'"),
    ("model.encoderr=x", "'model.encoder'"),
])
def test_unknown_override_key_names_the_nearest_valid_key(override, suggestion):
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(None, [override])
    assert f"did you mean {suggestion}?" in str(err.value)


def test_unknown_yaml_key_names_file_and_nearest_key(tmp_path):
    path = write(tmp_path, "data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert str(path) in str(err.value) and "'data.batch_sise'" in str(err.value)
    assert "did you mean 'data.batch_size'?" in str(err.value)


def test_unknown_key_without_close_match_lists_the_section_keys():
    with pytest.raises(ConfigError, match=r"valid keys in 'eval': \['mode', 'crop_size'"):
        load_config(None, ["eval.qqqqqq=1"])


@pytest.mark.parametrize("text, match", [
    ("optim: 0.1\n", "'optim' must be a mapping"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
    ("optim: [\n", "not valid YAML"),
])
def test_malformed_yaml_is_a_config_error(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), [])


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(missing, [])
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("override", ["optim.lr", "=3", "optim.lr=[1,"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, match", [
    (["data.scale_range=[2.0, 0.5]"], "data.scale_range"),
    (["data.batch_size=0"], "data.batch_size"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["eval.scales=[]"], "eval.scales"),
    (["eval.mode=slide", "eval.crop_size=64", "eval.stride=96"], "eval.stride"),
    (["eval.mode=slide", "data.crop_size=64", "eval.stride=96"], "eval.stride"),  # against the default window
    (["train.threads=0"], "train.threads"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["train.iters=10", "optim.warmup_iters=20"], "warmup_iters"),
])
def test_value_rules(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_save_then_load_round_trip(tmp_path):
    cfg = load_config(None, ["model.atrous_rates=[12,24,36]", "eval.scales=[0.5,1.0]", "optim.grad_clip=1"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml", []) == cfg


def test_dict_round_trip_is_plain_and_survives_weights_only_load(tmp_path):
    cfg = load_config(None, ["eval.scales=[0.5,1.0]", "train.amp=fp16"])
    d = config_to_dict(cfg)
    json.dumps(d)  # plain types only
    assert d["model"]["atrous_rates"] == [6, 12, 18]
    torch.save({"config": d}, tmp_path / "c.pt")
    stored = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert config_from_dict(stored) == cfg


def test_config_from_dict_keeps_defaults_for_absent_keys_and_warns_about_unknown_ones(caplog):
    stored = config_to_dict(Config())
    del stored["optim"]["poly_power"]
    stored["optim"]["lrr"] = 0.5
    with caplog.at_level("WARNING", logger="seg.config"):
        assert config_from_dict(stored, version=7) == Config()
    assert "optim.lrr" in caplog.text and "config version 7" in caplog.text
    with pytest.raises(ConfigError, match="stored config.*'optim.lr' expects float"):
        config_from_dict({**stored, "optim": {"lr": "fast"}})


@pytest.mark.parametrize("key", seg.config.MODEL_KEYS)
def test_config_from_dict_refuses_a_stored_config_without_a_model_key(key):
    stored = config_to_dict(Config())
    section, name = key.split(".")
    del stored[section][name]
    with pytest.raises(ConfigError, match=f"lacks {key}, which decide the model"):
        config_from_dict(stored)


def test_all_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    expected = {"demo", "camvid_cpu", "camvid_gpu", "synthetic_efficientnet_b0_ca"} | {f"{prefix}_{e}" for e in ENCODERS
                           for prefix in ("voc_os16", "voc_os8", "cityscapes_os8", "camvid")}
    assert names == expected


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_lists_only_known_differences(path):
    cfg = load_config(path, [])
    raw = yaml.safe_load(path.read_text())
    defaults = config_to_dict(Config())
    for section, values in raw.items():
        for key, value in values.items():
            if f"{section}.{key}" in ("model.encoder", "data.num_workers"):
                continue  # a per-encoder file names its encoder; the workers' default depends on the machine
            assert value != defaults[section][key], f"{path.name}: {section}.{key} repeats the default"
    if path.stem not in FROM_SCRATCH:
        encoder = path.stem.split("_", 2)[-1] if path.stem.startswith(("voc", "cityscapes")) else path.stem[7:]
        assert cfg.model.encoder == encoder, f"{path.name} trains {cfg.model.encoder}"
        assert cfg.model.encoder_weights, f"{path.name}: the paper recipes need a pretrained encoder"


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.startswith(("voc", "cityscapes"))],
                         ids=lambda p: p.name)
def test_paper_configs_resolve_to_the_paper_recipe(path):
    cfg = load_config(path, [])
    os_ = int(path.stem.split("_")[1][2:])
    assert cfg.model.output_stride == os_
    assert cfg.model.atrous_rates == {16: (6, 12, 18), 8: (12, 24, 36)}[os_]
    assert cfg.model.arch == "deeplabv3" and cfg.model.aspp_separable and cfg.model.decoder_channels == 256
    weight_decay = DEFAULT_WEIGHT_DECAY["sgd"] if cfg.optim.weight_decay is None else cfg.optim.weight_decay
    assert (cfg.optim.name, cfg.optim.momentum, weight_decay, cfg.optim.poly_power) == ("sgd", 0.9, 4e-5, 0.9)
    assert cfg.eval.mode == "whole" and cfg.eval.scales == (1.0,) and not cfg.eval.flip  # single scale
    if cfg.data.name == "voc":
        assert (cfg.data.train_split, cfg.data.num_classes, cfg.data.crop_size) == ("train_aug", 21, 512)
        assert (cfg.data.batch_size, cfg.train.iters) == (16, 30000)
    else:
        assert (cfg.data.name, cfg.data.num_classes, cfg.data.crop_size) == ("cityscapes", 19, 768)


@pytest.mark.parametrize("spelling", ["none", "None", "null", "''", "NONE"])
def test_encoder_weights_none_means_from_scratch(spelling, tmp_path):
    assert load_config(None, [f"model.encoder_weights={spelling}"]).model.encoder_weights is None
    path = write(tmp_path, f"model:\n  encoder_weights: {spelling}\n")
    assert load_config(path, []).model.encoder_weights is None


def test_slide_mode_alone_defaults_to_the_training_crop():
    cfg = load_config(None, ["eval.mode=slide", "data.crop_size=96"])
    assert eval_window(cfg) == {"crop_size": 96, "stride": None}  # None: predict's 2/3 of the window
    assert eval_window(load_config(None, ["eval.mode=slide", "eval.crop_size=64", "eval.stride=32"])) == \
        {"crop_size": 64, "stride": 32}
    assert eval_window(load_config(None, ["eval.crop_size=64"])) == {"crop_size": None, "stride": None}  # whole


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 2), (16, 4)])
def test_num_workers_default_fits_the_machine(cpus, expected, monkeypatch):
    monkeypatch.setattr(seg.config.schema, "available_cpus", lambda: cpus)  # where the default is computed
    assert Config().data.num_workers == expected
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3  # an explicit value stands


def test_available_cpus_is_the_affinity_mask():
    import os
    assert seg.config.available_cpus() == len(os.sched_getaffinity(0))


def test_momentum_with_adamw_warns_and_weight_decay_default_depends_on_optimiser(caplog):
    with caplog.at_level("WARNING", logger="seg.config"):
        load_config(None, ["optim.name=adamw"])
    assert not caplog.records  # the untouched default is no cause for a warning
    with caplog.at_level("WARNING", logger="seg.config"):
        load_config(None, ["optim.name=adamw", "optim.momentum=0.5"])
    assert "optim.momentum" in caplog.text and "adamw" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="seg.config"):
        load_config(None, ["optim.momentum=0.5"])  # SGD uses it
    assert not caplog.records
