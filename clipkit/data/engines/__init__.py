"""Engines that run clipkit's bulk jobs on more than one process or machine.

The local engine of each job is its own module (``clipkit.data.build``, ``clipkit.index.embed``:
a thread pool or a loop in one process). Here are the engines that hand the same work to an
existing scheduler instead, writing the same files:

    cluster.py     connect to a Ray cluster (``--address``) or start one on this machine
    ray_build.py   ``clipkit data build --engine ray``: one Ray task per shard
    (``clipkit.index.ray_embed``: ``clipkit index embed --engine ray``, Ray actors per model copy)

Ray is an optional extra (``pip install 'clipkit[ray]'``); nothing here imports it at module level.
"""
