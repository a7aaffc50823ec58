"""onnxruntime behind an ``nn.Module`` face, and the model card an exported model carries in its metadata.

:class:`OnnxModel` takes and returns torch tensors, so :func:`seg.inference.tta.predict_labels` (whole,
slide, multi-scale + flip) drives an exported model exactly as it drives the PyTorch one.
The metadata keys (:data:`CARD_KEYS`) each hold one JSON value, readable by any ONNX tool:
``mean``/``std`` (0..1 units, RGB order), ``color_order``, ``input_stride`` (H and W must be
multiples of it), ``pads_inside`` (true: the graph pads any H and W to it and crops the logits
back, as ``--dynamic`` exports do), ``classes``, ``palette``, ``inference`` and ``slide_window``
(see :func:`seg.inference.predictor.model_card`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from seg.errors import UserError

CARD_KEYS = ("mean", "std", "color_order", "input_stride", "pads_inside", "classes", "palette", "inference",
             "slide_window")


class OnnxModelError(UserError, ValueError):
    """An ONNX file that is missing, not ours, or cannot take the input it is given."""


def write_model_card(path: str | Path, card: dict) -> None:
    """Store ``card`` (see :data:`CARD_KEYS`) in the metadata of the ONNX file at ``path``, in place."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {key: json.dumps(card[key]) for key in CARD_KEYS})
    onnx.save(model, str(path))


def read_model_card(path: str | Path) -> dict:
    """The model card stored by :func:`write_model_card`; one-line errors for other files."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise OnnxModelError(f"{path} is not a readable ONNX model: {str(err).splitlines()[0]}") from None
    missing = [key for key in CARD_KEYS if key not in props]
    if missing:
        raise OnnxModelError(f"{path} has no {missing} in its metadata; re-export it with python -m seg.export")
    return {key: json.loads(props[key]) for key in CARD_KEYS}


class OnnxModel(nn.Module):
    """An exported segmentation model run by onnxruntime's CPU provider; forward is torch in, torch out.

    Args:
        path: ONNX file from ``python -m seg.export``.
        threads: onnxruntime intra-op threads (None: its default).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_inputs()[0]
        self.input_name = meta.name
        batch, _, height, width = meta.shape  # symbolic axes come back as strings
        self.batch_one = batch == 1
        self.static_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_size is not None and tuple(x.shape[-2:]) != self.static_size:
            h, w = self.static_size
            raise OnnxModelError(
                f"{self.path} was exported for {h}x{w} inputs only, got {x.shape[-2]}x{x.shape[-1]} (after padding); "
                f"export with --dynamic, or predict with --mode slide and a {h}x{w} window")
        images = x.detach().float().cpu().numpy()
        chunks = [images[i:i + 1] for i in range(len(images))] if self.batch_one else [images]
        logits = np.concatenate([self.session.run(None, {self.input_name: chunk})[0] for chunk in chunks])
        return torch.from_numpy(logits).to(x.device)
