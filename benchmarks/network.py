"""A slow network on one machine: the planner's step time against the measured one, and when
compression and local SGD pay (time to a target accuracy), under `jaxdist.launch --bandwidth`.

    python -m benchmarks.network                                       # both tables
    python -m benchmarks.network --part planner --models wide_cnn,vit,llama --processes 2,4
    python -m benchmarks.network --part accuracy --options fp32,bf16,int8,powersgd4,diloco8 \\
        --seeds 0,1 --target 0.98

Every run is P processes of one virtual CPU device each (`jaxdist.launch -n P`), so every
collective crosses the network; with `--rates` each job runs in its own network namespace whose
loopback carries at most that rate (`jaxdist.launch --bandwidth`), and the rate the launcher's probe
measured there is the one the models are given.

**planner**: for each model, option, P and rate, the measured seconds per step (random batches,
`--steps` steps after `--warmup`) beside the planner's estimate: the same job's measured step
time without a limit (its compute, the loopback's communication included) plus the planner's
communication time (`jaxdist.plan.comm_seconds`: alpha-beta per collective of the compiled step's
ledger) at the measured rate. Two link models: `per device` (the planner's default: each device
has the rate to itself) and `shared` (`Assumptions(devices_per_link=P)`: all P processes' traffic
through one link, which is what the namespace's one loopback is). Error = estimate / measured - 1.

**accuracy**: time to `--target` MNIST test accuracy for each option on 2 processes. Training
under a bandwidth limit is bitwise the training without one (tests/test_bandwidth.py), so the
steps to the target are measured once per option and seed on an unlimited run (evaluating every
`--eval_every` steps), and the seconds per step at each rate come from the planner part's
measurement of the same option; time to target = steps x seconds per step. Step time is linear in
1 / rate (t = c + b / rate; c, b from the two rates), so the crossover, the rate below which an
option reaches the target sooner than the fp32 all-reduce, is solved from the two lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from benchmarks import harness

RESULT = "benchmarks.network result: "
UNLIMITED = "none"

Option = Literal["fp32", "jit", "fsdp", "bf16", "int8", "topk", "powersgd4", "powersgd1",
                 "local_sgd8", "diloco8"]
# name -> (description, the run flags it sets: jaxdist.train.run_config.ParallelConfig's fields)
OPTIONS = {
    "fp32": ("fp32 all-reduce (shard_map)", {"strategy": "shard_map"}),
    "jit": ("fp32 all-reduce (jit, XLA's)", {"strategy": "jit"}),
    "fsdp": ("FSDP (fsdp=P)", {"strategy": "fsdp"}),
    "bf16": ("bf16 all-reduce", {"strategy": "shard_map", "grad_reduce": "bf16"}),
    "int8": ("int8 all-reduce", {"strategy": "shard_map", "grad_reduce": "int8"}),
    "topk": ("top-1% + error feedback",
             {"strategy": "shard_map", "grad_reduce": "topk", "topk_fraction": 0.01}),
    "powersgd4": ("PowerSGD rank 4", {"strategy": "shard_map", "grad_reduce": "powersgd",
                                      "powersgd_rank": 4}),
    "powersgd1": ("PowerSGD rank 1", {"strategy": "shard_map", "grad_reduce": "powersgd",
                                      "powersgd_rank": 1}),
    "local_sgd8": ("local SGD, H = 8", {"strategy": "local_sgd", "local_steps": 8}),
    "diloco8": ("DiLoCo, H = 8", {"strategy": "local_sgd", "local_steps": 8,
                                  "outer_optimizer": "nesterov"}),
}
# the planner part's models: registry name -> (size, examples per step over all processes)
MODELS = {"cnn": (None, 128), "wide_cnn": (None, 128), "vit": ("small", 64),
          "llama": ("tiny", 16), "lm": ("tiny", 16)}
Model = Literal[tuple(MODELS)]  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    part: Literal["both", "planner", "accuracy"] = "both"
    """which table: planner (estimate vs measured step time), accuracy (time to target), both"""
    models: tuple[Model, ...] = ("wide_cnn", "vit", "llama")
    """planner part: models (registry names; vit is ViT-small, llama/lm their tiny size)"""
    options: tuple[Option, ...] = ("fp32", "fsdp", "bf16", "int8", "powersgd4", "diloco8")
    """how gradients travel, comma-separated (fsdp: planner part only)"""
    processes: tuple[int, ...] = (2, 4)
    """planner part: processes (one device each), comma-separated"""
    rates: tuple[str, ...] = ("1gbit", "100mbit")
    """the two (or more) limits, tc's syntax, comma-separated; the unlimited run is added"""
    steps: int = 16
    """planner part: timed steps per run (a multiple of local SGD's H)"""
    warmup: int = 3
    """planner part: untimed steps before them"""
    rounds: int = 1
    """planner part: runs of each row (the median is shown)"""
    target: float = 0.98
    """accuracy part: the MNIST test accuracy to reach"""
    accuracy_model: Literal["cnn", "wide_cnn"] = "wide_cnn"
    """accuracy part: the model (the experiment's recipe: Adam one-cycle, global batch 128)"""
    epochs: float = 1.0
    """accuracy part: the length of each run (the one-cycle schedule's too)"""
    eval_every: int = 25
    """accuracy part: steps between evaluations on the test set"""
    seeds: tuple[int, ...] = (0, 1)
    """accuracy part: seeds, comma-separated"""
    data_dir: str | None = None
    """TFDS data dir (default: $TFDS_DATA_DIR, else ../shared/data/tensorflow_datasets)"""
    steps_cache: str = ""
    """accuracy part: a JSON file keeping each run's accuracy curve up to the target (training
    is deterministic, so a later run with the same settings reads it instead); '' keeps none"""


