"""clipkit: train, evaluate and search with dual-encoder image-text models."""

__version__ = "0.1.0"
