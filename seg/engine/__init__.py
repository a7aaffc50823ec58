"""Training: the train loop and what assembles a run around it.

- ``loop``: ``train``, the loop by iterations (the eval loop is :mod:`seg.evaluation.loop`);
- ``trainer``: a run from its config (data, model, optimiser, resume, the validation callbacks);
- ``optim``: SGD / AdamW and the poly schedule with warm-up;
- ``graphs``: the training step replayed from CUDA graphs.
"""
