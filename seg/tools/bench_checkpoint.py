"""Checkpoint writes for ``python -m seg.tools.bench --scope checkpoint``: a run's ``last.pt`` (model,
optimizer state, RNG), replaced in place as every validation of a run replaces it.

"streamed" is :func:`seg.runs.checkpoint.save_atomic`: ``torch.save`` into the temp file, then fsync
and rename. "in memory" serialises into a ``BytesIO`` first and writes that (what ``save_atomic``
did before); a second "in memory" is the A/A control. Each call is one whole atomic write, timed in
turn by :mod:`seg.tools.timing`.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from seg.config import ModelConfig
from seg.modeling.models import model_from_config
from seg.runs.checkpoint import save_atomic
from seg.tools.timing import cpu_name, interleaved, noise_warning, ratio
from seg.utils.atomic import write_atomic

STREAMED, IN_MEMORY, AA = "streamed", "in memory", "in memory A/A"


def _payload(encoder: str) -> dict:
    """What a run's last.pt holds for DeepLabV3 on ``encoder`` (256 decoder channels) after an AdamW step."""
    model = model_from_config(ModelConfig(encoder=encoder), 21)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 1}


def checkpoint_table(encoder: str, repeats: int) -> list[str]:
    payload = _payload(encoder)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def in_memory(path: Path) -> None:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            write_atomic(path, buffer.getbuffer())

        runners = {STREAMED: lambda: save_atomic(payload, folder / "streamed.pt"),
                   IN_MEMORY: lambda: in_memory(folder / "memory.pt"),
                   AA: lambda: in_memory(folder / "memory_aa.pt")}
        times = interleaved(runners, repeats, warmup=1)
        size = (folder / "streamed.pt").stat().st_size / 1e6
    if (warning := noise_warning("checkpoint write", ratio(times, AA, IN_MEMORY))) is not None:
        print(warning, file=sys.stderr)
    lines = [f"last.pt of DeepLabV3 {encoder} + AdamW state, {size:.1f} MB, replaced in place in {tempfile.gettempdir()}; "
             f"{repeats} interleaved writes each; CPU: {cpu_name()}", "",
             "| write | median ms | / in memory |", "|---|---:|---:|"]
    lines += [f"| {name} | {statistics.median(times[name]) * 1e3:.1f} | {ratio(times, name, IN_MEMORY):.3f} |"
              for name in runners]
    return lines
