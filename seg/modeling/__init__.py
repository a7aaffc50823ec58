"""The models: attention blocks, the encoders that hold them, and everything that builds or loads a model.

- ``attention``: CoordAttention (the paper's block), SqueezeExcite, CBAM and ``make_attention``;
- ``encoders/``: MobileNetV2 and ResNet with attention, registered in smp by ``encoders.register``;
- ``attach``: the same blocks placed into any smp or timm encoder (``model.attention``);
- ``models``: the segmentation model from a config (smp architecture + optional aux head);
- ``weights``: pretrained encoder weights from files, key maps and the missing/unexpected report;
- ``hub``: smp's ``save_pretrained`` / ``from_pretrained`` round trip for our models.
"""
