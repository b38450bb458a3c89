"""Checkpoints of the canonical train state with orbax: async, atomic, restorable on any layout.

The state is saved in its canonical form (one logical copy; see `Trainer.canonical`), so a
checkpoint written on 8 devices restores on 4 or 1, under any strategy. Under local SGD, where
the replicas differ between averaging points, each replica's own state is saved beside it
(`replicas`), and a run with as many replicas resumes from those, exactly. A checkpoint's key is
the data iterator's position (global batches consumed): global batch k is a pure function of
(seed, k), so resuming at k reads exactly the batches an uninterrupted run would have read. The
optimizer step inside the state can be smaller (a rollback skips data). RNG streams of models that
use them (dropout) live in the state's `rest` and are saved with it.

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a step that `latest_step` would offer; leftovers of such saves are removed at start.
Deleting is made atomic the same way: an old step is first renamed into `.deleting/` (orbax's
`todelete_subdir`) and only then removed, so a crash mid-delete cannot leave half a step behind
(orbax alone unlinks a step's files in place, in parallel, in any order).

Restoring (`resume`) never throws a good checkpoint away and never splits a job: each process finds
the newest step it can read, the processes agree on the oldest of those (through the
coordinator's key-value store, `jaxdist.cluster.kv`), all read it, and agree again that every
one did. A step is moved aside (to `<step>.damaged-<time>`, never deleted; by process 0, after the
agreement) only when it is shown to be damaged (`jaxdist.io.integrity`): missing or empty files,
metadata that does not parse, a short or undecodable array file. A transient read error (EIO, a
time out) is retried; a step that still cannot be read is kept and an older one used, and when
none can be read the restore fails with `CheckpointUnavailable`, a `TransientError` the launcher
and the cluster templates restart. Restoring reads array data and JSON only: nothing from the
directory is unpickled or executed.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxdist.core.step import TrainState, is_prng_key, path_name
from jaxdist.errors import TransientError, UsageError
from jaxdist.cluster import kv
from jaxdist.io.integrity import first_line, kind_of, missing_or_broken, retrying

_DELETING = ".deleting"  # where old steps wait, already out of the listing, to be removed


class Restored(NamedTuple):
    """What a run resumes from: `step` (0: nothing), the canonical `state` (None when nothing was
    restored, or when `replicas` was restored instead), the saved `meta`, and under local SGD
    each replica's own state when the checkpoint holds them for as many replicas."""

    step: int
    state: TrainState | None
    meta: dict
    replicas: TrainState | None = None


