"""First-step time of a restarted job: cold vs warm persistent compilation cache.

    python -m experiments.bench_restart                   # the CNN smoke run, 3 rounds
    python -m experiments.bench_restart --rounds 5 -- --strategy shard_map

Each round starts `python -m experiments.mnist --config smoke` twice as a new process: once with
an empty compilation cache (cold: XLA compiles the train step) and once more with the cache the
cold run filled (warm: a restart after preemption). The first step's wall time (dispatch,
compilation or cache load, and the step itself) is read from the job's summary line. Arguments
after `--` go to the experiment.

On CPU it measures both kernel choices (`--onednn both`): XLA's own convolutions, whose programs
the cache stores, and oneDNN's (jaxdist's default, faster steps), whose programs jaxlib 0.12
cannot serialize, so a restart compiles them again.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from jaxdist.config import ArgumentParser

_FIRST_STEP = re.compile(r"first step ([0-9.]+) s")


def first_step_seconds(cache_dir: str, extra: list[str], onednn: bool) -> float:
    env = {**os.environ, "JAXDIST_CPU_ONEDNN": "1" if onednn else "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mnist", "--config", "smoke", "--progress=false",
         "--compile_cache", cache_dir, *extra],
        capture_output=True, text=True, timeout=900, env=env)
    found = _FIRST_STEP.search(proc.stdout)
    if proc.returncode or not found:
        raise RuntimeError(f"the experiment failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(prog="python -m experiments.bench_restart",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--onednn", choices=("both", "on", "off"), default="both",
                        help="CPU convolutions by oneDNN (on), by XLA (off), or each in turn")
    args = parser.parse_args(own)
    kernels = {"both": (False, True), "on": (True,), "off": (False,)}[args.onednn]
    times = {(k, c): [] for k in kernels for c in ("cold", "warm")}
    for r in range(args.rounds):
        for onednn in kernels:
            with tempfile.TemporaryDirectory() as cache:
                for cache_state in ("cold", "warm"):
                    times[onednn, cache_state].append(first_step_seconds(cache, extra, onednn))
            print(f"round {r + 1}, oneDNN {'on' if onednn else 'off'}: cold "
                  f"{times[onednn, 'cold'][-1]:.2f} s, warm {times[onednn, 'warm'][-1]:.2f} s",
                  file=sys.stderr, flush=True)
    print(f"{'convolutions':<12} | {'cold s':>6} | {'warm s':>6} | {'speed-up':>8} | rounds (cold/warm)")
    for onednn in kernels:
        cold, warm = times[onednn, "cold"], times[onednn, "warm"]
        c, w = statistics.median(cold), statistics.median(warm)
        rounds = " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(cold, warm))
        print(f"{'oneDNN' if onednn else 'XLA':<12} | {c:>6.2f} | {w:>6.2f} | {c / w:>7.1f}x | {rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
