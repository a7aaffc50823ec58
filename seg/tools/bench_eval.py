"""``--scope eval`` of ``seg.tools.bench``: ``eval_seg.py``'s images/s on CamVid val, by inference path.

For plain, SE and CA MobileNetV2 (DeepLabV3, ``configs/camvid_gpu.yaml``) it trains a short run
each (``train_seg.py``, a process each), then scores its ``best.pt`` with ``eval_seg.py`` (in this
process) on the default path (``seg.inference.paths``: on CUDA the Triton kernels and CUDA graphs)
and on the reference (``eval.fast=false``), every (model, path) once per repeat, in rotating order.
"plain A/A" scores plain's checkpoint again as the control. The figures are eval_seg's own: images over the seconds it scored them, loading
included, as a user sees them; and the mIoU, which must agree between paths to 1e-4.

Without CamVid at ``--camvid`` it writes a stand-in of the same shape: 101 val frames of 360x480
in CamVid's layout, painted by the synthetic dataset's generator (``seg.data.synthetic``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from seg.config import available_cpus, config_to_dict, load_config
from seg.data.synthetic import render_scene
from seg.modeling.models import model_from_config
from seg.runs.checkpoint import save_checkpoint
from seg.tools.timing import cpu_name, noise_warning

REPO = Path(__file__).resolve().parents[2]  # the entry scripts run as a user runs them: from a checkout
CONFIG = REPO / "configs" / "camvid_gpu.yaml"
AA = "plain A/A"
ENCODERS = {"plain": "mobilenet_v2", "SE": "mobilenet_v2_se", "CA": "mobilenet_v2_ca"}
PATHS = {"default": "true", "reference": "false"}  # eval.fast
CAMVID_VAL = (101, 360, 480)  # frames, height, width of the SegNet layout's val split


def write_stand_in(root: Path, train: int, val: int, height: int, width: int, seed: int = 0) -> Path:
    """CamVid's layout (``<split>/*.png``, ``<split>annot/*.png``) filled with synthetic scenes."""
    rng = np.random.default_rng(seed)
    side = max(height, width)
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(exist_ok=True)
        for i in range(count):
            image, label = render_scene(rng, side)
            top, left = (side - height) // 2, (side - width) // 2
            window = (slice(top, top + height), slice(left, left + width))
            label = label[window]
            label[label == 255] = 11  # CamVid's void
            cv2.imwrite(str(root / split / f"{i:04d}.png"), cv2.cvtColor(image[window], cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / f"{split}annot" / f"{i:04d}.png"), label)  # 8-bit grey, as CamVid ships
    return root


def train_checkpoints(root: Path, work: Path, device: str, iters: int, overrides: list[str]) -> dict[str, Path]:
    """A short run per encoder; returns each run's best.pt. ``iters`` 0: the untrained models' weights
    (``--smoke``: what is proven then is the command, not a score)."""
    checkpoints = {}
    for name, encoder in ENCODERS.items():
        out = work / f"run-{encoder}"
        argv = [f"data.root={root}", f"model.encoder={encoder}", f"train.device={device}", *overrides]
        if iters == 0:
            cfg = load_config(CONFIG, argv)
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(out / "best.pt", model=model_from_config(cfg.model, cfg.data.num_classes), optimizer=None,
                            scheduler=None, scaler=None, iteration=0, best_miou=0.0, config=config_to_dict(cfg))
        else:
            argv += [f"train.iters={iters}", f"train.eval_interval={iters}", "train.vis_images=0",
                     "train.ca_maps=false", f"optim.warmup_iters={min(50, iters // 4)}"]
            _run("train_seg.py", ["--config", str(CONFIG), "--out", str(out), "--overwrite", *argv],
                 work / f"train-{encoder}.log")
        checkpoints[name] = out / "best.pt"
    return checkpoints


def score_once(checkpoint: Path, root: Path, fast: str, report: Path, overrides: list[str]) -> dict:
    """``eval_seg.py`` on ``checkpoint``, in this process: its figures time the scoring alone, so a
    process per run would only add its imports (4 s on a 2-core CPU, each of 24 runs on a GPU)."""
    argv = ["--checkpoint", str(checkpoint), "--json", str(report), f"data.root={root}", f"eval.fast={fast}",
            *overrides]
    if _entry_point("eval_seg.py").main(argv) != 0:
        raise RuntimeError(f"eval_seg.py {' '.join(argv)} failed; its error is above")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the model's graphs and their pools went with it
    return json.loads(report.read_text())


