"""smp's hub API (``model.save_pretrained(dir)``, ``smp.from_pretrained(dir)``) for our models.

smp rebuilds a saved model from the class name and constructor arguments in ``config.json``. That
is not enough for ours: :func:`seg.modeling.models.build_model` returns a ``SegModel`` that smp does not
know, and :func:`seg.attach_attention` changes an smp model after construction. ``import seg``
(which calls :func:`install`) makes ``save_pretrained`` also write a ``"_seg"`` entry (the
``build_model`` arguments, or the attention that was attached), and makes ``smp.from_pretrained``
read it (:func:`from_pretrained`). Models saved without that entry load as smp loads them.

Without ``import seg``, smp fails on these directories with, for a ``build_model`` model,
``AttributeError: module 'segmentation_models_pytorch' has no attribute 'SegModel'``; for our
encoders (``mobilenet_v2_ca``...) ``KeyError: "Wrong encoder name `mobilenet_v2_ca`, supported
encoders: [...]"``; for attention attached to an smp encoder, a "Mismatched keys" warning, then
``RuntimeError: Error(s) in loading state_dict for Unet: Missing key(s) in state_dict: ...``.
The fix for each is ``import seg`` first, or ``seg.from_pretrained(dir)``.

A local folder's ``config.json`` is checked before anything is built (valid JSON, ``_model_class``
an smp model, ``"_seg"`` arguments of the right names and types), so a damaged or hand-edited
file fails with one :class:`HubError` naming the file and key, not a TypeError from deep inside.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
import warnings
from pathlib import Path
from typing import Any, Callable

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base.hub_mixin import SMPHubMixin
from torch import nn

from seg.config.coerce import Mismatch, coerce, type_name
from seg.errors import UserError

SEG_KEY = "_seg"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class HubError(UserError, ValueError):
    """A saved-model folder whose config.json or weights do not describe a model we can rebuild."""


def _record(model: nn.Module) -> dict:
    """The ``"_seg"`` entry for ``model``: empty for a plain smp model."""
    recipe = getattr(model, "build_recipe", None)
    if recipe is not None:
        return {"build_model": recipe}
    attention = getattr(getattr(model, "encoder", None), "seg_attention", None)
    return {"attention": attention} if attention is not None else {}


def _save_with_record(save: callable):
    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        record = _record(self)
        if not record:
            return save(self, save_directory, *args, **kwargs)
        saved = self._hub_mixin_config  # SegModel's constructor takes modules, so the mixin stored nothing
        self._hub_mixin_config = {**(saved or {}), SEG_KEY: record}
        try:
            return save(self, save_directory, *args, **kwargs)
        finally:
            self._hub_mixin_config = saved

    save_pretrained._seg_wrapped = True
    return save_pretrained


def read_config(path: Path) -> dict:
    """``config.json`` at ``path``, checked as far as rebuilding the model needs."""
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise HubError(f"{path} is not text; expected the JSON that save_pretrained writes") from None
    except json.JSONDecodeError as err:
        raise HubError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(config, dict):
        raise HubError(f"{path} holds a JSON {type(config).__name__}; expected an object of model arguments")
    record = config.get(SEG_KEY)
    if record is not None and not (isinstance(record, dict) and len(record) == 1
                                   and set(record) <= {"build_model", "attention"}):
        raise HubError(f"{path}: '{SEG_KEY}' must be an object with one key, 'build_model' or 'attention'; "
                       f"got {record!r}")
    from seg.modeling.attach import attach_attention
    from seg.modeling.models import build_model

    if record is not None and "build_model" in record:  # its _model_class is SegModel, which smp does not know
        record["build_model"] = _checked_arguments(record["build_model"], build_model, f"{SEG_KEY}.build_model", path)
        return config
    name = config.get("_model_class")
    if not (isinstance(name, str) and isinstance(getattr(smp, name, None), type)):
        raise HubError(f"{path}: '_model_class' must name an smp model class (e.g. 'DeepLabV3'), got {name!r}")
    if record is not None:
        record["attention"] = _checked_arguments(record["attention"], attach_attention, f"{SEG_KEY}.attention",
                                                 path, skip=("encoder",))
    return config


def _checked_arguments(values: Any, function: Callable, key: str, path: Path, skip: tuple[str, ...] = ()) -> dict:
    """``values`` as keyword arguments of ``function``: names known, required ones present, types
    matching its annotations (JSON lists become tuples)."""
    params = {n: p for n, p in inspect.signature(function).parameters.items() if n not in skip}
    if not isinstance(values, dict):
        raise HubError(f"{path}: '{key}' must be an object of arguments {sorted(params)}, got {values!r}")
    unknown = sorted(set(values) - set(params))
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in values)
    if unknown or missing:
        said = "; ".join(f"{what} {names}" for what, names in (("unknown keys", unknown), ("missing", missing)) if names)
        raise HubError(f"{path}: '{key}' has {said}; expected keys {sorted(params)}")
    hints = typing.get_type_hints(function)
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = coerce(value, hints[name])
        except Mismatch:
            raise HubError(f"{path}: '{key}.{name}' must be {type_name(hints[name])}, got {value!r}") from None
    return checked


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# what model constructors raise for arguments of the right type but a wrong value (an unknown encoder...)
BUILD_ERRORS = (UserError, TypeError, ValueError, KeyError)


def _build(config: dict, path: Path) -> nn.Module:
    """The model config.json describes, with random weights."""
    from seg.modeling.attach import attach_attention
    from seg.modeling.models import build_model

    record = config[SEG_KEY]
    if "build_model" in record:
        try:
            return build_model(**record["build_model"])
        except BUILD_ERRORS as err:
            raise HubError(f"{path}: '{SEG_KEY}.build_model' does not build a model: {_one_line(err)}") from None
    arguments = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = getattr(smp, config["_model_class"])(**{**arguments, "encoder_weights": None})  # weights: the file
    except BUILD_ERRORS as err:
        raise HubError(f"{path}: the arguments of {config['_model_class']} do not build it: {_one_line(err)}") from None
    try:
        attach_attention(model.encoder, **record["attention"])
    except BUILD_ERRORS as err:
        raise HubError(f"{path}: '{SEG_KEY}.attention' cannot be attached: {_one_line(err)}") from None
    return model


def from_pretrained(path: str | Path, *args, **kwargs) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained`` in folder ``path`` (eval mode); other ids go to smp."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        return _SMP_FROM_PRETRAINED(path, *args, **kwargs)
    config = read_config(folder / CONFIG_FILE)
    if SEG_KEY not in config:
        try:
            return _SMP_FROM_PRETRAINED(path, *args, **kwargs)
        except BUILD_ERRORS as err:
            raise HubError(f"{folder / CONFIG_FILE}: the arguments of {config['_model_class']} do not build it: "
                           f"{_one_line(err)}") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    model = _build(config, folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: save_pretrained writes it beside {CONFIG_FILE}")
    try:
        with warnings.catch_warnings():
            # smp's load_state_dict drops tensors of the wrong shape with a many-line banner, which
            # would stand above the one-line error below that names the file and the keys
            warnings.filterwarnings("ignore", message=r"\s*!+ Mismatched keys")
            load_model(model, str(weights), strict=True)
    except (RuntimeError, SafetensorError, OSError) as err:
        raise HubError(f"{weights} does not fit the model {CONFIG_FILE} describes: {_one_line(err)}") from None
    return model.eval()


_SMP_FROM_PRETRAINED = smp.from_pretrained


def install() -> None:
    """Make smp's ``save_pretrained`` / ``from_pretrained`` handle our models (idempotent)."""
    if not getattr(SMPHubMixin.save_pretrained, "_seg_wrapped", False):
        SMPHubMixin.save_pretrained = _save_with_record(SMPHubMixin.save_pretrained)
    smp.from_pretrained = from_pretrained