# -- one process of a planner-part job

def step_worker(model: str, option: str, steps: int, warmup: int) -> None:
    """Times `steps` steps of `model` trained with `option`; process 0 prints the result line
    with the step's collectives (from its compiled HLO)."""
    from jaxdist.cluster import configure_cpu_devices, initialize

    configure_cpu_devices()
    initialize()
    import jax
    import numpy as np
    import optax

    from jaxdist import STRATEGIES, Trainer
    from jaxdist.models import get_model
    from jaxdist.plan import analyze_step
    from jaxdist.train.run_config import ParallelConfig, RunConfig, trainer_options

    size, global_batch = MODELS[model]
    variant = get_model(model).variant(size)
    flags = OPTIONS[option][1]
    cfg = RunConfig(parallel=ParallelConfig(**flags))
    build = variant.model_fn(0)
    data_parallel = STRATEGIES[cfg.parallel.strategy].parallelism == "data"
    trainer = Trainer(build() if data_parallel else build, optax.adam(1e-3), variant.loss_fn,
                      **trainer_options(cfg))
    rows = global_batch // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    batches = [trainer.shard_batch(variant.random_batch(rows, rng)) for _ in range(4)]
    # every process compiles the analysis (nothing runs) before the timing, so none waits on it
    ledger = analyze_step(trainer, variant.random_batch(global_batch)).ledger
    seconds = harness.step_seconds(trainer, trainer.init(), batches, steps=steps,
                                   warmup=warmup)[0].median
    if jax.process_index() != 0:
        return
    every = cfg.parallel.local_steps if cfg.parallel.strategy == "local_sgd" else 1
    print(RESULT + json.dumps({
        "step_seconds": seconds, "processes": jax.process_count(), "averages_every": every,
        "collectives": [[c.kind, c.group_size, c.count, c.payload_bytes]
                        for c in ledger.collectives]}), flush=True)


# -- the driver

@dataclasses.dataclass(frozen=True)
class Measurement:
    step_seconds: float
    rate_bits: float | None  # what the probe measured inside the namespace; None: no limit
    ledger: object  # jaxdist.observe.Ledger, a step's collectives (per step: local SGD's / H)


def _ledger(result: dict):
    from jaxdist.observe.ledger import Collective, Ledger

    every = result["averages_every"]
    # local SGD averages on one step in H: per step, its collectives count 1 / H
    return Ledger([Collective(kind, group, count, payload / every)
                   for kind, group, count, payload in result["collectives"]])


PROBE = re.compile(r"bandwidth: asked \S+, measured ([\d.]+) (G|M|k)?bit/s")


