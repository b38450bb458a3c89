"""Repeat the 8-device training in fresh processes and count hangs, per strategy.

    python -m drills.reliability --runs 20 --strategies jit,shard_map,pmap,local_sgd
    python -m drills.reliability --runs 5 -- --compute_dtype bfloat16

Each run is `python -m experiments.mnist` for `--steps` steps in a new process (a deadlock only
shows across process starts); arguments after `--` go to it. A run that exceeds `--timeout` is
killed with SIGKILL (a process stuck in a collective may ignore SIGTERM) and counted as hung.
Exits 1 if any run hung or failed.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jaxdist.config import parse_config

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Config:
    runs: int = 20
    """runs per strategy"""
    strategies: tuple[str, ...] = ("jit", "shard_map", "pmap", "local_sgd")
    """data-parallel strategies, comma-separated"""
    steps: int = 100
    """training steps per run"""
    devices: int = 8
    """virtual CPU devices of each run"""
    timeout: float = 180.0
    """seconds before a run counts as hung"""


def run_once(strategy: str, steps: int, devices: int, timeout: float, extra: list[str]) -> tuple[str, float]:
    """('ok' | 'hung' | 'failed: ...', seconds) for one training process."""
    cmd = [sys.executable, "-m", "experiments.mnist", "--strategy", strategy, "--devices",
           str(devices), "--cpu_devices", str(devices), "--global_batch", "512",
           "--max_steps", str(steps), "--eval_examples", "2000", "--progress", "false", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child with SIGKILL
        return "hung", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed (exit {proc.returncode}): {tail}", seconds
    return "ok", seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = parse_config(lambda variant: Config(), own, description=__doc__.split("\n\n")[0])
    rows = []
    for strategy in args.strategies:
        outcomes, times = [], []
        for i in range(args.runs):
            outcome, seconds = run_once(strategy, args.steps, args.devices, args.timeout, extra)
            outcomes.append(outcome)
            times.append(seconds)
            print(f"{strategy} run {i + 1}/{args.runs}: {outcome} ({seconds:.1f} s)", flush=True)
        hung = sum(o == "hung" for o in outcomes)
        failed = sum(o.startswith("failed") for o in outcomes)
        rows.append((strategy, args.runs, hung, failed, statistics.median(times)))
    print(f"\n{'strategy':<10} {'devices':>7} {'runs':>5} {'hung':>5} {'failed':>6} {'median s':>9}")
    for strategy, runs, hung, failed, med in rows:
        print(f"{strategy:<10} {args.devices:>7} {runs:>5} {hung:>5} {failed:>6} {med:>9.1f}")
    return 1 if any(r[2] or r[3] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
