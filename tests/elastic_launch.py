"""Test helper (not a test): torchrun, with seg imported before it starts any worker.

Run it with torchrun's own flags plus ``--start-method fork --run-path``: each worker, restarts
included, is then forked from this process and runs ``tests/elastic_train.py`` with ``runpy``, so
it starts with torch and seg imported. A worker started by plain torchrun spends 5 to 7 CPU-seconds
importing them first; the elastic tests start about twenty. The agent, the rendezvous, the restarts
and the workers' environment are torchrun's own; ``test_elastic``'s reference run uses plain
torchrun, and the other runs must equal it to the bit.
"""

import tests.elastic_train  # noqa: F401  (imports torch, seg and train_seg for the forked workers)
from torch.distributed.run import main

if __name__ == "__main__":
    main()
