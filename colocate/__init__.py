"""colocate: train speculative-decoding drafts with the target engine on the same GPUs."""

__version__ = "0.1.0"
