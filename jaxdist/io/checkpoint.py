"""Checkpoints of the canonical train state with orbax: async, atomic, restorable on any layout.

The state is saved in its canonical form (one logical copy; see `DataParallel.canonical`), so a
checkpoint written on 8 devices restores on 4 or 1, under any strategy. A checkpoint's key is the
data iterator's position (global batches consumed): global batch k is a pure function of
(seed, k), so resuming at k reads exactly the batches an uninterrupted run would have read. The
optimizer step inside the state can be smaller (a rollback skips data). RNG streams of models that
use them (dropout) live in the state's `rest` and are saved with it. Under local SGD the canonical
state is the replica mean, so resume is exact only at averaging points (save every multiple of H).

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a step that `latest_step` would offer; leftovers of such saves are removed at start.
Deleting is made atomic the same way: an old step is first renamed into `.deleting/` (orbax's
`todelete_subdir`) and only then removed, so a crash mid-delete cannot leave half a step behind
(orbax alone unlinks a step's files in place, in parallel, in any order).
A checkpoint that still fails to read (a disk error, a truncated copy) is moved aside, never
deleted, and the next older one is used. Restoring reads array data and JSON only: nothing from the
directory is unpickled or executed.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxdist.errors import UsageError
from jaxdist.core.step import TrainState, is_prng_key, path_name


_DELETING = ".deleting"  # where old steps wait, already out of the listing, to be removed


class Checkpointer:
    """Saves every `every` steps (asynchronously), keeps the newest `keep` (and the `keep_best`
    best by `best_metric`: highest with `best_mode="max"`, lowest with "min"), restores the latest
    good one.

    Example:
        >>> ckpt = Checkpointer(workdir / "checkpoints", every=500)
        >>> step, state, meta = ckpt.restore_latest(like=dp.canonical(dp.init()))
        >>> ...; ckpt.due(step) and ckpt.save(step, dp.canonical(state), meta={"seed": 0})
        >>> ckpt.close()                             # waits for the last async save
    """

    def __init__(self, directory: str | Path, *, every: int = 1000, keep: int = 3,
                 keep_best: int = 0, best_metric: str | None = None, best_mode: str = "max",
                 asynchronous: bool = True):
        if every < 1 or keep < 1 or keep_best < 0:
            raise UsageError(f"checkpoint interval and count must be >= 1 and keep_best >= 0 "
                             f"(got {every}, {keep}, {keep_best})")
        if keep_best and not best_metric:
            raise UsageError("keep_best needs best_metric: the evaluation metric to rank by")
        if best_mode not in ("max", "min"):
            raise UsageError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.best_metric = best_metric
        self.directory = Path(directory).absolute()
        self.every = every
        preserve = [policies.LatestN(n=keep)]
        if keep_best:
            preserve.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], n=keep_best,
                                           reverse=best_mode == "min",
                                           keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            # a best_fn makes orbax record metrics; saves between evaluations have none
            best_fn=(lambda m: m[best_metric]) if keep_best else None, best_mode=best_mode,
            enable_async_checkpointing=asynchronous, create=True,
            cleanup_tmp_directories=True, todelete_subdir=_DELETING)
        logging.getLogger("absl").addFilter(_quiet_missing_metrics)
        # handlers named up front so metadata can be read before the first save or restore
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)
        self._empty_deleted()

    def due(self, step: int) -> bool:
        """Whether `step` is a saving step; ask before computing the canonical state to save."""
        return step % self.every == 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None before any save with metrics)."""
        return self._manager.best_step()

    def save(self, step: int, canonical: TrainState, *, meta: dict | None = None,
             metrics: dict[str, float] | None = None) -> bool:
        """Starts an (async) save of `step`; `metrics` holding `best_metric` feed keep-best.

        Returns False when `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        self._empty_deleted()
        args = ocp.args.Composite(state=ocp.args.StandardSave(canonical),
                                  meta=ocp.args.JsonSave(dict(meta or {})))
        metrics = {k: float(v) for k, v in (metrics or {}).items()
                   if k == self.best_metric} or None
        return self._manager.save(step, args=args, metrics=metrics, force=True)

    def reached_preemption(self, step: int) -> bool:
        """Whether the job's processes agreed to stop after `step` (orbax's preemption check)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict]:
        """(state, meta) of `step`, the state laid out like `like` (arrays with shardings, or
        ShapeDtypeStructs).

        Raises:
            UsageError: the checkpoint does not match `like` (another model or shape).
            CorruptCheckpoint: the files of `step` cannot be read.
        """
        self._check_fits(step, like)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                  meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - tensorstore, OS and orbax errors alike
            raise CorruptCheckpoint(step, e) from e
        return restored.state, dict(restored.meta or {})

    def restore_latest(self, like: TrainState) -> tuple[int, TrainState | None, dict]:
        """(step, state, meta) of the newest readable checkpoint, or (0, None, {}) when none.

        An unreadable checkpoint is moved aside with a warning (to `<step>.unreadable-<time>`)
        and the next older one is tried. A checkpoint of another model is an error, not a fallback.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, like)
                return step, state, meta
            except CorruptCheckpoint as e:
                self._set_aside(step, e)
        return 0, None, {}

    def _check_fits(self, step: int, like: TrainState) -> None:
        try:
            saved = self._manager.item_metadata(step).state
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(step, e) from e
        if saved is None:
            raise CorruptCheckpoint(step, ValueError("no state metadata"))
        want = {path_name(k): _stored_shape(x)
                for k, x in jax.tree_util.tree_leaves_with_path(like)}
        have = {path_name(k): tuple(getattr(x, "shape", ()))
                for k, x in jax.tree_util.tree_leaves_with_path(saved)}
        if want.keys() != have.keys():
            extra, missing = sorted(have.keys() - want.keys()), sorted(want.keys() - have.keys())
            raise UsageError(
                f"checkpoint step {step} in {self.directory} does not fit this model/optimizer: "
                f"it has {len(have)} arrays, this run {len(want)} "
                f"(only in checkpoint: {extra[:3]}, only in this run: {missing[:3]})")
        wrong = [(k, have[k], want[k]) for k in want if have[k] != want[k]]
        if wrong:
            path, got, expected = wrong[0]
            raise UsageError(
                f"checkpoint step {step} in {self.directory} does not fit this model/optimizer: "
                f"{path} has shape {got}, this run expects {expected}")

    def _set_aside(self, step: int, error: CorruptCheckpoint) -> None:
        source = self.directory / str(step)
        target = self.directory / f"{step}.unreadable-{int(time.time())}"
        print(f"warning: checkpoint step {step} is unreadable ({error.reason}); moved to "
              f"{target.name}, trying an older one", file=sys.stderr, flush=True)
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
        self._manager.reload()

    def _empty_deleted(self) -> None:
        """Removes the steps orbax has renamed into `.deleting/`: out of every listing already, so a
        crash here leaves nothing that could be offered as a step."""
        if jax.process_index() != 0:
            return
        for step_dir in list((self.directory / _DELETING).glob("*")):
            shutil.rmtree(step_dir, ignore_errors=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        self._empty_deleted()


def read_checkpoint_arrays(directory: str | Path, step: int) -> dict[str, "np.ndarray"]:
    """Every array of the state saved at `step` as numpy, by its path in the state: for comparing
    two runs or inspecting a checkpoint without building the model (or its devices)."""
    import numpy as np

    path = Path(directory).absolute() / str(step) / "state"
    if not path.is_dir():
        raise UsageError(f"no checkpoint of step {step} in {directory}")
    # the step's metadata file is one level up; orbax's warning about it says nothing useful
    quiet = lambda record: "Metadata file does not exist" not in record.getMessage()  # noqa: E731
    logging.getLogger("absl").addFilter(quiet)
    try:
        tree = ocp.StandardCheckpointer().metadata(path)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = ocp.PyTreeCheckpointer().restore(path, restore_args=restore_args)
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def _stored_shape(x) -> tuple[int, ...]:
    """PRNG keys are stored as their key data (one more dimension)."""
    if is_prng_key(x):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape)


def _quiet_missing_metrics(record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


class CorruptCheckpoint(Exception):
    """A checkpoint whose files cannot be read."""

    def __init__(self, step: int, cause: BaseException):
        self.step = step
        self.reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        super().__init__(f"checkpoint step {step} is unreadable: {self.reason}")