@functools.cache
def _entry_point(script: str):
    """The checkout's entry script as a module (it is not part of the installed package)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, argv: list[str], log: Path) -> None:
    with open(log, "wb") as out:
        code = subprocess.run([sys.executable, str(REPO / script), *argv], stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{script} {' '.join(argv)} failed (exit {code}); its output is in {log}")


def eval_rates(checkpoints: dict[str, Path], root: Path, work: Path, repeats: int, overrides: list[str]) -> dict:
    """images/s (each run's, and the median), mIoU and path of every (model, path), interleaved."""
    models = {**checkpoints, AA: checkpoints["plain"]}
    cells = [(name, path) for path in PATHS for name in ("plain", AA, "SE", "CA")]
    results: dict[tuple[str, str], list[dict]] = {cell: [] for cell in cells}
    (work / "evals").mkdir(parents=True, exist_ok=True)
    for i in range(repeats):
        for name, path in cells[i % len(cells):] + cells[:i % len(cells)]:
            report = work / "evals" / f"{name.replace(' ', '_').replace('/', '')}-{path}-{i}.json"
            results[(name, path)].append(score_once(models[name], root, PATHS[path], report, overrides))
    rows = []
    for (name, path), runs in results.items():
        img_s = [r["images_per_s"] for r in runs]
        base = statistics.median(r["images_per_s"] for r in results[("plain", path)])
        rows.append({"model": name, "path": path, "inference_path": runs[0]["inference_path"],
                     "images": runs[0]["images"], "img_s": statistics.median(img_s), "img_s_runs": img_s,
                     "speed_vs_plain": statistics.median(img_s) / base, "miou": runs[0]["miou"],
                     "miou_runs_equal": len({r["miou"] for r in runs}) == 1})
    for row in rows:
        reference = next(r for r in rows if r["model"] == row["model"] and r["path"] == "reference")
        row["miou_minus_reference"] = row["miou"] - reference["miou"]
    return {"rows": rows}


def table_rows(rows: list[dict]) -> list[str]:
    """The markdown table of :func:`eval_rates`'s rows (here and in ``seg.tools.report``)."""
    return ["| model | path | inference path | img/s | speed / plain | mIoU | mIoU - reference |",
            "|---|---|---|---:|---:|---:|---:|",
            *(f"| {r['model']} | {r['path']} | {r['inference_path']} | {r['img_s']:.1f} | {r['speed_vs_plain']:.3f} "
              f"| {r['miou']:.4f} | {r['miou_minus_reference']:+.1e} |" for r in rows)]


def eval_table(device: str, camvid: Path | None, work: Path, repeats: int, iters: int, frames: int = CAMVID_VAL[0],
               height: int = CAMVID_VAL[1], batch: int | None = None) -> tuple[list[str], dict]:
    """The table's lines and the JSON record of one ``--scope eval`` run. ``frames`` and ``height``
    size the stand-in (width 4/3 of height, as CamVid's); ``batch`` (default the config's) also
    sets the training crop to at most the frame height."""
    width = height * 4 // 3
    real = camvid is not None and (camvid / "val").is_dir()
    root = camvid if real else write_stand_in(work / "camvid-stand-in", max(8, frames // 2), frames, height, width)
    sizes = [] if batch is None else [f"data.batch_size={batch}", f"data.val_batch_size={batch}",
                                      f"data.crop_size={min(320, height // 32 * 32)}"]
    # loading must not be what is timed: as many workers as the machine has, up to 8
    workers = [f"data.num_workers={min(8, available_cpus())}"]
    checkpoints = train_checkpoints(root, work, device, iters, sizes + workers)
    record = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU: {cpu_name()}",
              "data": str(root) if real else f"stand-in for CamVid val: {frames} synthetic frames of {height}x{width}",
              "train_iters": iters, "repeats": repeats,
              **eval_rates(checkpoints, root, work, repeats, sizes + workers)}
    lines = [f"eval_seg.py on {record['device']}: {record['data']}; each model trained {iters} iterations "
             f"(configs/camvid_gpu.yaml); median of {repeats} interleaved runs; images/s include loading",
             "", *table_rows(record["rows"])]
    for path in PATHS:
        aa = next(r["speed_vs_plain"] for r in record["rows"] if r["model"] == AA and r["path"] == path)
        if (warning := noise_warning(f"eval {path}", aa)) is not None:
            lines.append(warning)
    return lines, record
