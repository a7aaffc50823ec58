"""What every command line here shares: ``--help`` that shows each option's default,
``key=value`` overrides anywhere on the line, and the options that start a training run."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends an option's help with ``(default: X)``.

    Left out where the help text already says its default (a None default usually means
    "decided later", which only the text can explain) and for flags, which are off by default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        elif isinstance(default, Path):
            default = str(default)
        # argparse %-formats help strings: a literal % in a default must be doubled
        return f"{text} (default: {str(default).replace('%', '%%')})"


OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=.*", re.DOTALL)  # section.key=value; a path has a '/' first


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_intermixed_args``, with every ``section.key=value`` put into ``args.overrides``
    wherever it stands: after a flag, or after a list option (``--seeds 0 1 train.iters=5``), which
    would otherwise take it as one of its values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if OVERRIDE.fullmatch(a)]
    args = parser.parse_intermixed_args([a for a in argv if not OVERRIDE.fullmatch(a)])
    args.overrides = overrides + list(args.overrides or [])  # leftovers are not key=value: load_config names them
    return args


def add_start_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    """``--config``, ``--out``, ``--resume [auto]`` / ``--overwrite`` and ``key=value`` overrides: the
    command line of a training run (``train_seg.py``, ``seg.tools.pretrain``), read by
    :func:`seg.runs.start.plan_start`."""
    parser.add_argument("--config", type=Path, help=f"YAML experiment (default: {default_config}; with --resume: "
                        "the run's stored config.yaml, and a file given here is compared with it like overrides)")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", help="run directory (default: runs/<config>-<time>)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], metavar="auto",
                       help="continue the run in RUN_DIR from its last.pt and stored config.yaml; 'auto': "
                       "only if RUN_DIR holds a last.pt, else start afresh (the default under a torchrun restart)")
    start.add_argument("--overwrite", action="store_true", help="discard the run in RUN_DIR and start afresh "
                       "(default: off)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides such as optim.lr=0.02, anywhere on the line (default: none)")
