"""Checkpoints (orbax)."""

from jaxdist.io.checkpoint import Checkpointer

__all__ = ["Checkpointer"]
