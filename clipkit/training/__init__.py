"""Training: the loop and its parts, one concern per module.

- ``loop``           ``train(cfg) -> run folder``: setup, steps, logging, checkpoints, resume
- ``stream``         full micro-batches epoch after epoch until the sample budget
- ``optim``          AdamW parameter groups (tower lr multipliers, no decay on 1-D / logit params)
- ``schedule``       linear warmup + cosine decay as a ``LambdaLR``
- ``checkpoint``     atomic save, sidecar-verified ``latest``, clear load errors, RNG state
- ``feature_cache``  locked-tower features computed once and memory-mapped from disk
- ``metrics``        metrics.csv, TensorBoard, curves.png

Import ``clipkit.training.loop`` for ``train``; this package itself imports nothing heavy.
"""
