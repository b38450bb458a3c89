"""Chaos: MNIST on P processes x D devices under `jaxdist.launch --max_restarts`, with faults.

    python -m drills.chaos                           # 2 x 4: 3 SIGKILLs, 1 SIGSTOP, then elastic
    python -m drills.chaos --kills 5 --freezes 2 --seed 3 --json chaos.json

1. A reference run, uninterrupted.
2. The chaos run: a driver SIGKILLs a random process `--kills` times and freezes one with SIGSTOP
   `--freezes` times, each at a random step event (a progress line read from the job, never a
   delay). The job must finish on its own (the hang watchdog turns a freeze into exit 75; the
   launcher restarts; the processes resume from the latest checkpoint) with final parameters
   bitwise equal to the reference.
3. Elastic (`--elastic true`, the default): one process is killed for good mid-run (its command then
   exits at once, as a dead host would). The launcher re-forms the job on the processes left;
   they resume on the smaller mesh with the same global batches. The final parameters are
   compared (rtol 1e-5) with a run that continued the reference's checkpoint of the same step on
   that smaller job.

Prints a table per fault (steps lost, seconds from the fault to training again) and a summary;
exit 0 only when every check held. `--workdir` is emptied first, but only a directory this
command made (it holds the `.jaxdist-chaos` marker) or an empty one: any other is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jaxdist.config import parse_config
from jaxdist.errors import EXIT_USAGE, UsageError

STEP = re.compile(r"\| step (\d+)/(\d+)")
RESUMED = re.compile(r"resuming at step (\d+)")
FAIL_SAFE_SECONDS = 1800  # only turns a stuck job into a failure
MARKER = ".jaxdist-chaos"  # in every work dir this command made: the only ones it empties


@dataclasses.dataclass(frozen=True)
class Config:
    processes: int = 2
    """processes of the job"""
    devices_per_process: int = 4
    """virtual CPU devices per process"""
    kills: int = 3
    """SIGKILLs of a random process"""
    freezes: int = 1
    """SIGSTOPs of a random process"""
    max_restarts: int = 5
    """the launcher's --max_restarts"""
    hang_timeout: float = 20.0
    """the jobs' --hang_timeout: how long a freeze goes unnoticed"""
    elastic: bool = True
    """then kill one process for good and finish on fewer"""
    epochs: float = 1.0
    """epochs of MNIST each job trains"""
    global_batch: int = 128
    """images per step"""
    checkpoint_every: int = 25
    """steps between checkpoints"""
    seed: int = 0
    """which faults, where and when"""
    workdir: str = "runs/chaos"
    """emptied first: only a directory this command made (with its .jaxdist-chaos marker), or an
    empty or new one"""
    json: str | None = None
    """also write the results here"""


def prepare_workdir(out: Path) -> None:
    """Makes `out` an empty work dir holding `MARKER`: created, or emptied if this command made
    it (the marker is there) or it is empty already.

    Raises:
        UsageError: `out` is a file, or a directory with contents but no marker (`--workdir .`
            or a typo must never wipe a tree), or cannot be created.
    """
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--workdir {out} is not a directory")
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise UsageError(f"--workdir {out} was not made by drills.chaos (it has files "
                             f"and no {MARKER} marker) and would be emptied; name a new or empty "
                             f"directory")
        for child in out.iterdir():  # the contents, not the directory (it may be the cwd)
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by python -m drills.chaos, which empties this "
                                  "directory when run on it again\n")
    except OSError as e:
        raise UsageError(f"--workdir {out} cannot be created: {e.strerror or e}") from None