def measured_rate(text: str) -> float | None:
    """Bits per second from the launcher's probe line; None where there is none."""
    found = PROBE.search(text)
    if not found:
        return None
    return float(found.group(1)) * {"G": 1e9, "M": 1e6, "k": 1e3, None: 1.0}[found.group(2)]


def launch(processes: int, rate: str, command: list[str], stdout=None):
    """`command` as a job of `processes` processes, one device each, under `rate`: finished
    (a `CompletedProcess`, its output captured), or started (a `Popen`) with `stdout` a file."""
    limit = [] if rate == UNLIMITED else ["--bandwidth", rate]
    argv = [sys.executable, "-m", "jaxdist.launch", "-n", str(processes), "--devices_per_process",
            "1", *limit, "--", *command]
    env = {**os.environ, "JAXDIST_CPU_DEVICES": "1"}
    if stdout is not None:
        return subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)


def measure_step(model: str, option: str, processes: int, rate: str, cfg: Config
                 ) -> Measurement:
    call = f"step_worker({model!r}, {option!r}, {cfg.steps}, {cfg.warmup})"
    proc = launch(processes, rate, [sys.executable, "-c",
                                    f"from benchmarks.network import step_worker; {call}"])
    lines = [line.split(RESULT, 1)[1] for line in proc.stdout.splitlines() if RESULT in line]
    if proc.returncode or not lines:
        raise RuntimeError(f"{model} {option} on {processes} processes at {rate} failed (exit "
                           f"{proc.returncode}): {(proc.stdout + proc.stderr).strip()[-800:]}")
    result = json.loads(lines[-1])
    rate_bits = None if rate == UNLIMITED else measured_rate(proc.stderr + proc.stdout)
    if rate != UNLIMITED and rate_bits is None:
        raise RuntimeError(f"no probe line from the launcher at {rate}")
    return Measurement(result["step_seconds"], rate_bits, _ledger(result))


def estimate(compute_seconds: float, ledger, rate_bits: float, devices_per_link: int) -> float:
    """The planner's step time: measured compute plus its communication at `rate_bits`."""
    from jaxdist.plan import Assumptions, comm_seconds

    return compute_seconds + comm_seconds(
        ledger, Assumptions(bandwidth_gbps=rate_bits / 1e9, devices_per_link=devices_per_link))


def median_measurement(rounds: int, run) -> Measurement:
    runs = [run() for _ in range(rounds)]
    seconds = statistics.median(m.step_seconds for m in runs)
    rates = [m.rate_bits for m in runs if m.rate_bits]
    return Measurement(seconds, statistics.median(rates) if rates else None, runs[0].ledger)


def planner_part(cfg: Config, report: harness.Report, options: tuple[str, ...]) -> dict:
    """Runs every row; prints the table; returns {(model, option, P, rate): Measurement}."""
    measured = {}
    keys = [(model, option, p, rate) for model in cfg.models for option in options
            for p in cfg.processes for rate in (UNLIMITED, *cfg.rates)]
    for n, key in enumerate(keys, 1):
        harness.progress(f"[{n}/{len(keys)}] {key[0]} {key[1]}, {key[2]} processes, "
                         f"rate {key[3]}")
        measured[key] = median_measurement(cfg.rounds, lambda: measure_step(*key, cfg))
    rows = []
    for (model, option, p, rate), m in measured.items():
        if rate == UNLIMITED:
            continue
        compute = measured[model, option, p, UNLIMITED].step_seconds
        wire = m.ledger.total(wire=True)
        per_device = estimate(compute, m.ledger, m.rate_bits, 1)
        shared = estimate(compute, m.ledger, m.rate_bits, p)
        rows.append((model, OPTIONS[option][0], p, rate, _rate(m.rate_bits),
                     f"{wire / 2**20:.3f}", f"{1e3 * compute:.1f}", f"{1e3 * m.step_seconds:.1f}",
                     f"{1e3 * per_device:.1f}", f"{per_device / m.step_seconds - 1:+.0%}",
                     f"{1e3 * shared:.1f}", f"{shared / m.step_seconds - 1:+.0%}"))
    report.say(f"\n## The planner's step time against the measured one\n\n"
               f"{cfg.steps} timed steps after {cfg.warmup}, median of {cfg.rounds} run(s); "
               f"one device per process; MiB = ring wire bytes per device per step (ledger; "
               f"local SGD's / H); compute = the same job's ms/step without a limit; estimates "
               f"= compute + the planner's communication at the probed rate, with each device "
               f"on its own link (planner default) or all P on one shared link.\n")
    report.table(["model", "option", "P", "limit", "probed", "MiB/step", "compute ms",
                  "measured ms", "per-device link ms", "error", "shared link ms", "error"], rows)
    return measured


