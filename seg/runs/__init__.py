"""The run directory as a small database: how a start is decided, what a run writes, and how it resumes.

- ``start``: the start plan (fresh, resume or refuse) for every entry point and every rank;
- ``rundir``: the directory's files, lock, commit order and repair on resume;
- ``checkpoint``: saving and loading checkpoints (``weights_only``), the resume state;
- ``tracking``: TensorBoard scalars and images, and each validation's metrics record.
"""
