"""The run directory as a small database that stays consistent through kills, full disks and double starts.

Files: ``last.pt`` (resume state), ``best.pt``, ``metrics.jsonl`` (one line per validation),
``config.yaml``, TensorBoard events, ``train.log`` and ``.lock``. Each validation commits in this
order (``seg.engine.trainer.commit_validation``):

1. ``best.pt`` when the validation improved the best (atomic replace);
2. ``last.pt``, which also stores the validation's metrics record (atomic replace);
3. the metrics line, appended to ``metrics.jsonl``.

A kill between any two steps therefore leaves ``best.pt`` at least as new as ``last.pt``, and
``metrics.jsonl`` never ahead of it except for a half-written last line. ``--resume`` repairs
the rest: it trims ``metrics.jsonl`` to ``last.pt``'s iteration and re-appends the stored record,
drops later TensorBoard events (``purge_step``) and removes temp files of dead writers. Retraining
from ``last.pt`` is exact, so it rewrites a ``best.pt`` that got ahead with the same bytes.

Nothing is written until a start has passed every check (``check_start`` here, then data and
model in ``seg.engine.trainer``); ``begin_run`` is the first write. So a refused or failed start
leaves the directory as it was.

A directory holding any of ``last.pt``, ``best.pt``, ``metrics.jsonl`` or TensorBoard events holds
a run, and a fresh start empties it only with ``--overwrite``. The one exception is what a fresh
start left that died before it committed its first validation (:func:`uncommitted_attempt`): no
``last.pt``, no metrics line, and at most the ``best.pt`` of that first validation. The rerun that
fixes its cause may reuse the directory. Temp files are removed only under the names the run's own
atomic writes use, never a user's ``.notes.tmp``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from seg.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config
from seg.errors import UserError
from seg.runs.checkpoint import CheckpointError, checkpoint_config, load_checkpoint
from seg.utils.atomic import temps_of, write_all, write_atomic

LAST, BEST, METRICS, CONFIG, LOCK = "last.pt", "best.pt", "metrics.jsonl", "config.yaml", ".lock"
LOG = "train.log"
EVENTS_GLOB = "events.out.tfevents.*"
# Keys that may differ on --resume: where the data lives, how often to log / validate, how long
# to train, and how fast. Everything else changes the model or the optimisation.
RESUMABLE_KEYS = frozenset({
    "data.root", "data.num_workers", "data.val_batch_size", "train.iters", "train.eval_interval",
    "train.log_interval", "train.vis_images", "train.ca_maps", "train.device", "train.compile", "train.compile_mode",
    "train.cuda_graphs",
    "train.threads",
    "train.dist_timeout_s",
})


class RunDirError(UserError, RuntimeError):
    """The run directory cannot take this start (in use, holds another run), or a write to it failed."""


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` for the whole run.

    The kernel releases it when the holder dies, so a killed run never blocks its resume. The
    lock file holds the holder's PID for the refusal message. A directory this call created is
    removed again when the start fails before ``begin_run`` wrote anything.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirError(f"{run_dir} is in use by process {holder} (lock {lock}); wait for it to end, "
                              "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        except BaseException:
            if created and not any(p.name != LOCK for p in run_dir.iterdir()):
                lock.unlink(missing_ok=True)
                run_dir.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock


def stored_config(ckpt: dict) -> dict:
    """A checkpoint's config with today's defaults for keys it predates, as a plain dict."""
    return config_to_dict(checkpoint_config(ckpt, LAST))


def changed_keys(stored: dict, requested: dict) -> list[str]:
    """``section.key (stored X, requested Y)`` for every key outside RESUMABLE_KEYS that differs."""
    return [f"{section}.{key} (stored {value!r}, requested {requested[section][key]!r})"
            for section, values in stored.items() for key, value in values.items()
            if f"{section}.{key}" not in RESUMABLE_KEYS and requested[section][key] != value]


def resume_config(run_dir: Path, config_file: Path | None, overrides: list[str]) -> Config:
    """The config ``--resume`` continues with: the run's stored ``config.yaml``, then ``config_file``
    (if given) and ``overrides`` on top, so :func:`check_start` sees a change only in what the
    resume command typed, never in what the run was started with."""
    stored, last = run_dir / CONFIG, run_dir / LAST
    if stored.is_file():
        try:
            base = config_from_dict(yaml.safe_load(stored.read_text()), source=str(stored))
        except yaml.YAMLError as err:
            raise ConfigError(f"{stored}: not valid YAML: {err}") from None
    elif last.is_file():  # config.yaml removed by hand: last.pt holds the same config
        base = checkpoint_config(load_checkpoint(last), last)
    else:
        raise _no_checkpoint(last)
    return load_config(config_file, overrides, base=base)


def _no_checkpoint(last: Path) -> RunDirError:
    return RunDirError(f"--resume: no checkpoint {last}; start the run without --resume")


def check_start(run_dir: Path, cfg: Config, resume: bool, overwrite: bool = False,
                world_size: int = 1) -> dict | None:
    """Refuse a start that would damage the run in ``run_dir``; return ``last.pt`` when resuming.

    A resume must run on as many processes as the run did (``world_size``): each process's share
    of the global batch, and so the sample order, depends on it.

    A fresh start without ``overwrite`` is refused where :func:`run_files` finds a run, unless they
    are an :func:`uncommitted_attempt`'s: a start that died before its first checkpoint left nothing
    worth keeping, so the corrected rerun may reuse the directory.
    """
    last = run_dir / LAST
    if resume:
        if not last.is_file():
            raise _no_checkpoint(last)
        ckpt = load_checkpoint(last)
        if ckpt["optimizer"] is None or ckpt["rng"] is None:
            raise RunDirError(f"--resume: {last} holds weights only (a best.pt?), no optimizer or RNG state to "
                              "continue from; start a new run with another --out")
        stored = stored_config(ckpt)
        diff = changed_keys(stored, config_to_dict(cfg))
        if diff:
            raise RunDirError(f"--resume: {last} was trained with a different config: {'; '.join(diff)}. "
                              f"Drop those overrides (or --config), or start a new run with another --out "
                              f"(keys that may change on resume: {', '.join(sorted(RESUMABLE_KEYS))})")
        check_resume_shape(ckpt, stored["train"]["iters"], cfg, world_size, last)
        return ckpt
    found = [] if overwrite else run_files(run_dir)
    if found and not uncommitted_attempt(run_dir):
        names = ", ".join(path.name for path in found)
        if last.is_file():
            raise RunDirError(f"{run_dir} already holds a run ({names}); continue it with --resume --out {run_dir}, "
                              "choose another --out, or pass --overwrite to discard it")
        raise RunDirError(f"{run_dir} holds a run's files ({names}) but no {LAST} to resume; choose another --out, "
                          "or pass --overwrite to discard them")
    return None


def run_files(run_dir: Path) -> list[Path]:
    """The files in ``run_dir`` that make it hold a run: checkpoints, the metrics log and TensorBoard
    events. ``config.yaml`` and ``train.log`` do not count: every start that got past its checks writes them."""
    return [path for path in (run_dir / LAST, run_dir / BEST, run_dir / METRICS) if path.is_file()] + \
        sorted(run_dir.glob(EVENTS_GLOB))


def uncommitted_attempt(run_dir: Path) -> bool:
    """Whether ``run_dir``'s run files are only what a fresh start left that died before committing
    its first validation: no ``last.pt``, no metrics line, and ``best.pt`` (if any) saved at the
    first validation of its own config, as the commit order (best.pt first) leaves it.

    A best.pt of a later validation, or one that cannot be read, is a run's and kept.
    """
    metrics, best = run_dir / METRICS, run_dir / BEST
    if (run_dir / LAST).is_file() or (metrics.is_file() and metrics.stat().st_size > 0):
        return False
    if not best.is_file():
        return True
    try:
        ckpt = load_checkpoint(best)
        train = checkpoint_config(ckpt, best).train
    except (CheckpointError, ConfigError):
        return False
    # seg.engine.loop.train validates every eval_interval iterations and at the last one
    return ckpt["iteration"] == min(train.eval_interval, train.iters)


def check_resume_shape(ckpt: dict, stored_iters: int, cfg: Config, world_size: int, last: Path) -> None:
    """Refuse a resume on another process count or with nothing left to train; say when the
    schedule (``stored_iters`` long) changes length."""
    stored_world = (ckpt.get("extra") or {}).get("world_size", 1)
    if stored_world != world_size:
        raise RunDirError(f"--resume: {last} was trained by {stored_world} process(es), this start has {world_size}; "
                          f"the sample order depends on it, so resume with {stored_world} "
                          f"(torchrun --nproc-per-node {stored_world}, or plain python for 1)")
    iteration = ckpt["iteration"]
    if cfg.train.iters != stored_iters:
        if cfg.train.iters <= iteration:
            raise RunDirError(f"--resume: train.iters={cfg.train.iters} is at or below iteration {iteration}, where "
                              f"{last} stopped; nothing would be trained (choose train.iters > {iteration})")
        logging.getLogger(__name__).info(
            "train.iters changed from %d to %d: the learning-rate schedule is stretched from iteration %d",
            stored_iters, cfg.train.iters, iteration)


def begin_run(run_dir: Path, cfg: Config, resumed: dict | None) -> None:
    """The first write of an accepted start: clear or repair the directory, then write ``config.yaml``.

    ``resumed`` is the ``last.pt`` being resumed (None for a fresh start, which removes any
    previous run's files).
    """
    remove_stale_temps(run_dir)
    if resumed is None:
        # train.log too: --overwrite starts a new run, whose log must not continue the old one's
        for path in [run_dir / LAST, run_dir / BEST, run_dir / METRICS, run_dir / LOG, *run_dir.glob(EVENTS_GLOB)]:
            path.unlink(missing_ok=True)
    else:
        record = (resumed.get("extra") or {}).get("metrics")
        trim_metrics(run_dir / METRICS, resumed["iteration"], record)
    save_config(cfg, run_dir / CONFIG)


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temp files of the run's own atomic writes (checkpoints, metrics log, config): under
    the lock, only a killed writer can have left them. Any other ``.*.tmp`` is not the run's to delete."""
    for tmp in [tmp for name in (LAST, BEST, METRICS, CONFIG) for tmp in temps_of(run_dir / name)]:
        logging.getLogger(__name__).info("removing %s, left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)


def trim_metrics(path: Path, iteration: int, record: dict | None) -> None:
    """Make ``metrics.jsonl`` end at ``last.pt``'s ``iteration``: drop later or half-written lines,
    and append ``record`` (the validation stored in ``last.pt``) when the line for it is missing."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = []
    for line in lines:
        try:
            if json.loads(line)["iter"] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # torn by a kill mid-append
    if record is not None and not any(json.loads(line)["iter"] == record["iter"] for line in kept):
        kept.append(json.dumps(record))
    if kept != lines:
        write_atomic(path, "".join(line + "\n" for line in kept).encode())


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one validation's record to ``metrics.jsonl`` and make it durable."""
    fd = os.open(run_dir / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        write_all(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(run_dir / METRICS)) from None
    finally:
        os.close(fd)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy the root logger's records to ``path`` (appending) while the run lasts, in the same format."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