def _rate(bits: float | None) -> str:
    from jaxdist.cluster.bandwidth import format_rate

    return "-" if bits is None else format_rate(bits)


def eval_curve(option: str, seed: int, cfg: Config) -> list[tuple[int, float]]:
    """[(step, test accuracy)] of a 2-process unlimited run of the MNIST experiment with
    `option`, evaluated every `cfg.eval_every` steps, up to the first evaluation that reaches
    `cfg.target` (the job is then stopped: SIGTERM, it saves and exits 0) or the run's end."""
    import signal
    import time

    flags = OPTIONS[option][1]
    with tempfile.TemporaryDirectory(prefix="jaxdist-network-") as work:
        command = [sys.executable, "-m", "experiments.mnist", "--model", cfg.accuracy_model,
                   "--epochs", str(cfg.epochs), "--seed", str(seed), "--eval_every",
                   str(cfg.eval_every), "--workdir", work, "--compile_cache", "off",
                   "--progress_every", "0",
                   *[a for k, v in flags.items() for a in (f"--{k}", str(v))]]
        if cfg.data_dir:
            command += ["--data_dir", cfg.data_dir]
        metrics = Path(work) / "logs" / "metrics.jsonl"

        def evals() -> list[tuple[int, float]]:
            text = metrics.read_text() if metrics.exists() else ""
            records = [json.loads(line) for line in text.splitlines() if line.endswith("}")]
            return [(r["step"], r["test_accuracy"]) for r in records if "test_accuracy" in r]

        with tempfile.TemporaryFile("w+") as log:
            job = launch(2, UNLIMITED, command, stdout=log)
            while job.poll() is None:
                if any(accuracy >= cfg.target for _, accuracy in evals()):
                    job.send_signal(signal.SIGTERM)
                    break
                time.sleep(1.0)
            if job.wait() != 0:
                log.seek(0)
                raise RuntimeError(f"{option} seed {seed} failed (exit {job.returncode}): "
                                   f"{log.read().strip()[-800:]}")
        return evals()


def first_reaching(curve: list[tuple[int, float]], target: float) -> tuple[int | None, float]:
    """(the first evaluated step at or above `target`, None if none; the best accuracy)."""
    reached = [step for step, accuracy in curve if accuracy >= target]
    return (min(reached) if reached else None), max(accuracy for _, accuracy in curve)


