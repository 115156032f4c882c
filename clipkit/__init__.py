"""clipkit: train, evaluate and search with dual-encoder image-text models.

The public Python API (``clipkit/api.py``); everything else is private by convention::

    clipkit.load(spec)                                      -> Model (encode_image, encode_text, preprocess)
    clipkit.zeroshot_classifier(model, classnames, templates) -> ZeroShotClassifier
    clipkit.train(recipe_or_config, overrides)              -> run folder
    clipkit.Index.load(folder).search(query, k)             -> rows

Names are imported on first use, so ``import clipkit`` (and ``clipkit --help``) stays fast.
"""

from clipkit._version import __version__

__all__ = ["Index", "Model", "ZeroShotClassifier", "__version__", "load", "train", "zeroshot_classifier"]


def __getattr__(name: str):
    if name in __all__:
        from clipkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'clipkit' has no attribute {name!r}")
