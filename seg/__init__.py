"""Semantic segmentation with Coordinate Attention encoders.

Importing the package registers the attention-equipped encoders in
segmentation-models-pytorch, so ``smp.create_model(..., encoder_name="mobilenet_v2_ca")``
works after ``import seg``, and ``model.save_pretrained(dir)`` / ``smp.from_pretrained(dir)`` round-trip
our models (``seg/modeling/hub.py``).
"""

__version__ = "0.1.0"

from seg.modeling.attach import AttachReport, attach_attention  # noqa: E402,F401  (public: seg.attach_attention)
from seg.modeling.encoders import register as _register  # noqa: E402,F401  (side effect: smp registration)
from seg.modeling.hub import from_pretrained, install as _install_hub  # noqa: E402,F401  (public: seg.from_pretrained)

_install_hub()  # smp's save_pretrained / from_pretrained learn our models (see seg/modeling/hub.py)


def __getattr__(name: str):
    # the predictor pulls in albumentations and the inference stack; load it only when asked for
    if name == "Predictor":
        from seg.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'seg' has no attribute {name!r}")
