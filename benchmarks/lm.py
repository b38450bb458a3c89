"""The LM's speed per strategy and mesh, the pipeline schedules' memory per stage, and a long
sequence under context parallelism.

    python -m benchmarks.lm                      # speed and memory, the tiny LM, 8 CPU devices
    python -m benchmarks.lm --table memory --stages 4 --microbatches 4,8,16
    python -m benchmarks.lm --table context --context_seq 2048

`speed`: tokens/s of the train step (AdamW, random tokens, after a warm-up) for each strategy and
mesh, pipeline meshes with both schedules. `memory`: per-stage temporary bytes of the compiled
step (XLA's `memory_analysis()`: the activations a stage keeps for its backward, plus scratch)
for GPipe and 1F1B at the same microbatch count M on pipeline=S: GPipe keeps all M
microbatches' activations until the backward, 1F1B at most min(M, 2 S - 1), so its activation
memory stops growing with M (it is compared with GPipe both without and with full
rematerialization). `context`: a one-layer Llama (8 heads over a window of --context_seq tokens,
batch 1) with its sequence split over context=C devices, C = 1, 2, 4, 8, ring and all-gather
attention: the compiled step's temporary bytes per device and its step time. All print the
machine they ran on.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

import numpy as np

from benchmarks import harness

SPEED_CONFIGS = [
    ("dp", "data=8", "gpipe"), ("zero1", "data=8", "gpipe"), ("fsdp", "fsdp=8", "gpipe"),
    ("tp", "data=4,tensor=2", "gpipe"), ("sp", "data=4,tensor=2", "gpipe"),
    ("fsdp_tp", "fsdp=4,tensor=2", "gpipe"), ("dp", "data=2,pipeline=4", "gpipe"),
    ("dp", "data=2,pipeline=4", "1f1b"), ("fsdp_tp", "fsdp=2,pipeline=2,tensor=2", "1f1b"),
]
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    table: Literal["speed", "memory", "both", "context"] = "both"
    """which table: tokens/s per strategy and mesh, pipeline memory per stage, both, or the long
    sequence under context parallelism"""
    lm_size: str = "tiny"
    """LM size (jaxdist.models.lm.LM_SIZES: test, tiny, small, ...)"""
    global_batch: int = 32
    """speed table: sequences per step"""
    steps: int = 5
    """speed table: timed steps per round"""
    rounds: int = 3
    """speed table: rounds (the median is shown)"""
    stages: int = 4
    """memory table: pipeline stages S"""
    microbatches: tuple[int, ...] = (4, 8, 16)
    """memory table: values of M, comma-separated"""
    memory_batch: int = 64
    """memory table: global batch (divisible by data x M)"""
    context_seq: int = 2048
    """context table: tokens per sequence (a multiple of 16)"""
    cpu_devices: int = 8
    """virtual CPU devices"""


def _trainer(lm, strategy, mesh, schedule, microbatches=None):
    """A Trainer of `lm` (the registry's LM variant), a pipeline on a mesh with pipeline."""
    import optax

    from jaxdist import Pipeline, Trainer

    if "pipeline" in mesh:
        strategy = Pipeline(rules=strategy, microbatches=microbatches, schedule=schedule)
    return Trainer(lm.model_fn(seed=0), optax.adamw(1e-3), lm.loss_fn, strategy=strategy,
                   mesh=mesh)


def speed_rows(lm, global_batch: int, steps: int, rounds: int):
    for strategy, mesh, schedule in SPEED_CONFIGS:
        trainer = _trainer(lm, strategy, mesh, schedule)
        state = trainer.init()
        batch = trainer.shard_batch(lm.random_batch(global_batch))
        step_s = harness.step_seconds(trainer, state, [batch], steps=steps,
                                      rounds=rounds)[0].median
        yield strategy, mesh, schedule if "pipeline" in mesh else "-", step_s, \
            global_batch * lm.config.seq_len / step_s


def memory_rows(lm, stages: int, microbatch_counts, global_batch: int):
    from jaxdist.parallel.pipeline import bubble_fraction
    from jaxdist.parallel.pipeline_1f1b import residual_slots

    mesh = f"data={8 // stages},pipeline={stages}" if stages < 8 else "pipeline=8"
    batch = lm.random_batch(global_batch)
    remat = lm.spec.variant(lm.size, remat="full")
    for m in microbatch_counts:
        temps = {}
        for name, model, schedule in (("gpipe", lm, "gpipe"), ("gpipe_remat", remat, "gpipe"),
                                      ("1f1b", lm, "1f1b")):
            trainer = _trainer(model, "dp", mesh, schedule, m)
            compiled = trainer.lower(trainer.abstract_state(), trainer.shard_batch(batch)).compile()
            temps[name] = int(compiled.memory_analysis().temp_size_in_bytes)
        in_flight = residual_slots(stages, m)
        yield (m, bubble_fraction(stages, m), bubble_fraction(stages, m, "1f1b"), temps["gpipe"],
               temps["gpipe_remat"], temps["1f1b"], in_flight)


def context_rows(seq: int, steps: int, rounds: int):
    """(attention, C, temporary bytes per device, step s) of a long-sequence Llama whose memory
    is its attention, its sequence split over C devices (C = 1: the plain attention)."""
    import optax
    from flax import nnx

    from jaxdist import Trainer
    from jaxdist.models.llama import Llama, llama_config, llama_loss
    from jaxdist.parallel.strategies import resolve

    cfg = llama_config("test", seq_len=seq, depth=1, heads=8, kv_heads=2, vocab=64)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (1, seq + 1), dtype=np.int32)
    for attention in ("ring", "allgather"):
        for c in (1, 2, 4, 8):
            trainer = Trainer(lambda: Llama(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3),
                              llama_loss, mesh=f"context={c}", devices=c,
                              strategy=dataclasses.replace(resolve("dp"),
                                                           context_attention=attention))
            state, batch = trainer.init(), trainer.shard_batch((tokens[:, :-1], tokens[:, 1:]))
            temp = trainer.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
            yield attention, c, int(temp), harness.step_seconds(
                trainer, state, [batch], steps=steps, rounds=rounds)[0].median


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(args.cpu_devices)
    from jaxdist.models import get_model

    spec = get_model("lm")
    if args.lm_size not in spec.sizes:
        return harness.fail(f"unknown --lm_size {args.lm_size!r}; choose from "
                            f"{', '.join(spec.sizes)}")
    lm = spec.variant(args.lm_size)
    seq = lm.config.seq_len
    report = harness.Report(args)
    if args.table == "context":
        if args.context_seq < 16 or args.context_seq % 16:
            return harness.fail(f"--context_seq {args.context_seq}: a multiple of 16 (2 chunks "
                                f"per device of context=8)")
        report.say(f"Llama, 1 layer, 8 heads (2 key/value) of 4, window {args.context_seq} "
                   f"tokens, batch 1, AdamW; sequence split over context=C; median of "
                   f"{args.rounds} rounds of {args.steps} steps\n")
        rows = list(context_rows(args.context_seq, args.steps, args.rounds))
        base = {attention: temp for attention, c, temp, _ in rows if c == 1}
        report.table(["attention", "C", "temp MiB / device", "x C=1", "1/C", "step ms"],
                     [(attention if c > 1 else "plain", c, f"{temp / MIB:.2f}",
                       f"{temp / base[attention]:.3f}", f"{1 / c:.3f}", f"{1e3 * step_s:.1f}")
                      for attention, c, temp, step_s in rows])
        report.save()
        return 0
    report.say(f"LM-{args.lm_size} ({lm.param_count / 1e6:.2f}M params, seq {seq}) on "
               f"{args.cpu_devices} virtual CPU devices")
    if args.table in ("speed", "both"):
        report.say(f"\nglobal batch {args.global_batch} x {seq} tokens, AdamW, median of "
                   f"{args.rounds} rounds of {args.steps} steps\n")
        report.table(["strategy", "mesh", "schedule", "step ms", "tokens/s"],
                     [(strategy, mesh, schedule, f"{1e3 * step_s:.1f}", f"{tps:,.0f}")
                      for strategy, mesh, schedule, step_s, tps in speed_rows(
                          lm, args.global_batch, args.steps, args.rounds)])
    if args.table in ("memory", "both"):
        report.say(f"\npipeline={args.stages}, global batch {args.memory_batch}: per-stage "
                   f"temporary bytes of the compiled step (activations kept + scratch)\n")
        report.table(
            ["M", "GPipe bubble", "1F1B bubble", "GPipe MiB", "GPipe + remat full MiB",
             "1F1B MiB", "1F1B / GPipe", "1F1B / GPipe+remat", "S/M", "1F1B in flight"],
            [(m, f"{bubble:.1%}", f"{bubble_1f1b:.1%}", f"{gpipe / MIB:.2f}",
              f"{gpipe_remat / MIB:.2f}", f"{one / MIB:.2f}", f"{one / gpipe:.2f}",
              f"{one / gpipe_remat:.2f}", f"{args.stages / m:.2f}", in_flight)
             for m, bubble, bubble_1f1b, gpipe, gpipe_remat, one, in_flight in memory_rows(
                 lm, args.stages, args.microbatches, args.memory_batch)])
    report.save()
    return 0

if __name__ == "__main__":
    sys.exit(main())
