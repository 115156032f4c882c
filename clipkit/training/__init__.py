"""Training: the loop and its parts, one concern per module.

- ``loop``           ``train(cfg) -> run folder``: setup, steps, logging, checkpoints, resume
- ``stream``         full micro-batches epoch after epoch until the sample budget; ``split_inputs``
- ``run_state``      what a checkpoint holds, and restoring a run from it
- ``report``         the plan printed at start, the metrics rows
- ``optim``          AdamW parameter groups (tower lr multipliers, no decay on 1-D / logit params)
- ``schedule``       linear warmup + cosine decay as a ``LambdaLR``
- ``checkpoint``     atomic save, pruning, RNG state (reading lives in ``clipkit.models.checkpoints``)
- ``feature_cache``  locked-tower features computed once and memory-mapped from disk
- ``metrics``        metrics.csv, TensorBoard, curves.png
- ``precision``      fp32 / bf16 / fp16 (autocast, the gradient scaler) and the optimizer step under it
- ``compute``        torch.compile and gradient checkpointing of the model
- ``system``         the machine (system.json, bf16 / fp16 support detected), throughput, peak memory

Import ``clipkit.training.loop`` for ``train``; this package itself imports nothing heavy.
"""
