"""Training checkpoints: atomic save (through :mod:`seg.utils.atomic`), ``weights_only`` load, RNG capture/restore, checked weight loading.

Everything stored is a tensor or a plain Python value, so ``torch.load(weights_only=True)`` reads
it without unpickling arbitrary objects; RNG states are converted to that form on save.
"""

from __future__ import annotations

import pickle
import random
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from seg.config import CONFIG_VERSION, Config, config_from_dict
from seg.errors import UserError
from seg.utils.atomic import atomic_file

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "best_miou", "config", "rng", "extra")
MAX_LISTED = 5  # mismatched keys shown in an error's one line; the count says how many more there are
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read, or weights that do not fit a model."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def capture_rng() -> dict:
    """torch (CPU and every CUDA device), numpy and python ``random`` states as tensors / plain values."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # only query CUDA when it is already set up: get_rng_state_all would initialise it otherwise
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`: the next random draws repeat those made after the capture."""
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].cpu().numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _check_plain(obj: Any, where: str) -> None:
    """Raise naming the first value that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _check_plain(key, f"{where} key")
            _check_plain(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN) or isinstance(obj, np.generic):  # np.float64 subclasses float
        raise TypeError(f"checkpoint field '{where}' is a {type(obj).__module__}.{type(obj).__qualname__}; "
                        "store only tensors and plain Python values (convert with float()/int()/.tolist())")


def _canonical(obj: Any) -> Any:
    """Rebuild containers and intern strings, so the pickled bytes depend on the content alone.

    Pickle writes a string once and then refers back to it by object identity, so the same
    state saved after a resume (its keys freshly unpickled, not interned) gave different bytes.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, Mapping):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    scheduler: Optional[Any],
    scaler: Optional[torch.amp.GradScaler],
    iteration: int,
    best_miou: float,
    config: dict,
    extra: Optional[dict] = None,
    resumable: bool = True,
) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves any previous file at ``path`` intact.

    The model's state is taken from inside DDP / ``torch.compile`` wrappers, so its keys carry no
    ``module.`` / ``_orig_mod.`` prefix. ``config`` should be ``config_to_dict(cfg)``.
    ``resumable=False`` writes a weights checkpoint (a run's ``best.pt``): the optimizer, scheduler,
    scaler and RNG states are stored as None, since only resume reads them; evaluation, prediction,
    export and the hub read the model, config and metrics alone.
    """
    def state(part: Any) -> Optional[dict]:
        return part.state_dict() if resumable and part is not None else None

    payload = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": state(optimizer),
        "scheduler": state(scheduler),
        "scaler": state(scaler),
        "iteration": int(iteration),
        "best_miou": float(best_miou),
        "config": config,
        "config_version": CONFIG_VERSION,
        "rng": capture_rng() if resumable else None,
        "extra": extra,
    }
    _check_plain(payload, "checkpoint")
    save_atomic(_canonical(payload), path)


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically, streamed into the temp file: serialised into memory
    first, a checkpoint needed a second buffer of its size and took about 1.2x as long
    (``python -m seg.tools.bench --scope checkpoint``). A full disk is an ``OSError`` naming ``path``."""
    with atomic_file(Path(path)) as out:
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None  # torch's zip writer reports the failed write without its errno


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``; clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; name a file in it, such as {path / 'best.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a zip-format PyTorch checkpoint: truncated or corrupt?")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # not PyTorch's message: it advises weights_only=False, which would run whatever code the file holds
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (such as {found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds Python objects{what} that we will not unpickle, since unpickling "
                              "can run code stored in the file; it was not written by seg's save_checkpoint, and "
                              "only its maker can convert it to plain tensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a checkpoint dict")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path} is a bare weights file ({len(ckpt)} tensors, e.g. {next(iter(ckpt))}), not a "
                              "training checkpoint; an encoder's (a pretraining run's encoder.pth) goes in "
                              "model.encoder_weights, a run's best.pt or last.pt here")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {missing} (has {sorted(ckpt)}); a bare weights file belongs to "
                              "seg.modeling.weights, a resumable checkpoint comes from seg.runs.checkpoint.save_checkpoint")
    return ckpt


def checkpoint_config(ckpt: dict, path: str | Path = "checkpoint") -> Config:
    """The config a checkpoint was trained with, read by the rules of its ``config_version``
    (checkpoints from before versioning are version 1): see :func:`seg.config.config_from_dict`."""
    return config_from_dict(ckpt["config"], ckpt.get("config_version", 1), f"config stored in {path}")


def saved_cpu_paths(ckpt: Mapping[str, Any]) -> dict:
    """The CA CPU-path choices (:func:`seg.kernels.calibrate.choices`) stored with the checkpoint's
    validation; empty for checkpoints from before they were stored, or saved without a validation."""
    return (ckpt.get("extra") or {}).get("cpu_paths", {})


def _listed(items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load ``state_dict`` into ``model``; on any key or shape mismatch raise listing the first ones."""
    model = unwrap_model(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{title} ({len(items)}): {_listed(items)}"
                 for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                                      ("shape mismatch", shapes)) if items]
        raise CheckpointError(f"weights do not fit {type(model).__name__}; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
