"""Write ``*_gtFine_labelTrainIds.png`` next to every Cityscapes ``*_gtFine_labelIds.png``.

The mapping is the official table from cityscapesscripts (via ``seg.data.cityscapes``); ids that
are not evaluated become 255. Runs in parallel and keeps files that already exist (idempotent).

    python datasets/prepare_cityscapes.py --root data/cityscapes --workers 8
"""

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import cv2
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from seg.data.base import read_gray_png  # noqa: E402
from seg.data.cityscapes import LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX, label_ids_to_train_ids  # noqa: E402
from seg.errors import print_user_error  # noqa: E402


def _convert(label_ids: Path) -> None:
    out = label_ids.with_name(label_ids.name[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX)
    if out.exists():
        return
    tmp = out.with_name(f".{out.name}")  # renamed at the end so an interrupted run leaves no half file
    if not cv2.imwrite(str(tmp), label_ids_to_train_ids(read_gray_png(label_ids))):
        raise OSError(f"could not write {tmp}")
    os.replace(tmp, out)


def prepare(root: Path, workers: int = 4) -> int:
    """Convert every labelIds PNG under ``root/gtFine``; returns how many were found."""
    gt = root / "gtFine"
    files = sorted(gt.glob(f"*/*/*{LABEL_IDS_SUFFIX}"))
    if not files:
        raise FileNotFoundError(f"no *{LABEL_IDS_SUFFIX} under {gt}; expected gtFine/<split>/<city>/")
    with Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(_convert, files, chunksize=16), total=len(files), desc="trainIds",
                      disable=not sys.stderr.isatty()):  # a bar only on a terminal, not in logs
            pass
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python datasets/prepare_cityscapes.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="folder holding gtFine/ and leftImg8bit/")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="converter processes (default: all CPUs)")
    args = parser.parse_args(argv)
    try:
        count = prepare(args.root, args.workers)
    except OSError as err:  # a missing root, an unwritable folder: one line naming it
        return print_user_error(err)
    print(f"{count} label files converted or already present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
