"""Atomic checkpoint writes, weights_only round trips, RNG restore and clear load errors."""

import random
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from seg.config import Config, config_to_dict
import seg.runs.checkpoint as ckpt_mod
from seg.runs.checkpoint import (CheckpointError, capture_rng, load_checkpoint, load_model_weights, restore_rng,
                            save_checkpoint, unwrap_model)


def tiny_model(out_channels: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, out_channels, 1))


def training_state():
    """A model, optimizer, scheduler and scaler that have taken two steps, so every state is non-trivial."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=4e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (1 - i / 100) ** 0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        loss = model(torch.randn(2, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    return model, optimizer, scheduler, scaler


def save(path, model, optimizer=None, scheduler=None, scaler=None, **kw):
    args = dict(iteration=7, best_miou=0.5, config=config_to_dict(Config()), extra=None) | kw
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, **args)


def draws():
    return torch.rand(5), np.random.rand(5), np.random.randn(3), [random.random() for _ in range(5)]


def assert_same_draws(a, b):
    assert torch.equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    assert a[3] == b[3]


def test_round_trip_restores_every_state(tmp_path):
    model, optimizer, scheduler, scaler = training_state()
    extra = {"note": "x", "history": [0.1, 0.2]}
    save(tmp_path / "last.pt", model, optimizer, scheduler, scaler, iteration=2, best_miou=0.25, extra=extra)

    ckpt = load_checkpoint(tmp_path / "last.pt")
    model2 = tiny_model()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=4e-5)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda i: (1 - i / 100) ** 0.9)
    scaler2 = torch.amp.GradScaler("cpu")
    load_model_weights(model2, ckpt["model"])
    optimizer2.load_state_dict(ckpt["optimizer"])
    scheduler2.load_state_dict(ckpt["scheduler"])
    scaler2.load_state_dict(ckpt["scaler"])

    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    buffers = [optimizer2.state[p]["momentum_buffer"] for p in model2.parameters()]
    for p, buf in zip(model.parameters(), buffers):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buf)
    assert scheduler2.last_epoch == 2 and scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert scaler2.get_scale() == scaler.get_scale()
    assert (ckpt["iteration"], ckpt["best_miou"], ckpt["extra"]) == (2, 0.25, extra)
    assert ckpt["config"] == config_to_dict(Config())


def test_file_loads_with_plain_torch_load_weights_only(tmp_path):
    save(tmp_path / "c.pt", *training_state())
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(raw) == {*ckpt_mod.REQUIRED_KEYS, "config_version"}  # older checkpoints lack the version


def test_rng_restore_repeats_the_draws(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must round-trip too
    save(tmp_path / "c.pt", tiny_model())
    expected = draws()
    draws()  # move every generator on
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert_same_draws(draws(), expected)


def test_capture_restore_in_memory():
    state = capture_rng()
    expected = draws()
    restore_rng(state)
    assert_same_draws(draws(), expected)


def test_wrappers_are_unwrapped_so_keys_have_no_prefix(tmp_path):
    model = tiny_model()
    for wrapped in (nn.DataParallel(model), torch.compile(model), torch.compile(nn.DataParallel(model))):
        assert unwrap_model(wrapped) is model
        save(tmp_path / "c.pt", wrapped)
        assert list(load_checkpoint(tmp_path / "c.pt")["model"]) == list(model.state_dict())


def test_crash_mid_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    model = tiny_model()
    save(tmp_path / "last.pt", model, iteration=1)
    before = (tmp_path / "last.pt").read_bytes()

    def torch_save_that_dies(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(ckpt_mod.torch, "save", torch_save_that_dies)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "last.pt", model, iteration=2)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 1


def test_full_disk_mid_stream_is_an_oserror_naming_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    # torch's zip writer turns an error raised by the file object's write() into a RuntimeError
    # without its errno: save_atomic must still raise the OSError, which run directories report
    import errno
    import os

    model = nn.Conv2d(3, 512, 3)  # 55 KB of weights, streamed in more than one write below
    save(tmp_path / "last.pt", model, iteration=1)
    before = (tmp_path / "last.pt").read_bytes()
    monkeypatch.setattr("seg.utils.atomic.FdWriter.CHUNK", 1024)
    real, writes = os.write, []

    def disk_fills(fd, data):
        writes.append(len(data))
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", disk_fills)
    with pytest.raises(OSError) as err:
        save(tmp_path / "last.pt", model, iteration=2)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "last.pt")
    assert len(writes) == 2 and (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_non_plain_value_is_refused_before_writing(tmp_path):
    save(tmp_path / "c.pt", tiny_model(), iteration=1)
    with pytest.raises(TypeError, match=r"checkpoint\.extra\.miou.*numpy\.float64"):
        save(tmp_path / "c.pt", tiny_model(), iteration=2, extra={"miou": np.float64(0.5)})
    assert load_checkpoint(tmp_path / "c.pt")["iteration"] == 1


def test_numpy_scalars_for_iteration_and_miou_are_converted(tmp_path):
    save(tmp_path / "c.pt", tiny_model(), iteration=np.int64(3), best_miou=np.float32(0.5))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert (type(ckpt["iteration"]), type(ckpt["best_miou"])) == (int, float)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found") as err:
        load_checkpoint(tmp_path / "absent.pt")
    assert "absent.pt" in str(err.value)


@pytest.mark.parametrize("cut", [0, 100, -100])
def test_corrupt_or_truncated_file_is_named(tmp_path, cut):
    path = tmp_path / "broken.pt"
    save(path, tiny_model())
    data = path.read_bytes()
    path.write_bytes(b"not a checkpoint at all" if cut == 0 else data[:cut])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)


def test_zip_that_is_not_a_checkpoint_is_named(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="other.zip is corrupt"):
        load_checkpoint(tmp_path / "other.zip")


def test_file_with_objects_weights_only_refuses(tmp_path):
    torch.save({"model": {}, "obj": np.float64(1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled.pt holds Python objects .*numpy.* we will not unpickle") as info:
        load_checkpoint(tmp_path / "pickled.pt")
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)  # not PyTorch's advice to retry


def test_missing_keys_are_listed(tmp_path):
    torch.save({"model": tiny_model().state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare.pt lacks \['optimizer', 'scheduler'"):
        load_checkpoint(tmp_path / "bare.pt")


def test_mismatch_error_lists_keys_and_shapes():
    model = tiny_model(out_channels=4)
    state = tiny_model(out_channels=6).state_dict()
    del state["1.running_var"]
    state["head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(model, state)
    message = str(err.value)
    assert "3.weight: checkpoint (6, 8, 1, 1) vs model (4, 8, 1, 1)" in message
    assert "3.bias: checkpoint (6,) vs model (4,)" in message
    assert "missing in checkpoint (1): 1.running_var" in message
    assert "unexpected in checkpoint (1): head.weight" in message
    assert "\n" not in message  # one error line


def test_mismatch_list_is_capped():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    state = {f"x{i}": torch.zeros(1) for i in range(15)}
    with pytest.raises(CheckpointError, match=r"unexpected in checkpoint \(15\): x0, x1, x2, x3, x4 ... and 10 more$"):
        load_model_weights(model, state)


def test_mismatch_leaves_the_model_untouched():
    model = tiny_model(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.full_like(v, 3.0) for k, v in tiny_model(6).state_dict().items()}
    with pytest.raises(CheckpointError):
        load_model_weights(model, state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_model_weights_into_a_wrapped_model():
    source, target = tiny_model(), tiny_model()
    load_model_weights(nn.DataParallel(target), source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k])


def test_weights_only_checkpoint_drops_every_resume_state(tmp_path):
    model, optimizer, scheduler, scaler = training_state()
    save(tmp_path / "full.pt", model, optimizer, scheduler, scaler)
    save(tmp_path / "best.pt", model, optimizer, scheduler, scaler, resumable=False)
    best = load_checkpoint(tmp_path / "best.pt")
    assert [best[k] for k in ("optimizer", "scheduler", "scaler", "rng")] == [None] * 4
    assert best["model"].keys() == model.state_dict().keys() and best["iteration"] == 7
    # no momentum buffers (as large as the weights) and no RNG state
    assert (tmp_path / "best.pt").stat().st_size < 0.75 * (tmp_path / "full.pt").stat().st_size
