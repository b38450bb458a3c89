"""Whether a checkpoint step is damaged, and whether a failed read is worth retrying.

A step is set aside only when it is shown to be damaged; any other failure keeps it. The evidence:
- `missing_or_broken(step_dir)`: a cheap look at what orbax needs to restore a step, without
  reading array data: `_CHECKPOINT_METADATA` (written last, when the save was committed), each
  item's metadata (`state/_METADATA` with its tree, `meta/metadata`) as valid JSON, and for OCDBT
  storage the `manifest.ocdbt` and data files (`d/*`) present and not empty.
- `kind_of(error)` for what a read raised: "transient" (an I/O error such as EIO or ESTALE, a time
  out, a service unavailable: retried, then the step is kept), "damaged" (TensorStore's DATA_LOSS,
  OUT_OF_RANGE for a short file, NOT_FOUND for a missing one, a stream that does not decode, JSON
  that does not parse) or "other" (anything else: neither retried nor taken as damage).

Bit flips inside array data are not detected: orbax's OCDBT files carry no checksums by default.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

from jaxdist import errors

T = TypeVar("T")

RETRY_DELAYS = (1.0, 4.0)  # seconds before the 2nd and 3rd try of a read that failed transiently

_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ESTALE", "ENOLCK", "ENOBUFS", "ECOMM",
    "EREMOTEIO", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ENETDOWN", "ENETUNREACH",
    "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH") if hasattr(errno, name))
# TensorStore reports OS errors as "[OS error: <strerror>]" (mostly under FAILED_PRECONDITION)
_TRANSIENT_TEXT = (*(f"[OS error: {os.strerror(e)}]" for e in _TRANSIENT_ERRNOS),
                   "UNAVAILABLE:", "DEADLINE_EXCEEDED:")
_DAMAGE_STATUS = ("DATA_LOSS:", "OUT_OF_RANGE:", "NOT_FOUND:")


def missing_or_broken(step_dir: Path) -> str | None:
    """What makes `step_dir` unrestorable ("state/_METADATA is missing", ...), None when all
    that orbax needs is there. A failure to read (OSError other than a missing file) is raised,
    not reported: it says nothing about the files."""
    for name in ("_CHECKPOINT_METADATA", "meta/metadata"):
        problem, _ = _json_file(step_dir / name)
        if problem:
            return problem
    for item in ("state", "replicas"):
        if item == "replicas" and not (step_dir / item).exists():
            continue  # only local SGD saves each replica's state
        problem, metadata = _json_file(step_dir / item / "_METADATA")
        if problem:
            return problem
        if not isinstance(metadata, dict) or not isinstance(metadata.get("tree_metadata"), dict):
            return f"{item}/_METADATA holds no tree"
        if metadata.get("use_ocdbt", True):
            problem = _ocdbt_problem(step_dir / item, item)
            if problem:
                return problem
    return None


def _json_file(path: Path) -> tuple[str | None, object]:
    name = "/".join(path.parts[-2:]) if path.parent.name in ("state", "meta", "replicas") \
        else path.name
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return f"{name} is missing", None
    try:
        return None, json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return f"{name} is not valid JSON", None


def _ocdbt_problem(item_dir: Path, item: str) -> str | None:
    manifest = item_dir / "manifest.ocdbt"
    try:
        if manifest.stat().st_size == 0:
            return f"{item}/manifest.ocdbt is empty"
    except FileNotFoundError:
        return f"{item}/manifest.ocdbt is missing"
    for data in item_dir.glob("**/d/*"):
        if data.is_file() and data.stat().st_size == 0:
            return f"{item}/{data.relative_to(item_dir)} is empty"
    return None


def kind_of(error: BaseException) -> str:
    """"transient", "damaged" or "other" (see the module docstring)."""
    causes = list(_chain(error))
    for e in causes:
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if isinstance(e, (TimeoutError, ConnectionError)):
            return "transient"
        if any(text in str(e) for text in _TRANSIENT_TEXT):
            return "transient"
    for e in causes:
        text = str(e).lstrip()
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError)):
            return "damaged"
        if text.startswith(_DAMAGE_STATUS):
            return "damaged"
        if text.startswith("FAILED_PRECONDITION:") and "[OS error" not in text:
            return "damaged"  # a stream that does not decode (TensorStore's OS errors say so)
    return "other"


def _chain(error: BaseException):
    """`error`, its causes and contexts, and the members of exception groups."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def retrying(read: Callable[[], T], *, warn: Callable[[str], None]) -> T:
    """`read()`, tried again after `RETRY_DELAYS` while it fails transiently; the last failure
    is raised."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return read()
        except Exception as e:
            if delay is None or kind_of(e) != "transient":
                raise
            warn(f"{first_line(e)} (transient); trying again in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def first_line(e: BaseException) -> str:
    """The error's first line, at most 200 characters (TensorStore's can run to pages)."""
    return errors.first_line(e)[:200]
