"""The README and docs/ stay true: every command in them parses, every relative link resolves.

Commands are read from the ``bash`` blocks and from inline spans that start with a Python or
torchrun call. None of them runs: each entry point is started in this process with its command's
arguments and stopped as soon as argparse has read them, so an unknown or misspelt flag fails
here; ``key=value`` overrides go through ``seg.config.load_config`` with the command's
``--config``. Shell syntax is checked with ``bash -n``; Python blocks are compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from seg.config import load_config
from seg.config.cli import OVERRIDE

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHONS = {"python", "python3", ".venv/bin/python"}
RUN_PLACEHOLDER = "runs/demo-20260101-000000/"  # what RUN=$(ls -td runs/*/ | head -1) stands for


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _inline_commands(text: str) -> list[str]:
    spans = re.findall(r"(?<!`)`([^`]+)`(?!`)", text)
    spans = [" ".join(s.split()) for s in spans]
    commands = [s for s in spans if re.match(r"(\.venv/bin/)?(python3? (-m \S+|\S+\.py)( |$)|torchrun \S)", s)]
    # a bare `python -m seg.report` names a tool rather than a command line: it must answer --help
    return [c + " --help" if re.fullmatch(r"\S+ (-m )?\S+", c) else c for c in commands]


def _commands(doc: Path) -> list[str]:
    text = doc.read_text()
    lines = []
    for block in _blocks(text, "bash"):
        lines += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines + _inline_commands(text)


def _doc_ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing(argv0: str, args: list[str]):
    """Every ArgumentParser raises _Parsed with its result instead of returning it."""

    def stop(method):
        def parse(self, *a, **kw):
            raise _Parsed(method(self, *a, **kw))
        return parse

    methods = {name: stop(getattr(argparse.ArgumentParser, name)) for name in ("parse_args", "parse_intermixed_args")}
    with mock.patch.multiple(argparse.ArgumentParser, **methods), mock.patch.object(sys, "argv", [argv0, *args]), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported by another test
        yield


def _parse(entry: str, args: list[str]) -> argparse.Namespace:
    """Run ``entry`` (a script path or ``-m module``) as __main__ until its arguments are parsed."""
    err = io.StringIO()
    try:
        with _stop_after_parsing(entry, args), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if entry.endswith(".py"):
                runpy.run_path(str(ROOT / entry), run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        if e.code in (0, None):  # --help
            return argparse.Namespace()
        pytest.fail(f"{entry} {shlex.join(args)}: {err.getvalue().strip()}")
    pytest.fail(f"{entry} finished without parsing a command line; this test only knows argparse CLIs")


def _check_entry(entry: str, args: list[str]) -> None:
    overrides = [a for a in args if OVERRIDE.fullmatch(a)]
    namespace = _parse(entry, args)
    config = getattr(namespace, "config", None)
    if overrides or config:
        load_config(config, overrides)  # raises on an unknown key, a bad value or a missing file


def _check_pytest(args: list[str]) -> None:
    markers = re.findall(r"^\s+(\w+):", (ROOT / "pytest.ini").read_text(), flags=re.M)
    for flag, value in zip(args, args[1:] + [""]):
        if flag == "-m":  # a marker expression such as "not slow"
            for word in set(value.split()) - {"not", "and", "or"}:
                assert word in markers, f"pytest -m {value}: no marker {word} in pytest.ini"
    assert all((ROOT / a).exists() for a in args if not a.startswith("-") and "/" in a)


def _check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "venv"]:
        return
    if args[:2] == ["-m", "pytest"]:
        return _check_pytest(args[2:])
    if args[0] == "-c":
        return compile(args[1], "<-c>", "exec") and None
    if args[0] == "-m":
        return _check_entry(args[1], args[2:])
    assert (ROOT / args[0]).is_file(), f"no script {args[0]}"
    _check_entry(args[0], args[1:])


def _check_segment(tokens: list[str]) -> None:
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):  # leading environment variables (quoted: may hold spaces)
        tokens = tokens[1:]
    prog, args = tokens[0], tokens[1:]
    if prog in PYTHONS:
        _check_python(args)
    elif prog in ("torchrun", ".venv/bin/torchrun"):
        launch = torchrun_parser().parse_args(args)
        _check_entry(launch.training_script, launch.training_script_args)
    elif prog.endswith("bin/pip"):
        assert args[0] == "install"
        named = [a for a in args[1:] if not a.startswith("-") or a == "-r"]
        target = args[args.index("-r") + 1] if "-r" in args else named[-1]
        assert (ROOT / target / "pyproject.toml").is_file() if target == "." else (ROOT / target).is_file()
    elif prog.endswith("tensorboard"):
        assert args[0] == "--logdir"
        pytest.importorskip("tensorboard")
    else:
        pytest.fail(f"{prog}: a command this test does not know; teach _check_segment how to smoke-test it")


def _check_line(line: str, variables: dict[str, str]) -> None:
    assignment = re.fullmatch(r"([A-Z_]+)=\$\((.*)\)", line.strip())
    if assignment:
        variables[assignment[1]] = RUN_PLACEHOLDER
        return
    for name, value in variables.items():
        line = line.replace("${" + name + "}", value).replace("$" + name, value)
    tokens = shlex.split(line, comments=True)
    while tokens:
        cut = tokens.index("&&") if "&&" in tokens else len(tokens)
        _check_segment(tokens[:cut])
        tokens = tokens[cut + 1:]


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids(DOCS))
def test_every_command_parses(doc):
    commands = _commands(doc)
    for block in _blocks(doc.read_text(), "bash"):
        subprocess.run(["bash", "-n"], input=block, text=True, check=True)
    variables: dict[str, str] = {}
    for line in commands:
        _check_line(line, variables)


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids(DOCS))
def test_python_blocks_compile(doc):
    for i, block in enumerate(_blocks(doc.read_text(), "python")):
        compile(block, f"{doc.name} python block {i}", "exec")


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids(DOCS))
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{doc.name}: broken link {target}"
        if anchor:
            assert anchor in _anchors(resolved), f"{doc.name}: no heading #{anchor} in {resolved.name}"


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in readme  # the Quick-start test command is exactly CI's
    assert "```bash\npython3 -m venv --upgrade-deps .venv && .venv/bin/pip install -r requirements.txt && " \
           ".venv/bin/python train_seg.py\n```" in readme


def test_configs_readme_counts_and_names_every_file():
    text = (ROOT / "configs" / "README.md").read_text()
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert f"There are {len(files)} files" in text
    # camvid_{mobilenet_v2,_se,_cbam,_ca}.yaml names four files in one table cell
    listed = set(re.findall(r"`(\w+?)(?:\.yaml)?`", text)) | {"camvid_mobilenet_v2" + s for s in ("", "_se", "_cbam", "_ca")}
    assert [f.stem for f in files if f.stem not in listed] == []
