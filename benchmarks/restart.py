"""First-step time of a restarted job: cold vs warm persistent compilation cache.

    python -m benchmarks.restart                          # the CNN smoke run, 3 rounds
    python -m benchmarks.restart --rounds 5 -- --strategy shard_map

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

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Literal

from benchmarks import harness

_FIRST_STEP = re.compile(r"first step ([0-9.]+) s")


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    rounds: int = 3
    """rounds, each a cold and a warm start per kernel choice (the median is shown)"""
    onednn: Literal["both", "on", "off"] = "both"
    """CPU convolutions by oneDNN (on), by XLA (off), or each in turn"""


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


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = harness.parse(Config, own, __doc__)
    kernels = {"both": (False, True), "on": (True,), "off": (False,)}[args.onednn]
    caches: dict[bool, str] = {}

    def start(onednn: bool, cache_state: str) -> float:
        if cache_state == "cold":  # a new empty cache; the warm start right after reuses it
            shutil.rmtree(caches.get(onednn, ""), ignore_errors=True)
            caches[onednn] = tempfile.mkdtemp(prefix="jaxdist-bench-restart-")
        return first_step_seconds(caches[onednn], extra, onednn)

    try:
        times = harness.alternate(
            {(k, c): (lambda k=k, c=c: start(k, c)) for k in kernels for c in ("cold", "warm")},
            args.rounds, unit=" s",
            label=lambda key: f"oneDNN {'on' if key[0] else 'off'}, {key[1]} cache")
    finally:
        for cache in caches.values():
            shutil.rmtree(cache, ignore_errors=True)
    report = harness.Report(args, passthrough=extra)
    report.say("first step of a new process (dispatch, compilation or cache load, the step), "
               "seconds; the same cache for a round's cold and warm starts\n")
    rows = []
    for onednn in kernels:
        cold, warm = times[onednn, "cold"], times[onednn, "warm"]
        rounds = " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(cold.values, warm.values))
        rows.append(("oneDNN" if onednn else "XLA", f"{cold.median:.2f}", f"{warm.median:.2f}",
                     f"{cold.median / warm.median:.1f}x", rounds))
    report.table(["convolutions", "cold s", "warm s", "speed-up", "rounds (cold/warm)"], rows)
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
