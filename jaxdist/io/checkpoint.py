"""Checkpoints of the canonical train state with orbax: async, atomic, restorable on any layout.

The state is saved in its canonical form (one replicated copy; see `DataParallel.canonical`), so a
checkpoint written on 8 devices restores on 4 or 1, under any data-parallel strategy. The step is
the data iterator's position: global batch k is a pure function of (seed, k), so resuming at step
k reads exactly the batches an uninterrupted run would have read. Under local SGD the canonical
state is the replica mean, so resume is exact only at averaging points (save every multiple of H).

orbax writes each step into a temporary directory and renames it when complete; a crash mid-save
never leaves a step that `latest_step` would offer. Restoring reads array data and JSON metadata
only: nothing from the directory is unpickled or executed.
"""

from __future__ import annotations

from pathlib import Path
import jax
import orbax.checkpoint as ocp

from jaxdist.errors import UsageError
from jaxdist.train.step import TrainState


class Checkpointer:
    """Saves every `every` steps (asynchronously), keeps the newest `keep`, restores the latest.

    Example:
        >>> ckpt = Checkpointer(workdir / "checkpoints", every=500)
        >>> step = ckpt.latest_step() or 0
        >>> if step: state = dp.place(ckpt.restore(step, like=dp.canonical(dp.init())))
        >>> ...; ckpt.due(step) and ckpt.maybe_save(step, dp.canonical(state))
        >>> ckpt.close()                             # waits for the last async save
    """

    def __init__(self, directory: str | Path, *, every: int = 1000, keep: int = 3,
                 asynchronous: bool = True):
        if every < 1 or keep < 1:
            raise UsageError(f"checkpoint interval and count must be >= 1 (got {every}, {keep})")
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep,
            enable_async_checkpointing=asynchronous, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        """Whether `step` is a saving step; ask before computing the canonical state to save."""
        return step % self.every == 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def maybe_save(self, step: int, canonical: TrainState, *, force: bool = False) -> bool:
        """Starts a save when `step` is due (or `force`); returns whether one started."""
        return self._manager.save(step, args=ocp.args.StandardSave(canonical), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, like: TrainState) -> TrainState:
        """The state of `step`, laid out like `like` (arrays with shardings, or ShapeDtypeStructs).

        Raises:
            UsageError: the checkpoint does not match `like` (another model or shape).
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(
                f"checkpoint step {step} in {self.directory} does not fit this model/optimizer: "
                f"{str(e).splitlines()[0]}") from e

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
