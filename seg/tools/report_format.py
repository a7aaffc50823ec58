"""``report.md`` from ``seg.tools.report``'s JSON: tables ready to paste into the README."""

from __future__ import annotations

import time
from pathlib import Path

from seg.tools.bench_eval import table_rows
from seg.tools.bench_pretrain import projected_hours


# variants the cost table always names; where one could not run, its row says why
TRITON_ONLY = "the Triton kernels run on CUDA only (or under TRITON_INTERPRET=1, which times nothing real)"
EXPECTED = {"plain": "", "plain A/A": "", "SE": "", "CBAM": "", "CA": "", "CA fused": TRITON_ONLY,
            "CA prologue": TRITON_ONLY}


def _cost_table(mode: str, result: dict) -> list[str]:
    s = result["setup"]
    lines = [f"### Cost, {mode} ({s['device']}, batch {s['batch']} at {s['size']}², amp {s['amp']}, channels_last "
             f"{s['channels_last']}, median of {s['repeats']} after {s['warmup']} warm-up, models interleaved)", "",
             "| variant | params (M) | train step ms | train / plain | infer img/s | infer / plain | peak GiB | "
             "warm-up s (compiling, capturing) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f} | {r['train_ms']:.2f} | {r['train_ratio']:.3f} | "
                     f"{r['infer_img_s']:.1f} | {r['infer_ratio']:.3f} | {peak} | {r.get('warmup_s', 0):.1f} |")
    ran = {r["variant"] for r in result["rows"]}
    for variant, why in EXPECTED.items():
        if variant not in ran and why:
            lines.append(f"| {variant} | absent on {s['device']}: {why} | | | | | | |")
    return lines + [""]


def _ablation_table(ablation: dict) -> list[str]:
    classes = ablation["classes"]
    lines = [f"### CamVid ablation (`{ablation['config']}`, {ablation['jobs']} runs at once, train.iters "
             f"{ablation['iters']}; mIoU = each run's best validation, which eval_seg.py reproduces)", "",
             "| variant | encoder | runs | finished | iterations reached | mIoU (%) mean ± std | "
             + " | ".join(classes) + " |",
             "|---|---|---:|---:|---|---:|" + "---:|" * len(classes)]
    for r in ablation["rows"]:
        runs = r["runs"]
        miou = "n/a" if r["miou_mean"] is None else f"{100 * r['miou_mean']:.2f} ± {100 * r['miou_std']:.2f}"
        reached = ", ".join(str(run["last_iter"]) for run in runs) or "none"
        ious = " | ".join("n/a" if v is None else f"{100 * v:.1f}" for v in r["iou_mean"]) if runs else \
            " | ".join("n/a" for _ in classes)
        lines.append(f"| {r['variant']} | {r['encoder']} | {len(runs)} | {sum(run['finished'] for run in runs)} | "
                     f"{reached} | {miou} | {ious} |")
    return lines + [""]


def _pretrain_table(pretrain: dict | None) -> list[str]:
    if not pretrain:
        return ["### Pretraining cost: no result (see Parts)", ""]
    loader = pretrain["loader"]
    lines = [f"### Pretraining cost ({pretrain['device']}, batch {pretrain['batch']} at {pretrain['size']}², amp "
             f"{pretrain['amp']}, channels_last {pretrain['channels_last']}, eager; projected to "
             f"{pretrain['epochs']} epochs of {pretrain['imagenet_train_images']:,} images)", "",
             "| model | train img/s | step time / plain | 200 epochs, model-bound (h) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['img_s']:.1f} | {r['ratio']:.3f} | {projected_hours(r['img_s']):.1f} |" for r in pretrain["rows"]]
    lines += ["", f"Loader ({loader['workers']} workers, JPEG decode + random-resized crop + flip): "
              f"{loader['img_s']:.1f} img/s, {projected_hours(loader['img_s']):.1f} h for 200 epochs loader-bound.", ""]
    return lines


def _eval_table(record: dict | None) -> list[str]:
    if not record:
        return ["### Evaluation speed: no result (see Parts)", ""]
    return [f"### Evaluation speed (`eval_seg.py` on {record['device']}; {record['data']}; each model trained "
            f"{record['train_iters']} iterations; median of {record['repeats']} interleaved runs; img/s include "
            "loading)", "", *table_rows(record["rows"]), ""]


def _pytest_summary(out: Path) -> str:
    log = out / "logs" / "pytest.log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1] if lines else "no output"


def format_report(report: dict, out: Path) -> str:
    env = report["environment"]
    lines = [f"# seg.tools.report, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "`" + " ".join(report["command"]) + "`", "", "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "## Parts", "", "| part | status | seconds | log |", "|---|---|---:|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p.get('seconds', '')} | {p.get('log', '')} |" for p in report["parts"]]
    lines += ["", "## Results", ""]
    for mode, result in report["cost"].items():
        lines += _cost_table(mode, result) if result else [f"### Cost, {mode}: no result (see Parts)", ""]
    lines += _ablation_table(report["ablation"]) if "ablation" in report else []
    lines += _pretrain_table(report["pretrain"]) if "pretrain" in report else []
    lines += _eval_table(report["eval"]) if "eval" in report else []
    lines += ["### CUDA tests (`pytest -m cuda -k 'not compiled'`)", "", "`" + _pytest_summary(out) + "`", ""]
    return "\n".join(lines)