class Job:
    """A `jaxdist.launch` job whose output lines are read as they come (and echoed to a log)."""

    def __init__(self, launch_args: list[str], command: list[str], log: Path, env: dict):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxdist.launch", *launch_args, "--", *command],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self.ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            with self._changed:
                self.lines.append((time.monotonic(), line))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, predicate, after: int = 0) -> tuple[int, float, object]:
        """(line index, time, value) of the first line from index `after` on where
        `predicate(line)` is truthy; None when the job ended first."""
        seen = after
        deadline = time.monotonic() + FAIL_SAFE_SECONDS
        with self._changed:
            while True:
                for i in range(seen, len(self.lines)):
                    value = predicate(self.lines[i][1])
                    if value:
                        return i, self.lines[i][0], value
                seen = len(self.lines)
                if self.ended or time.monotonic() > deadline:
                    return None
                self._changed.wait(5)

    def finish(self) -> int:
        try:
            code = self.proc.wait(timeout=FAIL_SAFE_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        with self._changed:
            while not self.ended:
                self._changed.wait(5)
        self.log.close()
        return code

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def step_at_least(step: int):
    return lambda line: (lambda m: int(m.group(1)) if m and int(m.group(1)) >= step else None)(
        STEP.search(line))


def any_step(line: str):
    m = STEP.search(line)
    return int(m.group(1)) if m else None


def slot_pid(run_dir: Path, slot: int) -> int:
    return json.loads((run_dir / f"slot_{slot}.json").read_text())["pid"]


def mnist_command(args, workdir: Path, dead_dir: Path | None = None) -> list[str]:
    flags = ["--epochs", str(args.epochs), "--global_batch", str(args.global_batch),
             "--checkpoint_every", str(args.checkpoint_every), "--keep_checkpoints", "1000",
             "--keep_best", "0", "--progress", "true", "--progress_every", "0",
             "--hang_timeout", str(args.hang_timeout), "--eval_examples", "2000",
             "--workdir", str(workdir)]
    python = [sys.executable, "-m", "experiments.mnist", *flags]
    if dead_dir is None:
        return python
    # a dead host: once its marker exists, the slot's command exits at once
    return ["sh", "-c", f'test -e {dead_dir}/dead_$JAXDIST_SLOT && exit 1; exec "$@"', "sh",
            *python]


def final_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    from jaxdist.io import read_checkpoint_arrays

    return read_checkpoint_arrays(workdir / "checkpoints", step)


def compare(a: dict, b: dict) -> tuple[bool, float]:
    """(bitwise equal, largest relative difference) over every array of two states."""
    assert a.keys() == b.keys(), "the two states hold different arrays"
    equal, worst = True, 0.0
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        equal = equal and np.array_equal(a[k], b[k])
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y) / (np.abs(y) + 1e-6))))
    return equal, worst


def run_reference(args, out: Path, env: dict) -> tuple[int, float]:
    """(total steps, wall seconds) of the uninterrupted job."""
    start = time.monotonic()
    job = Job(["-n", str(args.processes), "--devices_per_process", str(args.devices_per_process)],
              mnist_command(args, out / "reference"), out / "reference.log", env)
    code = job.finish()
    if code != 0:
        raise SystemExit(f"error: the reference run failed ({code}); see {out / 'reference.log'}")
    steps = max(any_step(line) or 0 for _, line in job.lines)
    return steps, time.monotonic() - start


def inject(job: Job, kind: str, slot: int, run_dir: Path, after: int) -> dict:
    """Sends the fault; returns its record once the job trains again (or ended)."""
    pid = slot_pid(run_dir, slot)
    os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    t_fault = time.monotonic()
    index = len(job.lines)
    steps = [s for s in (any_step(line) for _, line in job.lines[after:index]) if s]
    seen = (None, None, max(steps)) if steps else None  # the last step reported before it
    restarted = job.wait_for(lambda line: "[launch] restart" in line, index)
    resumed = job.wait_for(lambda line: RESUMED.search(line), index)
    training = job.wait_for(any_step, resumed[0] if resumed else index)
    record = {"fault": kind, "slot": slot, "at_step": seen[2] if seen else None,
              "detected_seconds": restarted[1] - t_fault if restarted else None,
              "resumed_at": int(resumed[2].group(1)) if resumed else None,
              "seconds_lost": training[1] - t_fault if training else None,
              "cause": restarted and job.lines[restarted[0]][1].split(": ", 1)[-1].strip()}
    if record["at_step"] is not None and record["resumed_at"] is not None:
        record["steps_lost"] = record["at_step"] - record["resumed_at"]
    record["_next"] = training[0] if training else len(job.lines)
    return record


