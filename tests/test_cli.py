"""The command lines: key=value overrides anywhere, one-line errors for bad encoder names, and a
--help that says how each tool is invoked and what each option does and defaults to."""

import argparse
import importlib
import importlib.util
from pathlib import Path

import pytest

import eval_seg
import train_seg
from seg.tools import ablation, bench
from tests.test_rundir import one_error_line, run_args

REPO = Path(__file__).resolve().parents[1]


def test_overrides_may_follow_flags():
    args = train_seg.parse_args(["--out", "RUN", "optim.lr=0.01", "--resume", "train.iters=9"])
    assert args.resume and args.out == Path("RUN") and args.overrides == ["optim.lr=0.01", "train.iters=9"]


def test_overrides_after_list_options_are_not_taken_as_their_values():
    args = eval_seg.parse_args(["--checkpoint", "c.pt", "--scales", "0.5", "1", "eval.flip=true", "--amp", "bf16"])
    assert args.scales == [0.5, 1.0] and args.overrides == ["eval.flip=true"] and args.amp == "bf16"
    args = ablation.parse_args(["--configs", "a.yaml", "b.yaml", "train.iters=5", "--seeds", "0", "data.root=x"])
    assert args.configs == [Path("a.yaml"), Path("b.yaml")] and args.seeds == [0]
    assert args.overrides == ["train.iters=5", "data.root=x"]


@pytest.mark.parametrize("encoder, expected", [
    ("mobilenet_v2_xx", "unknown encoder 'mobilenet_v2_xx'; did you mean 'mobilenet_v2'"),
    ("tu-foo_bar", "unknown timm model in encoder 'tu-foo_bar'"),
    ("tu-vit_tiny_patch16_224", "'tu-vit_tiny_patch16_224' cannot serve as the encoder of deeplabv3 "
                                "(Unsupported model downsampling pattern.)"),
])
def test_a_bad_encoder_name_is_one_line(encoder, expected, tiny_synthetic, tmp_path, capsys):
    argv = ["--out", str(tmp_path / "run"), *run_args(tiny_synthetic, f"model.encoder={encoder}")]
    assert train_seg.main(argv) == 2
    line = one_error_line(capsys)
    assert expected in line
    assert line.count("', '") <= 4  # at most five names


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# prog -> the function that parses its command line
CLIS = {
    "python train_seg.py": lambda: train_seg.main,
    "python eval_seg.py": lambda: eval_seg.main,
    "python -m seg.tools.bench": lambda: bench.main,
    "python -m seg.tools.ablation": lambda: ablation.main,
    "python -m seg.tools.report": lambda: importlib.import_module("seg.tools.report").main,
    "python -m seg.tools.complexity": lambda: importlib.import_module("seg.tools.complexity").main,
    "python -m seg.export": lambda: importlib.import_module("seg.export.onnx").main,
    **{f"python datasets/{name}.py": (lambda name=name: _script(name).main) for name in (
        "check_dataset", "make_synthetic", "prepare_cityscapes", "prepare_voc_aug")},
}


class Parsed(Exception):
    """Raised in place of parsing, carrying the parser that was about to parse."""


@pytest.mark.parametrize("prog", list(CLIS))
def test_help_names_the_invocation_and_every_option_and_default(prog, monkeypatch, capsys):
    def catch(parser, *args, **kwargs):
        raise Parsed(parser)

    main = CLIS[prog]()
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(Parsed) as caught:
        main(["--help"])
    parser = caught.value.args[0]
    assert parser.format_usage().startswith(f"usage: {prog} ")
    formatter = parser.formatter_class(prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # hidden options are for the tool's own child processes
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{prog}: {name} has no help text"
        flag = action.nargs == 0 and action.default is False  # store_true: off unless given
        if not (flag or action.required or "(required)" in action.help):
            assert "default" in formatter._get_help_string(action), f"{prog}: {name} does not say its default"
