"""Prediction: from a model and images to label maps and files.

- ``tta``: whole-image, sliding-window and multi-scale + flip prediction (``predict_labels``);
- ``predictor``: ``seg.Predictor``, a checkpoint or ONNX file behind one call;
- ``inputs`` / ``outputs`` / ``files``: what ``predict_seg.py`` reads, writes and loops over.
"""