def line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(c, b) of t = c + b / rate through measured (rate, seconds) points (least squares)."""
    xs, ys = [1 / r for r, _ in points], [t for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def crossover(steps: float, c: float, b: float, steps_ref: float, c_ref: float, b_ref: float
              ) -> float | None:
    """The rate at which steps (c + b / r) = steps_ref (c_ref + b_ref / r), or None."""
    slope = steps * b - steps_ref * b_ref  # coefficient of 1 / r
    offset = steps_ref * c_ref - steps * c
    if slope == 0 or offset == 0 or (slope / offset) <= 0:
        return None
    return slope / offset


def steps_reached(cfg: Config, options: tuple[str, ...]) -> dict:
    """{(option, seed): (steps to the target or None, best accuracy)}, from `cfg.steps_cache`
    where it has them."""
    cache = Path(cfg.steps_cache) if cfg.steps_cache else None
    known = json.loads(cache.read_text()) if cache and cache.exists() else {}
    reached = {}
    for n, (option, seed) in enumerate([(o, s) for o in options for s in cfg.seeds], 1):
        key = (f"{cfg.accuracy_model} {option} seed={seed} epochs={cfg.epochs} "
               f"eval_every={cfg.eval_every} until={cfg.target}")
        if key not in known:
            harness.progress(f"[{n}/{len(options) * len(cfg.seeds)}] accuracy curve: "
                             f"{option}, seed {seed}")
            known[key] = eval_curve(option, seed, cfg)
            if cache:
                cache.write_text(json.dumps(known, indent=1))
        reached[option, seed] = first_reaching(known[key], cfg.target)
    return reached


def accuracy_part(cfg: Config, report: harness.Report, measured: dict,
                  options: tuple[str, ...]) -> None:
    reached = steps_reached(cfg, options)
    rows, lines = [], {}
    for option in options:
        steps = [reached[option, s][0] for s in cfg.seeds]
        points = [(m.rate_bits, m.step_seconds) for (model, o, p, rate), m in measured.items()
                  if model == cfg.accuracy_model and o == option and p == 2 and m.rate_bits]
        lines[option] = line(points)
        wire = next(m.ledger.total(wire=True) for (model, o, p, _), m in measured.items()
                    if model == cfg.accuracy_model and o == option and p == 2)
        done = [s for s in steps if s is not None]
        mean_steps = statistics.fmean(done) if len(done) == len(steps) else math.nan
        times = [(rate, m.step_seconds) for (model, o, p, rate), m in measured.items()
                 if model == cfg.accuracy_model and o == option and p == 2 and m.rate_bits]
        rows.append([OPTIONS[option][0], f"{wire / 2**20:.3f}",
                     ", ".join("-" if s is None else str(s) for s in steps),
                     ", ".join(f"{100 * reached[option, s][1]:.2f}" for s in cfg.seeds),
                     *[f"{mean_steps * t:.1f}" for _, t in times]])
    reference = options[0]
    ref_steps = statistics.fmean(s for s, _ in (reached[reference, x] for x in cfg.seeds)
                                 if s is not None)
    for row, option in zip(rows, options):
        done = [reached[option, s][0] for s in cfg.seeds]
        if option == reference or None in done:
            row.append("-")
            continue
        steps = statistics.fmean(done)
        r = crossover(steps, *lines[option], ref_steps, *lines[reference])
        if r is None:  # one line below the other everywhere
            c, b = lines[option]
            faster = steps * (c + b / 1e9) < ref_steps * (lines[reference][0] +
                                                          lines[reference][1] / 1e9)
            row.append("at every rate" if faster else "never")
        else:
            row.append(f"below {_rate(r)}" if steps * lines[option][0] > ref_steps *
                       lines[reference][0] else f"above {_rate(r)}")
    report.say(f"\n## Time to {cfg.target:.0%} MNIST test accuracy\n\n"
               f"{cfg.accuracy_model}, the experiment's recipe for {cfg.epochs:g} epoch(s) "
               f"(Adam one-cycle, global batch 128), 2 processes of one device; steps to the "
               f"target from unlimited runs evaluated every {cfg.eval_every} steps (seeds "
               f"{', '.join(map(str, cfg.seeds))}); seconds = mean steps x measured s/step at "
               f"each limit (training only); wins vs {OPTIONS[reference][0]}: where its time "
               f"line crosses that one's.\n")
    report.table(["option", "MiB/step", "steps to target", "best acc %",
                  *[f"s at {r}" for r in cfg.rates], f"wins vs {reference}"], rows)


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    cfg = harness.parse(Config, argv, __doc__)
    from jaxdist.cluster.bandwidth import missing_requirement, parse_rate
    from jaxdist.errors import UsageError

    for rate in cfg.rates:
        parse_rate(rate)
    if len(cfg.rates) < 1 or min(cfg.processes) < 2:
        raise UsageError("needs at least one rate and at least 2 processes per job")
    missing = missing_requirement()
    if missing:
        raise UsageError(f"--bandwidth cannot run here: {missing}")
    if cfg.part in ("both", "accuracy") and 2 not in cfg.processes:
        raise UsageError("the accuracy part uses the 2-process measurements: include 2 in "
                         "--processes")
    accuracy_options = tuple(o for o in cfg.options if o != "fsdp")  # FSDP: planner part only
    report = harness.Report(cfg)
    measured = {}
    if cfg.part in ("both", "planner"):
        measured = planner_part(cfg, report, cfg.options)
    if cfg.part in ("both", "accuracy"):
        if cfg.part == "accuracy" or cfg.accuracy_model not in cfg.models:
            only = dataclasses.replace(cfg, models=(cfg.accuracy_model,), processes=(2,))
            measured.update(planner_part(only, report, accuracy_options))
        accuracy_part(cfg, report, measured, accuracy_options)
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
