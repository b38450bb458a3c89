"""Checkpoints (orbax)."""

from jaxdist.io.checkpoint import Checkpointer, read_checkpoint_arrays

__all__ = ["Checkpointer", "read_checkpoint_arrays"]
