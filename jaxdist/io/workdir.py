"""One job at a time in a work dir: `hold(workdir)` around everything a run does there.

A second job started on a work dir in use (a second launch after losing a terminal) would write,
rotate and delete the same checkpoints as the first; it ends at once instead, with a `UsageError`
naming the holder:

    work dir runs/a is in use by another job (host node1, pid 4242, since 2026-01-05 10:00:03);
    stop it or choose another work dir

How: process 0 of the job takes an exclusive `fcntl.flock` on `<workdir>/jaxdist.lock` and
writes its host, pid and start time into it (for that message); the other processes of the job
share it and take nothing. Every process learns the outcome through the coordinator, so a refused
job ends on all of them at once. The kernel drops a flock when its process dies, so a holder
killed with `kill -9` never blocks the next start, and a job restarted by `jaxdist.launch
--max_restarts` or requeued by SLURM (the previous holder already gone) starts as usual. While
it holds the lock, process 0 touches the file every `LEASE_S / 4` seconds (a heartbeat).

When the lock is held but its holder looks dead (a heartbeat older than `LEASE_S`, or a pid that
is not alive on this very host), the holder's host was probably lost and its lock not yet
released by the file server (NFSv4 does so after its lease, ~90 s): `hold` waits up to
`2 * LEASE_S` for it, then fails with a `TransientError`, which the launcher and the schedulers
restart, not with a `UsageError`.

Limitations: flock works across hosts on local disks, NFSv4 and NFSv3 with lockd (Linux emulates
it with POSIX locks there), Lustre mounted with `-o flock`, and GPFS. Where the filesystem has no
locks at all (flock fails with ENOLCK/ENOSYS/EOPNOTSUPP), only the holder record and its
heartbeat keep jobs apart, best effort (two jobs starting in the same instant may both pass).
Where flock is local to each host (NFS mounted with `local_lock=flock`/`all` or `nolock`, Lustre
with `localflock`), two jobs on different hosts are not kept apart: use a lock-capable mount or
one work dir per job.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import jax

from jaxdist.errors import TransientError, UsageError
from jaxdist.cluster import kv

LOCK_NAME = "jaxdist.lock"
LEASE_S = 60.0
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `workdir` for this job while the block runs (call it on every process).

    Raises:
        UsageError: another live job holds it (the message names its host and pid), or the
            work dir cannot be created or written.
        TransientError: its holder looks dead but its lock was not released in time.
    """
    lock = _Lock(Path(workdir)) if jax.process_index() == 0 else None
    outcome = {"kind": "ok"}
    if lock is not None:
        try:
            lock.acquire()
        except UsageError as e:
            outcome = {"kind": "usage", "message": str(e)}
        except TransientError as e:
            outcome = {"kind": "transient", "message": str(e)}
    # every process learns process 0's outcome, so a refused job ends everywhere at once
    outcome = kv.allgather("workdir-lock", outcome)[0]
    if outcome["kind"] == "usage":
        raise UsageError(outcome["message"])
    if outcome["kind"] == "transient":
        raise TransientError(outcome["message"])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class _Lock:
    """The flock, the holder record and the heartbeat of process 0."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.path = workdir / LOCK_NAME
        self.fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UsageError(f"cannot use work dir {self.workdir}: {e.strerror or e}") from None
        try:
            self._take()
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(record).encode(), 0)
        os.fsync(self.fd)
        self._beat = threading.Thread(target=self._heartbeat, name="jaxdist-workdir-lock",
                                      daemon=True)
        self._beat.start()

    def _take(self) -> None:
        """The flock (or, where the filesystem has none, a holder record that looks dead)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise UsageError(f"cannot lock work dir {self.workdir}: {e.strerror}") from None
            holder, age = self._holder()
            if holder and not _looks_dead(holder, age):
                raise UsageError(_in_use(self.workdir, holder)) from None
            return  # no locks here: the record (written next) is all there is
        holder, age = self._holder()
        if holder is None or not _looks_dead(holder, age):
            raise UsageError(_in_use(self.workdir, holder))
        deadline = time.monotonic() + 2 * LEASE_S  # a lost host's lock, not released yet
        print(f"work dir {self.workdir}: its holder (host {holder.get('host')}, pid "
              f"{holder.get('pid')}) looks dead; waiting up to {2 * LEASE_S:.0f} s for its lock",
              flush=True)
        while time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                continue
        raise TransientError(f"work dir {self.workdir} is still locked by host "
                             f"{holder.get('host')}, pid {holder.get('pid')}, which looks dead")

    def _holder(self) -> tuple[dict | None, float]:
        """The holder record (None: empty or unreadable) and its heartbeat's age in seconds."""
        try:
            text = os.pread(self.fd, 4096, 0)
            age = time.time() - os.fstat(self.fd).st_mtime
            record = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None, 0.0
        return (record if isinstance(record, dict) else None), age

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # no holder: the next job's message never names a stale one
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _looks_dead(holder: dict, heartbeat_age: float) -> bool:
    if heartbeat_age > LEASE_S:
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _in_use(workdir: Path, holder: dict | None) -> str:
    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
           if holder else "its holder is still starting")
    return (f"work dir {workdir} is in use by another job ({who}); stop it or choose another "
            f"work dir")
