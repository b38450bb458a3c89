"""The LM's speed per strategy and mesh, and the pipeline schedules' memory per stage.

    python -m experiments.bench_lm                        # both tables, the tiny LM, 8 CPU devices
    python -m experiments.bench_lm --table memory --stages 4 --microbatches 4,8,16

`speed`: tokens/s of the train step (AdamW, random tokens, after a warm-up) for each strategy and
mesh, pipeline meshes with both schedules. `memory`: per-stage temporary bytes of the compiled
step (XLA's `memory_analysis()`: the activations a stage keeps for its backward, plus scratch)
for GPipe and 1F1B at the same microbatch count M on pipeline=S: GPipe keeps all M
microbatches' activations until the backward, 1F1B at most S, so its activation memory should be
at most about S/M of GPipe's (1F1B keeps each stage's input and recomputes its forward in the
backward, so it is compared with GPipe both without and with full rematerialization). Both
print the machine they ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from jaxdist.config import ArgumentParser

SPEED_CONFIGS = [
    ("dp", "data=8", "gpipe"), ("zero1", "data=8", "gpipe"), ("fsdp", "fsdp=8", "gpipe"),
    ("tp", "data=4,tensor=2", "gpipe"), ("sp", "data=4,tensor=2", "gpipe"),
    ("fsdp_tp", "fsdp=4,tensor=2", "gpipe"), ("dp", "data=2,pipeline=4", "gpipe"),
    ("dp", "data=2,pipeline=4", "1f1b"), ("fsdp_tp", "fsdp=2,pipeline=2,tensor=2", "1f1b"),
]
MIB = 2**20


def _trainer(cfg, strategy, mesh, schedule, microbatches=None):
    import optax
    from flax import nnx

    from jaxdist import Trainer
    from jaxdist.models.lm import GPT, lm_loss

    return Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), lm_loss,
                   strategy=strategy, mesh=mesh, pipeline_schedule=schedule,
                   pipeline_microbatches=microbatches)


def _batch(cfg, global_batch, seed=0):
    import numpy as np

    tokens = np.random.default_rng(seed).integers(0, 256, (global_batch, cfg.seq_len + 1),
                                                  dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def speed_rows(cfg, global_batch: int, steps: int, rounds: int):
    import jax

    for strategy, mesh, schedule in SPEED_CONFIGS:
        trainer = _trainer(cfg, strategy, mesh, schedule)
        state = trainer.init()
        batch = trainer.shard_batch(_batch(cfg, global_batch))
        for _ in range(2):  # compile, then one more warm step
            state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = trainer.step(state, batch)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / steps)
        step_s = statistics.median(times)
        yield strategy, mesh, schedule if "pipeline" in mesh else "-", step_s, \
            global_batch * cfg.seq_len / step_s


def memory_rows(cfg, stages: int, microbatch_counts, global_batch: int):
    from jaxdist.parallel.pipeline import bubble_fraction, peak_in_flight, schedule_1f1b

    mesh = f"data={8 // stages},pipeline={stages}" if stages < 8 else "pipeline=8"
    batch = _batch(cfg, global_batch)
    remat = dataclasses.replace(cfg, remat="full")
    for m in microbatch_counts:
        temps = {}
        for name, model_cfg, schedule in (("gpipe", cfg, "gpipe"), ("gpipe_remat", remat, "gpipe"),
                                          ("1f1b", cfg, "1f1b")):
            trainer = _trainer(model_cfg, "dp", mesh, schedule, m)
            compiled = trainer.lower(trainer.abstract_state(), trainer.shard_batch(batch)).compile()
            temps[name] = int(compiled.memory_analysis().temp_size_in_bytes)
        in_flight = max(peak_in_flight(schedule_1f1b(stages, m)))
        yield (m, bubble_fraction(stages, m), bubble_fraction(stages, m, "1f1b"), temps["gpipe"],
               temps["gpipe_remat"], temps["1f1b"], in_flight)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.bench_lm",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--table", choices=("speed", "memory", "both"), default="both")
    parser.add_argument("--lm_size", default="tiny")
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument("--stages", type=int, default=4, help="memory table: pipeline stages S")
    parser.add_argument("--microbatches", default="4,8,16", help="memory table: values of M")
    parser.add_argument("--memory_batch", type=int, default=64,
                        help="memory table: global batch (divisible by data x M)")
    parser.add_argument("--cpu_devices", type=int, default=8)
    args = parser.parse_args(argv)

    from jaxdist.cluster import configure_cpu_devices
    from jaxdist.errors import UsageError

    configure_cpu_devices(args.cpu_devices)
    from jaxdist.models.lm import LM_SIZES, lm_config, param_count
    from jaxdist.observe.machine import describe_machine

    if args.lm_size not in LM_SIZES:
        print(f"error: unknown --lm_size {args.lm_size!r}; choose from {', '.join(LM_SIZES)}",
              file=sys.stderr)
        return 2
    cfg = lm_config(args.lm_size)
    try:
        counts = [int(m) for m in args.microbatches.split(",")]
    except ValueError:
        print(f"error: --microbatches takes integers, got {args.microbatches!r}", file=sys.stderr)
        return 2
    print(f"# LM-{args.lm_size} ({param_count(cfg) / 1e6:.2f}M params, seq {cfg.seq_len}) on "
          f"{args.cpu_devices} virtual CPU devices | {describe_machine()}", flush=True)
    try:
        if args.table in ("speed", "both"):
            print(f"\nglobal batch {args.global_batch} x {cfg.seq_len} tokens, AdamW, median of "
                  f"{args.rounds} rounds of {args.steps} steps\n")
            print("| strategy | mesh | schedule | step ms | tokens/s |\n|---|---|---|---|---|")
            for strategy, mesh, schedule, step_s, tps in speed_rows(
                    cfg, args.global_batch, args.steps, args.rounds):
                print(f"| {strategy} | {mesh} | {schedule} | {1e3 * step_s:.1f} | {tps:,.0f} |",
                      flush=True)
        if args.table in ("memory", "both"):
            print(f"\npipeline={args.stages}, global batch {args.memory_batch}: per-stage "
                  f"temporary bytes of the compiled step (activations kept + scratch)\n")
            print("| M | GPipe bubble | 1F1B bubble | GPipe MiB | GPipe + remat full MiB | 1F1B MiB "
                  "| 1F1B / GPipe | 1F1B / GPipe+remat | S/M | 1F1B in flight |\n"
                  "|---|---|---|---|---|---|---|---|---|---|")
            for m, bubble, bubble_1f1b, gpipe, gpipe_remat, one, in_flight in memory_rows(
                    cfg, args.stages, counts, args.memory_batch):
                print(f"| {m} | {bubble:.1%} | {bubble_1f1b:.1%} | {gpipe / MIB:.2f} | "
                      f"{gpipe_remat / MIB:.2f} | "
                      f"{one / MIB:.2f} | {one / gpipe:.2f} | {one / gpipe_remat:.2f} | "
                      f"{args.stages / m:.2f} | {in_flight} |", flush=True)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
