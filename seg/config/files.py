"""Reading and writing run configurations: defaults, then one YAML file, then ``key=value`` overrides;
and the plain dicts stored in checkpoints, from this or an older version of the code.

A YAML file holds only what differs from the defaults (no ``_base_`` inheritance); overrides such
as ``optim.lr=0.02`` or ``model.encoder=mobilenet_v2_se`` are parsed as YAML (:func:`read_yaml`) and
checked against the field's type. Every user error raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, get_args

import yaml

from seg.config.coerce import Mismatch, coerce, type_name
from seg.config.schema import (CONFIG_VERSION, FIELD_TYPES, FROM_SCRATCH, MODEL_KEYS, SECTIONS, Config, ConfigError,
                               validate)
from seg.utils.atomic import write_atomic

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, ...]] = set()  # unknown stored keys already warned about


def _suggest(key: str) -> str:
    """Hint naming the nearest valid key(s) for an unknown dotted ``key``."""
    section, _, leaf = key.rpartition(".")
    if not section:  # a top-level name: a misspelt section, or a field put outside its section
        same_leaf = [k for k in FIELD_TYPES if k.endswith("." + leaf)]
        close = same_leaf or difflib.get_close_matches(leaf, list(SECTIONS), n=1)
        return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; sections are {list(SECTIONS)}"
    in_section = [k.split(".", 1)[1] for k in FIELD_TYPES if k.startswith(section + ".")]
    # the exact name in another section beats a near spelling in this one: train.crop_size -> data.crop_size
    close = [k for k in FIELD_TYPES if k.endswith("." + leaf)]
    close = close or [f"{section}.{c}" for c in difflib.get_close_matches(leaf, in_section, n=1)]
    close = close or difflib.get_close_matches(key, list(FIELD_TYPES), n=1)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; valid keys in '{section}': {in_section}"


def _check(key: str, value: Any, source: str) -> Any:
    tp = FIELD_TYPES[key]
    try:
        return coerce(value, tp)
    except Mismatch:
        raise ConfigError(
            f"{source}: '{key}' expects {type_name(tp)}, got {value!r} ({type(value).__name__})") from None


def _apply(cfg: Config, data: Any, source: str) -> None:
    """Merge a ``{section: {key: value}}`` mapping into ``cfg`` in place, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}, got {data!r}")
    for section, values in data.items():
        values = {} if values is None else values  # a section left empty in YAML, e.g. only comments
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown key '{section}'{_suggest(str(section))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a mapping of keys, got {values!r}")
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in FIELD_TYPES:
                raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
            value = _check(key, value, source)
            if key == "model.encoder_weights" and value is not None and value.strip().lower() in FROM_SCRATCH:
                value = None  # YAML reads `none` as a string; it plainly means "no weights"
            setattr(getattr(cfg, section), name, value)


class _DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(problem=f"key {key!r} appears twice (lines {first} and {again}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is refused: PyYAML keeps the
    last silently, so a setting edited near the top of a file would lose to a stale copy further down."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(key, lines[key], line)
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str) -> Any:
    """``text`` parsed as ``yaml.safe_load`` does, but refusing duplicate keys; one-line errors naming ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{source}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML: {e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None


def _parse_override(text: str) -> dict:
    """``a.b=value`` -> ``{"a": {"b": value}}``, with the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.02")
    value = read_yaml(raw, f"override {text!r}: value")
    # A string field keeps the text as typed: data.train_split=2012 means "2012", not the int 2012.
    accepts_str = key in FIELD_TYPES and str in (FIELD_TYPES[key], *get_args(FIELD_TYPES[key]))
    if accepts_str and value is not None and not isinstance(value, (str, list, dict)):
        value = raw.strip()
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None, overrides: list[str] = (), base: Config | None = None) -> Config:
    """Defaults (or ``base``, e.g. a run's stored config, changed in place), then the YAML file at
    ``path`` (if any), then ``key=value`` overrides; validated."""
    cfg = Config() if base is None else base
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config {path} is a folder; expected a YAML file (e.g. {path / 'config.yaml'})")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path.read_text(), str(path)) or {}
        if isinstance(data, dict) and "config_version" in data:  # a run's config.yaml, reused as an experiment
            data = dict(data)
            version = data.pop("config_version")
            if not isinstance(version, int) or version > CONFIG_VERSION:
                raise ConfigError(f"{path}: config_version {version!r} is not one this code reads "
                                  f"(it reads up to {CONFIG_VERSION})")
        _apply(cfg, data, str(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides to ``cfg`` in place, validate, and return it."""
    for text in overrides:
        _apply(cfg, _parse_override(text), f"override {text!r}")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists): safe for YAML, JSON and ``torch.load(weights_only=True)``."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {s: {k: plain(v) for k, v in values.items()} for s, values in asdict(cfg).items()}


def config_from_dict(d: dict, version: int = CONFIG_VERSION, source: str = "stored config") -> Config:
    """Inverse of :func:`config_to_dict`, for a config stored by this or another version of the code.

    Keys it lacks keep today's defaults; keys this code does not know (renamed or added since)
    are dropped with one warning. Only a missing key of :data:`MODEL_KEYS` is refused, because
    the stored weights could then be given the wrong model.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}, got {d!r}")
    if "config_version" in d:  # a config.yaml states its own version
        d = dict(d)
        version = d.pop("config_version")
    known, unknown = {}, []
    for section, values in d.items():
        if section not in SECTIONS or not isinstance(values, (dict, type(None))):
            unknown.append(str(section))
            continue
        known[section] = {k: v for k, v in (values or {}).items() if f"{section}.{k}" in FIELD_TYPES}
        unknown += [f"{section}.{k}" for k in (values or {}) if f"{section}.{k}" not in FIELD_TYPES]
    missing = [key for key in MODEL_KEYS if key.split(".")[1] not in known.get(key.split(".")[0], {})]
    if missing:
        raise ConfigError(f"{source} (config version {version}) lacks {', '.join(missing)}, which decide the "
                          f"model; pass the run's config file with --config")
    if unknown and tuple(unknown) not in _WARNED:
        _WARNED.add(tuple(unknown))  # resume and evaluation may read one checkpoint's config twice
        log.warning("%s (config version %s; this code reads version %d): ignoring keys it does not know: %s",
                    source, version, CONFIG_VERSION, ", ".join(unknown))
    cfg = Config()
    _apply(cfg, known, source)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML, atomically, with the ``config_version`` whose rules
    read it back (as a checkpoint stores it); :func:`load_config` reads it back unchanged."""
    stored = {"config_version": CONFIG_VERSION, **config_to_dict(cfg)}
    write_atomic(Path(path), yaml.safe_dump(stored, sort_keys=False).encode())
