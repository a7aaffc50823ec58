"""Build VOC's ``train_aug`` split from the SBD benchmark (Hariharan et al. 2011).

Writes ``SegmentationClassAug/<id>.png`` (palette PNGs, class indices) for every train_aug id and
``ImageSets/Segmentation/train_aug.txt`` = (SBD train | SBD val | VOC train) - VOC val, sorted
(10,582 ids on the full data). Where VOC has its own mask for an id it is copied as is: VOC's
masks carry the 255 void border that SBD's lack. Idempotent: existing outputs are kept.

    python datasets/prepare_voc_aug.py --sbd benchmark_RELEASE --voc data/VOCdevkit/VOC2012
"""

import argparse
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from scipy.io import loadmat
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from seg.data.palette import save_index_png  # noqa: E402
from seg.data.voc import VOC_CLASSES, find_voc_dir  # noqa: E402
from seg.errors import print_user_error  # noqa: E402

AUG_DIR = "SegmentationClassAug"


def read_ids(path: Path) -> set[str]:
    """Ids of a split list, one per line."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def load_sbd_mask(path: Path) -> np.ndarray:
    """Class-index mask (HxW uint8) from an SBD ``cls/<id>.mat`` (struct GTcls, field Segmentation)."""
    try:
        mask = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (OSError, KeyError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: expected an SBD .mat with struct GTcls and field Segmentation ({err})") from err
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min() < 0 or mask.max() >= len(VOC_CLASSES):
        raise ValueError(f"{path}: Segmentation must be a 2-D array of 0..{len(VOC_CLASSES) - 1}, "
                         f"got shape {mask.shape} with range {mask.min()}..{mask.max()}")
    return mask.astype(np.uint8)


def train_aug_ids(sbd: Path, voc: Path) -> list[str]:
    """(SBD train | SBD val | VOC train) - VOC val, sorted."""
    lists = voc / "ImageSets" / "Segmentation"
    ids = read_ids(sbd / "train.txt") | read_ids(sbd / "val.txt") | read_ids(lists / "train.txt")
    return sorted(ids - read_ids(lists / "val.txt"))


def _convert(job: tuple[str, Path, Path]) -> None:
    image_id, sbd, voc = job
    out = voc / AUG_DIR / f"{image_id}.png"
    if out.exists():
        return
    own = voc / "SegmentationClass" / f"{image_id}.png"
    if own.exists():
        shutil.copyfile(own, out)
        return
    mat = sbd / "cls" / f"{image_id}.mat"
    if not mat.exists():
        raise FileNotFoundError(f"no mask for {image_id}: neither {own} nor {mat} exists")
    save_index_png(out, load_sbd_mask(mat))


def prepare(sbd: Path, voc: Path, workers: int = 4) -> list[str]:
    """Write the masks and the list; ``sbd`` is ``benchmark_RELEASE/dataset`` (or its parent)."""
    sbd = sbd / "dataset" if (sbd / "dataset" / "cls").is_dir() else sbd
    if not (sbd / "cls").is_dir():
        raise FileNotFoundError(f"{sbd} has no cls/ folder; expected benchmark_RELEASE/dataset/{{cls/*.mat,"
                                "train.txt,val.txt}")
    voc = find_voc_dir(voc)
    ids = train_aug_ids(sbd, voc)
    (voc / AUG_DIR).mkdir(exist_ok=True)
    jobs = [(i, sbd, voc) for i in ids]
    with Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(_convert, jobs, chunksize=64), total=len(jobs), desc=AUG_DIR,
                      disable=not sys.stderr.isatty()):  # a bar only on a terminal, not in logs
            pass
    text = "\n".join(ids) + "\n"
    list_file = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    if not list_file.exists() or list_file.read_text() != text:
        list_file.write_text(text)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python datasets/prepare_voc_aug.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sbd", type=Path, required=True, help="benchmark_RELEASE (or its dataset/ folder)")
    parser.add_argument("--voc", type=Path, required=True, help="VOCdevkit/VOC2012 (or a folder above it)")
    parser.add_argument("--workers", type=int, default=4, help="converter processes (default: 4)")
    args = parser.parse_args(argv)
    try:
        ids = prepare(args.sbd, args.voc, args.workers)
    except (OSError, ValueError) as err:  # a missing folder, an unreadable .mat (load_sbd_mask): one line naming it
        return print_user_error(err)
    print(f"train_aug: {len(ids)} ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
