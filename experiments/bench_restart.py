"""First-step time of a restarted job: cold vs warm persistent compilation cache.

    python -m experiments.bench_restart                   # the CNN smoke run, 3 rounds
    python -m experiments.bench_restart --rounds 5 -- --strategy shard_map

Each round starts `python -m experiments.mnist --config smoke` twice as a new process: once with
an empty compilation cache (cold: XLA compiles the train step) and once more with the cache the
cold run filled (warm: a restart after preemption). The first step's wall time (dispatch,
compilation or cache load, and the step itself) is read from the job's summary line. Arguments
after `--` go to the experiment.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

_FIRST_STEP = re.compile(r"first step ([0-9.]+) s")


def first_step_seconds(cache_dir: str, extra: list[str]) -> float:
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mnist", "--config", "smoke", "--progress=false",
         "--compile_cache", cache_dir, *extra],
        capture_output=True, text=True, timeout=900, env=os.environ.copy())
    found = _FIRST_STEP.search(proc.stdout)
    if proc.returncode or not found:
        raise RuntimeError(f"the experiment failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_restart",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(own)
    cold, warm = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(first_step_seconds(cache, extra))
            warm.append(first_step_seconds(cache, extra))
        print(f"round {r + 1}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s", file=sys.stderr,
              flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{'cache':<6} | {'first step s (median)':>21} | rounds")
    print(f"{'cold':<6} | {c:>21.2f} | {' '.join(f'{x:.2f}' for x in cold)}")
    print(f"{'warm':<6} | {w:>21.2f} | {' '.join(f'{x:.2f}' for x in warm)}")
    print(f"warm restart: first step {c / w:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
