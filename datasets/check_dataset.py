"""Scan a dataset before a long run: unreadable or truncated images and labels, image/label size
mismatches, label values out of range, and listed or orphan files that are missing.

    python datasets/check_dataset.py --name camvid --root data/camvid [--splits train val test] [--workers 4]

Every sample is read exactly as training reads it (through ``seg.data``), so a dataset that
passes here will not stop a run halfway. Prints one line per problem, then a summary; the exit
status is 1 when anything is wrong. A split that is absent, or whose labels are withheld (a
benchmark's test split), is a note, not a problem, unless no split at all is there.
"""

import argparse
import sys
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from seg.config import available_cpus  # noqa: E402
from seg.data import DATASETS, DatasetError, build_dataset  # noqa: E402
from seg.data.base import SplitMissing  # noqa: E402

DEFAULT_WORKERS = 4

DEFAULT_SPLITS = {"voc": ["train", "val"], "cityscapes": ["train", "val"], "camvid": ["train", "val", "test"],
                  "synthetic": ["train", "val"]}


class ProblemPerSample(Dataset):
    """Item ``i`` is the error that reading sample ``i`` raises, or "" when it reads cleanly."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:
        try:
            self.dataset[index]
        except DatasetError as err:
            return str(err)
        return ""


def check_split(name: str, root: Path, split: str, workers: int) -> tuple[int, list[str], list[str]]:
    """(samples read, problems, notes) for one split: each missing or orphan file and each sample that
    does not read is a problem; a split that cannot be listed is one problem, one that is not there
    (or has no labels) one note."""
    try:
        dataset = build_dataset(name, root, split, strict=False)  # list what is missing, read the rest
    except SplitMissing as err:
        return 0, [], [f"{split}: {err.absent}"]  # what is absent; the layout is for errors
    except (DatasetError, FileNotFoundError) as err:
        return 0, [f"{split}: {err}"], []
    # batch_size=None hands items over one by one; workers read in parallel
    loader = DataLoader(ProblemPerSample(dataset), batch_size=None, num_workers=workers)
    # the bar only on a terminal: redrawn into a pipe or log file it is hundreds of lines of noise
    bar = tqdm(loader, desc=split, total=len(dataset), dynamic_ncols=True, disable=not sys.stderr.isatty())
    problems = dataset.problems + [problem for problem in bar if problem]
    return len(dataset), problems, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python datasets/check_dataset.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, choices=sorted(DATASETS), help="which dataset's layout to read")
    parser.add_argument("--root", type=Path, required=True, help="the dataset's folder, as data.root in a config")
    parser.add_argument("--splits", nargs="+", help="default: the dataset's usual splits")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"reader processes, at most the available CPUs (0: read in this process; "
                             f"default: {DEFAULT_WORKERS})")
    args = parser.parse_args(argv)
    workers = max(0, min(args.workers, available_cpus()))  # more readers than CPUs only contend
    splits = args.splits or DEFAULT_SPLITS[args.name]
    checked, problems, notes = 0, [], []
    for split in splits:
        count, found, noted = check_split(args.name, args.root, split, workers)
        checked += count
        problems += found
        notes += noted
    if len(notes) == len(splits):
        problems.append(f"none of the splits {splits} is there")
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"problem: {problem}")
    noted = f", {len(notes)} split(s) absent" if notes else ""
    print(f"{args.name} at {args.root}: {checked} samples checked, {len(problems)} problem(s){noted}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
