"""The training loop's reporting: plain log lines every log_interval, and a progress bar whose
rate counts training steps only (validation pauses excluded) and that shows only on a terminal."""

import itertools
import logging
import re
import sys
import time

import pytest
import torch
from torch import nn

import seg.engine.loop as engine
from seg.engine.loop import TrainState, train
from seg.utils.progress import show_progress_bar

LINE = re.compile(r"iter (\d+)/(\d+): loss (\S+), lr (\S+), (\S+) img/s")


def _state() -> TrainState:
    model = nn.Conv2d(3, 2, kernel_size=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / 10)
    return TrainState(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def _batches():
    gen = torch.Generator().manual_seed(0)
    return itertools.repeat((torch.randn(2, 3, 4, 4, generator=gen), torch.randint(0, 2, (2, 4, 4), generator=gen)))


def test_plain_line_every_log_interval_with_loss_lr_and_rate(caplog):
    state, logged = _state(), []
    with caplog.at_level(logging.INFO, logger="seg.engine.loop"):
        train(state, _batches(), total_iters=5, device=torch.device("cpu"), log_interval=2, eval_interval=100,
              on_log=lambda it, scalars: logged.append((it, scalars)))
    lines = [LINE.fullmatch(r.getMessage()) for r in caplog.records]
    assert all(lines) and [int(m[1]) for m in lines] == [2, 4, 5]  # the last, partial window too
    assert all(int(m[2]) == 5 for m in lines)
    for m, (it, scalars) in zip(lines, logged):  # the line says what TensorBoard gets
        assert float(m[3]) == pytest.approx(scalars["train/loss"], rel=1e-3)
        assert float(m[4]) == pytest.approx(scalars["train/lr"], rel=1e-3)
    assert float(lines[0][4]) == pytest.approx(0.1 * (1 - 2 / 10))  # lr after 2 scheduler steps


class _RecordingBar(engine.tqdm):
    bars: list = []

    def close(self):
        if not self.disable:
            _RecordingBar.bars.append(self.format_dict)
        super().close()


def test_progress_bar_rate_excludes_validation(monkeypatch):
    monkeypatch.setattr(engine, "tqdm", _RecordingBar)
    monkeypatch.setattr(engine, "show_progress_bar", lambda: True)
    _RecordingBar.bars.clear()
    pause = 0.5
    start = time.perf_counter()
    train(_state(), _batches(), total_iters=4, device=torch.device("cpu"), log_interval=2, eval_interval=2,
          on_eval=lambda state: time.sleep(pause))
    wall = time.perf_counter() - start
    (bar,) = _RecordingBar.bars
    assert bar["n"] == 4
    # two validations slept 1 s in all; the bar's clock must have left both out
    assert bar["elapsed"] < wall - 2 * pause + 0.05


def test_progress_bar_is_closed_when_training_fails(monkeypatch):
    monkeypatch.setattr(engine, "tqdm", _RecordingBar)
    monkeypatch.setattr(engine, "show_progress_bar", lambda: True)
    _RecordingBar.bars.clear()

    def fail(state):
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError) as failure:  # the live traceback keeps the loop's frame, and its bar
        train(_state(), _batches(), total_iters=4, device=torch.device("cpu"), log_interval=2, eval_interval=2,
              on_eval=fail)
    assert [bar["n"] for bar in _RecordingBar.bars] == [2]
    del failure


def test_logged_rate_leaves_out_a_validation_inside_the_window(monkeypatch, caplog):
    """A validation between two log lines pauses the rate's clock; the steps before it still count."""
    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])

    def batches():  # every step takes 1 s on the fake clock
        for batch in _batches():
            clock[0] += 1.0
            yield batch

    def validate(state):
        clock[0] += 100.0

    with caplog.at_level(logging.INFO, logger="seg.engine.loop"):
        train(_state(), batches(), total_iters=4, device=torch.device("cpu"), log_interval=4, eval_interval=2,
              on_eval=validate)
    (line,) = [LINE.fullmatch(r.getMessage()) for r in caplog.records]
    assert float(line[5]) == pytest.approx(8 / 4)  # 4 steps of 2 images in 4 s of training


def test_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not show_progress_bar()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress_bar()


class _NanAt(nn.Module):
    """A 1x1 conv whose output is NaN on its ``bad``-th call."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.conv, self.calls, self.bad = nn.Conv2d(3, 2, kernel_size=1), 0, bad

    def forward(self, x):
        self.calls += 1
        out = self.conv(x)
        return out * float("nan") if self.calls == self.bad else out


def test_loss_is_read_on_the_host_once_per_log_window(monkeypatch):
    """No host sync per step: on a GPU each would stall the launch queue."""
    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    train(_state(), _batches(), total_iters=8, device=torch.device("cpu"), log_interval=4, eval_interval=100)
    assert len(reads) == 2


def test_non_finite_loss_names_its_iteration_and_stops_before_any_validation():
    state = _state()
    state.model = _NanAt(bad=3)
    state.optimizer = torch.optim.SGD(state.model.parameters(), lr=0.1)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda it: 1.0)
    validated = []
    with pytest.raises(engine.NonFiniteLossError, match="loss is nan at iteration 3 .found at iteration 4"):
        train(state, _batches(), total_iters=10, device=torch.device("cpu"), log_interval=5, eval_interval=4,
              on_eval=validated.append)
    assert validated == []  # the validation at iteration 4 would have checkpointed the diverged weights
