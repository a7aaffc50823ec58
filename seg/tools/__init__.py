"""The command-line tools: ``python -m seg.tools.<name>``. The library never imports from here.

- ``bench``: what attention costs (whole model or one block; CPU or CUDA; PyTorch or onnxruntime)
  and what a loader worker costs per image, all timed by :mod:`seg.tools.timing`;
- ``report``: every claim the project makes, measured in one command (benchmarks, ablation, CUDA tests);
- ``ablation``: train configs x encoders x seeds and tabulate mIoU beside the cost;
- ``complexity``: parameter and FLOP tables.

They live inside the package rather than in a top-level ``tools/`` so that ``pip install .``
ships them too and ``python -m`` finds them from any folder.
"""
