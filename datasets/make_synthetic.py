"""Generate the synthetic segmentation dataset (VOC layout) that the default config trains on.

Same generator as ``seg.data.synthetic.make_synthetic``; a dataset with identical parameters that
already exists is left untouched.

    python datasets/make_synthetic.py --root data/synthetic --n-train 600 --n-val 100 --size 96
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from seg.data.base import DatasetError  # noqa: E402
from seg.data.synthetic import make_synthetic  # noqa: E402
from seg.errors import print_user_error  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python datasets/make_synthetic.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="output folder (VOCdevkit/VOC2012 goes inside)")
    parser.add_argument("--n-train", type=int, default=600, help="training images (default: 600)")
    parser.add_argument("--n-val", type=int, default=100, help="validation images (default: 100)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default: 96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the shapes (default: 0)")
    args = parser.parse_args(argv)
    try:
        voc = make_synthetic(args.root, args.n_train, args.n_val, args.size, args.seed)
    except OSError as err:
        return print_user_error(DatasetError(f"cannot write the synthetic dataset in {args.root} "
                                             f"({err.strerror}: {err.filename})"))
    print(f"synthetic dataset ready in {voc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
