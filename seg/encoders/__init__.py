"""Attention-equipped encoders for segmentation-models-pytorch (registered by ``register``)."""
