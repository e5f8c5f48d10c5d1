"""retrieval: distributed training and evaluation for image retrieval (deep metric learning)."""

__version__ = "0.1.0"
