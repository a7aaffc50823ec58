"""ONNX export (``python -m seg.export``) and the onnxruntime model that runs the exported file.

- ``onnx``: export a checkpoint, with the model card in the file's metadata, and check it;
- ``runtime``: ``OnnxModel``, onnxruntime behind an ``nn.Module`` face, and the model card reader.
"""