def run_chaos(args, out: Path, env: dict, total: int, rng: random.Random) -> tuple[list, int]:
    run_dir = out / "chaos-run"
    faults = ["kill"] * args.kills + ["freeze"] * args.freezes
    rng.shuffle(faults)
    lo, hi = int(0.1 * total), int(0.9 * total)
    targets = sorted(rng.sample(range(lo, hi), len(faults))) if faults else []
    job = Job(["-n", str(args.processes), "--devices_per_process", str(args.devices_per_process),
               "--max_restarts", str(args.max_restarts), "--run_dir", str(run_dir)],
              mnist_command(args, out / "chaos"), out / "chaos.log", env)
    records, after = [], 0
    for kind, target in zip(faults, targets):
        hit = job.wait_for(step_at_least(target), after)
        if hit is None:
            break
        slot = rng.randrange(args.processes)
        record = inject(job, kind, slot, run_dir, hit[0])
        print(f"  {kind:6s} process slot {slot} at step {record['at_step']}: resumed at "
              f"{record['resumed_at']}, {record['seconds_lost'] or float('nan'):.1f} s lost",
              flush=True)
        after = record.pop("_next")
        records.append(record)
    code = job.finish()
    return records, code


def run_elastic(args, out: Path, env: dict, total: int, reference_dir: Path) -> dict:
    run_dir, dead = out / "elastic-run", out / "elastic-dead"
    dead.mkdir(parents=True, exist_ok=True)
    job = Job(["-n", str(args.processes), "--devices_per_process", str(args.devices_per_process),
               "--max_restarts", str(args.max_restarts), "--min_processes", "1",
               "--run_dir", str(run_dir)], mnist_command(args, out / "elastic", dead),
              out / "elastic.log", env)
    hit = job.wait_for(step_at_least(total // 2))
    lost_slot = args.processes - 1
    (dead / f"dead_{lost_slot}").touch()
    record = inject(job, "kill", lost_slot, run_dir, hit[0] if hit else 0)
    record.pop("_next")
    record["fault"] = "kill for good"
    code = job.finish()
    record["exit"] = code
    text = job.text()
    record["reformed"] = f"re-forming the job with {args.processes - 1} process(es)" in text
    resumed = record["resumed_at"]
    if code != 0 or resumed is None:
        return record
    # the reference for it: the uninterrupted run's checkpoint of that step, continued on the
    # smaller job
    continued = out / "elastic-reference"
    (continued / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(reference_dir / "checkpoints" / str(resumed),
                    continued / "checkpoints" / str(resumed))
    ref = Job(["-n", str(args.processes - 1), "--devices_per_process",
               str(args.devices_per_process)], mnist_command(args, continued),
              out / "elastic-reference.log", env)
    if ref.finish() != 0:
        record["reference_failed"] = True
        return record
    equal, worst = compare(final_arrays(out / "elastic", total), final_arrays(continued, total))
    record.update(bitwise=equal, max_relative_difference=worst)
    return record


def machine() -> str:
    from jaxdist.observe.machine import describe_machine

    return describe_machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_config(lambda variant: Config(), argv, description=__doc__.split("\n\n")[0])
    if args.processes < 2 and args.elastic:
        return _usage("--elastic needs at least 2 processes (or --elastic false)")
    if min(args.kills, args.freezes, args.max_restarts) < 0 or args.hang_timeout <= 0:
        return _usage("--kills, --freezes and --max_restarts must be >= 0, --hang_timeout > 0")
    if args.kills + args.freezes > args.max_restarts:
        return _usage("more faults than --max_restarts: the job could not survive them all")
    out = Path(args.workdir)
    try:
        prepare_workdir(out)
    except UsageError as e:
        return _usage(e)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    # the runtime's heartbeat check would end a frozen job too; leave that to the watchdog
    env.setdefault("JAXDIST_HEARTBEAT_TIMEOUT", str(int(3 * args.hang_timeout) + 30))
    rng = random.Random(args.seed)
    print(f"chaos on {machine()}", flush=True)
    print(f"reference: {args.processes} x {args.devices_per_process} devices, uninterrupted",
          flush=True)
    total, reference_seconds = run_reference(args, out, env)
    print(f"  {total} steps in {reference_seconds:.1f} s", flush=True)
    print(f"chaos: {args.kills} SIGKILL(s) and {args.freezes} SIGSTOP(s) at random step events, "
          f"--max_restarts {args.max_restarts}, --hang_timeout {args.hang_timeout:g}", flush=True)
    t0 = time.monotonic()
    faults, code = run_chaos(args, out, env, total, rng)
    chaos_seconds = time.monotonic() - t0
    survived = code == 0 and (out / "chaos" / "checkpoints" / str(total)).is_dir()
    bitwise = survived and compare(final_arrays(out / "chaos", total),
                                   final_arrays(out / "reference", total))[0]
    summary = {"machine": machine(), "total_steps": total,
               "reference_seconds": reference_seconds, "chaos_seconds": chaos_seconds,
               "faults_injected": len(faults), "survived": survived, "bitwise_equal": bitwise,
               "faults": faults}
    ok = survived and bitwise and len(faults) == args.kills + args.freezes
    if args.elastic:
        print("elastic: one process killed for good at mid-run", flush=True)
        elastic = run_elastic(args, out, env, total, out / "reference")
        summary["elastic"] = elastic
        ok = ok and elastic.get("exit") == 0 and elastic.get("reformed") and \
            elastic.get("max_relative_difference", 1.0) <= 1e-5
    print(format_table(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(("PASS" if ok else "FAIL") + f": see {out}/*.log", flush=True)
    return 0 if ok else 1


def _usage(message) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def format_table(s: dict) -> str:
    rows = ["", "| fault | process slot | at step | resumed at | steps lost | ended by "
                "| detected after (s) | seconds lost |", "|---|---|---|---|---|---|---|---|"]
    every = s["faults"] + ([s["elastic"]] if "elastic" in s else [])
    for f in every:
        rows.append(f"| {f['fault']} | {f['slot']} | {f['at_step']} | {f['resumed_at']} | "
                    f"{f.get('steps_lost', '-')} | {_ended_by(f.get('cause'))} | "
                    f"{_num(f['detected_seconds'])} | {_num(f['seconds_lost'])} |")
    lost = [f["seconds_lost"] for f in s["faults"] if f["seconds_lost"] is not None]
    rows.append("")
    rows.append(f"{s['faults_injected']} faults injected, "
                f"{'all survived' if s['survived'] else 'the job did not finish'}; final "
                f"parameters {'bitwise equal to' if s['bitwise_equal'] else 'DIFFER from'} the "
                f"uninterrupted run; {s['chaos_seconds']:.0f} s vs {s['reference_seconds']:.0f} s "
                f"uninterrupted" + (f"; {sum(lost) / len(lost):.1f} s lost per fault on average"
                                    if lost else ""))
    if "elastic" in s:
        e = s["elastic"]
        rows.append(f"elastic: exit {e.get('exit')}, re-formed {e.get('reformed')}, largest "
                    f"relative difference to the continued reference "
                    f"{e.get('max_relative_difference', float('nan')):.2e} (bitwise "
                    f"{e.get('bitwise')})")
    return "\n".join(rows)


def _ended_by(cause: str | None) -> str:
    """What ended the incarnation, from the launcher's restart line."""
    if not cause:
        return "-"
    if "hang watchdog" in cause:
        return "hang watchdog (75)"
    signals = sorted(set(re.findall(r"signal (SIG\w+)", cause)))
    return ", ".join(signals) or cause.split(";")[0]


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    sys.exit(main())
