"""Scoring: the confusion-matrix metrics, the eval loop, and scoring a checkpoint on its dataset.

- ``metrics``: ``ConfusionMatrix`` (mIoU, per-class IoU, accuracies; summed over ranks);
- ``loop``: ``evaluate``, the one eval loop, shared by validation and ``eval_seg.py``;
- ``scoring``: a checkpoint's val set and settings, and the metrics record both write.
"""