class Checkpointer:
    """Saves every `every` steps (asynchronously), keeps the newest `keep` (and the `keep_best`
    best by `best_metric`: highest with `best_mode="max"`, lowest with "min"), restores the
    newest good one that every process can read.

    Example:
        >>> ckpt = Checkpointer(workdir / "checkpoints", every=500)
        >>> step, state, meta, _ = ckpt.resume(like=trainer.canonical(trainer.init()))
        >>> ...; ckpt.due(step) and ckpt.save(step, trainer.canonical(state), meta={"seed": 0})
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
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "replicas": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)
        # restores go through the handlers, not the manager, whose restore ends in a barrier: a
        # process whose read failed would leave the others waiting there (see `resume`)
        self._readers = {"state": ocp.StandardCheckpointHandler(),
                         "replicas": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()}
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

    def save(self, step: int, canonical: TrainState, *, replicas: TrainState | None = None,
             meta: dict | None = None, metrics: dict[str, float] | None = None) -> bool:
        """Starts an (async) save of `step`; `metrics` holding `best_metric` feed keep-best;
        `replicas`: each replica's own state where they differ (`Trainer.replicas`).

        Returns False when `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        self._empty_deleted()
        items = dict(state=ocp.args.StandardSave(canonical),
                     meta=ocp.args.JsonSave(dict(meta or {})))
        if replicas is not None:
            items["replicas"] = ocp.args.StandardSave(replicas)
        metrics = {k: float(v) for k, v in (metrics or {}).items()
                   if k == self.best_metric} or None
        return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                  force=True)

    def reached_preemption(self, step: int) -> bool:
        """Whether the job's processes agreed to stop after `step` (orbax's preemption check)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict]:
        """(state, meta) of `step` read by this process alone, the state laid out like `like`
        (arrays with shardings, or ShapeDtypeStructs). Transient errors are retried.

        Raises:
            UsageError: the checkpoint does not match `like` (another model or shape).
            CorruptCheckpoint: `step` is damaged.
            CheckpointUnavailable: it still could not be read after the retries.
        """
        try:
            state, _, meta = retrying(lambda: self._read(step, like, None), warn=self._warn(step))
        except (UsageError, CorruptCheckpoint):
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore, OS and orbax errors alike
            if kind_of(e) == "damaged":
                raise CorruptCheckpoint(step, first_line(e)) from e
            raise CheckpointUnavailable(step, first_line(e)) from e
        return state, meta

    def restore_latest(self, like: TrainState) -> tuple[int, TrainState | None, dict]:
        """(step, state, meta) of the newest good checkpoint, or (0, None, {}) when none: `resume`
        without per-replica states."""
        step, state, meta, _ = self.resume(like)
        return step, state, meta

    def resume(self, like: TrainState, *, replicas_like: TrainState | None = None,
               step: int | None = None, below: int | None = None) -> Restored:
        """The newest step every process can read (or `step`; or the newest before `below`),
        restored on all processes alike; call it on every process.

        Each process looks for the newest step whose files are whole; the job takes the oldest of
        those; every process reads it, and they agree that all did. Steps shown to be damaged are
        moved aside once the job agrees (by process 0), with a warning; a step some process could
        not read for another reason is kept and the next older one tried. `replicas_like` (the
        per-replica layout under local SGD) restores each replica's own state when the checkpoint
        holds them for as many replicas; otherwise the canonical state (their mean), with one
        line saying so.

        Raises:
            UsageError: the checkpoint does not match `like`; `step` is damaged.
            CheckpointUnavailable: no step could be read now (a restart may succeed).
        """
        damaged: dict[int, str] = {}
        kept: dict[int, str] = {}
        while True:
            mine, found_damaged, found_kept = (step, {}, {}) if step is not None else \
                self._newest_whole(below, damaged.keys() | kept.keys())
            views = kv.allgather("checkpoint-candidates", {
                "step": mine, "damaged": found_damaged, "kept": found_kept})
            for view in views:
                damaged.update({int(s): r for s, r in view["damaged"].items()})
                kept.update({int(s): r for s, r in view["kept"].items() if int(s) not in damaged})
            candidates = [view["step"] for view in views]
            if None in candidates:
                if kept:
                    raise CheckpointUnavailable(*max(kept.items()), every=sorted(kept))
                self._set_aside(damaged)
                return Restored(0, None, {})
            agreed = min(candidates)
            state, replicas, meta, outcome = self._attempt(agreed, like, replicas_like)
            outcomes = kv.allgather("checkpoint-read", outcome)
            failed = [(i, o) for i, o in enumerate(outcomes) if o["kind"] != "ok"]
            if not failed:
                self._set_aside(damaged)
                if replicas is None:
                    self._say_mean(agreed, replicas_like)
                return Restored(agreed, state, meta, replicas)
            self._raise_if_final(agreed, failed, explicit=step is not None)
            process, outcome = failed[0]
            if any(o["kind"] == "damaged" for _, o in failed):
                damaged[agreed] = next(o["reason"] for _, o in failed if o["kind"] == "damaged")
            else:
                kept[agreed] = f"process {process}: {outcome['reason']}"
            below = agreed

    def _newest_whole(self, below: int | None, skip) -> tuple[int | None, dict, dict]:
        """This process's newest step before `below` whose files look whole, and the steps it
        found damaged or could not look at (step as str -> reason) on the way."""
        damaged, kept = {}, {}
        for step in sorted(self._manager.all_steps(), reverse=True):
            if (below is not None and step >= below) or step in skip:
                continue
            try:
                problem = retrying(lambda: missing_or_broken(self.directory / str(step)),
                                   warn=self._warn(step))
            except Exception as e:  # noqa: BLE001 - an I/O error reading it
                kept[str(step)] = first_line(e)
                self._warn(step)(f"{first_line(e)}; it is kept, trying an older one")
                continue
            if problem is None:
                return step, damaged, kept
            damaged[str(step)] = problem
        return None, damaged, kept

    def _attempt(self, step: int, like, replicas_like) -> tuple[Any, Any, dict, dict]:
        """(state, replicas, meta, outcome) of reading `step`; outcome["kind"]: "ok", "usage",
        "damaged", "transient" (after the retries) or "other"."""
        try:
            state, replicas, meta = retrying(lambda: self._read(step, like, replicas_like),
                                             warn=self._warn(step))
            return state, replicas, meta, {"kind": "ok"}
        except UsageError as e:
            return None, None, {}, {"kind": "usage", "reason": str(e)}
        except CorruptCheckpoint as e:
            return None, None, {}, {"kind": "damaged", "reason": e.reason}
        except Exception as e:  # noqa: BLE001 - tensorstore, OS and orbax errors alike
            return None, None, {}, {"kind": kind_of(e), "reason": first_line(e)}

    def _raise_if_final(self, step: int, failed: list[tuple[int, dict]], explicit: bool) -> None:
        """What no older step can help with: another model, an error that shows no damage (kept,
        restartable), or a damaged step that was asked for by number."""
        for process, outcome in failed:
            if outcome["kind"] == "usage":
                raise UsageError(outcome["reason"])
        for process, outcome in failed:
            if outcome["kind"] == "other":
                raise CheckpointUnavailable(step, f"process {process}: {outcome['reason']}; it "
                                                  f"is kept, since nothing shows it is damaged")
        if explicit:
            process, outcome = failed[0]
            if outcome["kind"] == "damaged":
                raise UsageError(f"checkpoint step {step} in {self.directory} is damaged "
                                 f"({outcome['reason']}); restore another step")
            raise CheckpointUnavailable(step, f"process {process}: {outcome['reason']}")

    def _read(self, step: int, like, replicas_like) -> tuple[Any, Any, dict]:
        """(state or None, replicas or None, meta) of `step`, read by this process."""
        step_dir = self.directory / str(step)
        problem = missing_or_broken(step_dir)
        if problem is not None:
            raise CorruptCheckpoint(step, problem)
        self._check_fits(step, "state", like)
        use_replicas = replicas_like is not None and (step_dir / "replicas").exists() and \
            self._saved_shapes(step, "replicas") == _shapes(replicas_like)
        item, target = ("replicas", replicas_like) if use_replicas else ("state", like)
        quiet = lambda record: "Metadata file does not exist" not in record.getMessage()  # noqa
        logging.getLogger("absl").addFilter(quiet)
        try:
            restored = self._readers[item].restore(
                step_dir / item, args=ocp.args.StandardRestore(_abstract(target)))
            meta = self._readers["meta"].restore(step_dir / "meta", args=ocp.args.JsonRestore())
        finally:
            logging.getLogger("absl").removeFilter(quiet)
        if use_replicas:
            return None, restored, dict(meta or {})
        return restored, None, dict(meta or {})

    def _saved_shapes(self, step: int, item: str) -> dict[str, tuple[int, ...]]:
        tree = self._readers[item].metadata(self.directory / str(step) / item)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        return {path_name(k): tuple(getattr(x, "shape", ()))
                for k, x in jax.tree_util.tree_leaves_with_path(tree)}

    def _check_fits(self, step: int, item: str, like: TrainState) -> None:
        have, want = self._saved_shapes(step, item), _shapes(like)
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

    def _say_mean(self, step: int, replicas_like) -> None:
        """One line when the checkpoint holds per-replica states this run does not use."""
        if jax.process_index() != 0 or not (self.directory / str(step) / "replicas").exists():
            return
        try:
            saved = self._saved_shapes(step, "replicas")["step"][0]
        except Exception:  # noqa: BLE001 - only for the message; the restore is done
            saved = "several"
        here = (f"this run has {_shapes(replicas_like)['step'][0]}" if replicas_like is not None
                else "this run has none")
        print(f"checkpoint step {step} holds the states of {saved} local-SGD replicas, {here}: "
              f"resuming from their mean (not bitwise)", file=sys.stderr, flush=True)

    def _warn(self, step: int):
        return lambda text: print(f"warning: checkpoint step {step} in {self.directory}: {text}",
                                  file=sys.stderr, flush=True)

    def _set_aside(self, damaged: dict[int, str]) -> None:
        """Process 0 moves the damaged steps aside; every process then lists the steps again."""
        if not damaged:
            return
        if jax.process_index() == 0:
            for step, reason in sorted(damaged.items()):
                source = self.directory / str(step)
                target = self.directory / f"{step}.damaged-{int(time.time())}"
                if source.exists():
                    source.rename(target)
                print(f"warning: checkpoint step {step} is damaged ({reason}); moved to "
                      f"{target.name}, an older one is used", file=sys.stderr, flush=True)
        kv.allgather("checkpoint-set-aside", True)  # renamed before anyone lists again
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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {path_name(k): _stored_shape(x) for k, x in jax.tree_util.tree_leaves_with_path(tree)}


def _abstract(like):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        like)


def _quiet_missing_metrics(record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


class CorruptCheckpoint(Exception):
    """A checkpoint step shown to be damaged (`jaxdist.io.integrity`)."""

    def __init__(self, step: int, reason: str):
        self.step = step
        self.reason = reason
        super().__init__(f"checkpoint step {step} is damaged: {reason}")


class CheckpointUnavailable(TransientError):
    """No checkpoint could be read now, though none was shown to be damaged (an I/O error that
    outlasted the retries, a process that could not read): a restart may succeed."""

    def __init__(self, step: int, reason: str, *, every: list[int] | None = None):
        self.step = step
        self.reason = reason
        what = f"checkpoint steps {every}" if every and len(every) > 1 else \
            f"checkpoint step {step}"
        super().__init__(f"{what} could not be read now ({reason}); kept, not moved aside; "
                         f"a restart may succeed")
