"""Per strategy and mesh: step time, bytes per device, and collective bytes per step vs the ideal.

    python -m benchmarks.parallel                                 # ViT-small, 8 CPU devices
    python -m benchmarks.parallel --vit_size large --global_batch 16 --steps 2 \\
        --budget_mib 1024                                         # 100.8M params, 1 GiB per device

Each row compiles the train step ahead of time (from shapes only), reads its per-device memory
from `memory_analysis()` and its collectives from the partitioned HLO, then, if it fits the
budget, creates the state already sharded and times `--steps` steps on random batches.

The ideal is the textbook wire traffic per device (ring algorithms): data parallelism all-reduces
the gradients, 2(D-1)/D of their bytes; FSDP all-gathers the parameters for forward and backward
and reduce-scatters the gradients, 3(F-1)/F; Megatron tensor parallelism all-reduces the
activations twice per block forward and twice backward, 2(T-1)/T each.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from benchmarks import harness

CONFIGS = [("dp", "data=8"), ("zero1", "data=8"), ("fsdp", "fsdp=8"), ("fsdp", "data=2,fsdp=4"),
           ("tp", "data=4,tensor=2"), ("fsdp_tp", "fsdp=4,tensor=2"),
           ("fsdp_tp", "data=2,fsdp=2,tensor=2")]
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    vit_size: str = "small"
    """ViT size: tiny, small, base or large"""
    global_batch: int = 32
    """images per step"""
    steps: int = 3
    """timed steps per row (0: compile only)"""
    learning_rate: float = 1e-5
    """Adam's step size"""
    budget_mib: float = 0
    """per-device memory budget; rows over it are compiled, not run (0: no budget)"""
    configs: str = ""
    """STRATEGY:MESH;... ('': the dp, zero1, fsdp, tp and fsdp_tp rows of CONFIGS)"""


def ideal_wire_bytes(mesh, params_per_device: int, global_batch: int, vit) -> float:
    """Textbook wire bytes per device per step for this mesh (see the module docstring)."""
    from jaxdist.observe import wire_factor

    d, f, t = mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["tensor"]
    fsdp = 3 * wire_factor("all-gather", f) * params_per_device * f
    dp = wire_factor("all-reduce", d) * params_per_device
    activations = global_batch // (d * f) * vit.num_patches * vit.embed * 4
    tp = 4 * vit.depth * activations * wire_factor("all-reduce", t)
    return fsdp + dp + tp


def parse_configs(text: str) -> list[tuple[str, str]]:
    """--configs "STRATEGY:MESH;..." -> [(strategy, mesh)], each mesh checked on the devices.

    Raises:
        UsageError: an item without ":", an unknown strategy or a mesh that does not fit.
    """
    from jaxdist.errors import UsageError
    from jaxdist import STRATEGIES, make_mesh

    configs = []
    for item in (c.strip() for c in text.split(";") if c.strip()):
        strategy, _, shape = item.partition(":")
        if not shape:
            raise UsageError(f"--configs {item!r}: expected STRATEGY:MESH, e.g. fsdp:fsdp=8")
        model_parallel = [name for name, s in STRATEGIES.items() if s.parallelism == "model"]
        if strategy not in model_parallel:
            raise UsageError(f"--configs {item!r}: unknown strategy {strategy!r}; choose one of "
                             f"{', '.join(model_parallel)}")
        make_mesh(shape)  # a mesh that does not fit the devices fails before any compile
        configs.append((strategy, shape))
    if not configs:
        raise UsageError(f"--configs {text!r} names no STRATEGY:MESH")
    return configs


def run_config(strategy, shape, args, vit, batch_np):
    """One row: `vit` (the registry's ViT variant) under `strategy` over mesh `shape`."""
    import jax
    import optax

    from jaxdist import Trainer, make_mesh
    from jaxdist.plan import analyze_step

    mesh = make_mesh(shape)
    trainer = Trainer(vit.model_fn(seed=0), optax.adam(args.learning_rate), vit.loss_fn,
                      mesh=mesh, strategy=strategy)
    analysis = analyze_step(trainer, batch_np)  # ahead of time, from shapes: nothing allocated
    memory, ledger = analysis.memory, analysis.ledger
    row = {"strategy": strategy, "mesh": shape, "memory": memory,
           "wire": ledger.total(wire=True),
           "ideal": ideal_wire_bytes(mesh, memory.params, args.global_batch, vit.config),
           "fits": not args.budget_mib or memory.peak_estimate <= args.budget_mib * MIB,
           "step_ms": None, "loss": None}
    if row["fits"] and args.steps:
        state = trainer.init()
        batch = trainer.shard_batch(batch_np)
        state, metrics = trainer.step(state, batch)  # compile + warm up
        jax.block_until_ready(state)
        losses = [float(metrics["loss"])]

        def timed() -> float:
            nonlocal state
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            jax.block_until_ready(state)
            seconds = time.perf_counter() - t0
            losses.append(float(metrics["loss"]))
            return seconds

        row["step_ms"] = 1000 * harness.repeat(timed, args.steps).median
        row["loss"] = (losses[0], losses[-1])
        del state
    return row


def table_rows(rows, budget_mib) -> tuple[list[str], list[tuple]]:
    """(columns, rows) of the result table: MiB per device, comm = ring wire bytes per step."""
    columns = ["strategy", "mesh", "step ms", "params", "optim", "grads", "temp", "peak",
               "comm MiB", "ideal", "ratio"] + (["fits"] if budget_mib else [])
    out = []
    for r in rows:
        m = r["memory"]
        step = f"{r['step_ms']:.0f}" if r["step_ms"] is not None else "-"
        ratio = f"{r['wire'] / r['ideal']:.2f}" if r["ideal"] else "-"
        out.append((r["strategy"], r["mesh"], step, *(f"{b / MIB:.2f}" for b in (
            m.params, m.optimizer, m.grads, m.temp, m.peak_estimate, r["wire"], r["ideal"])),
            ratio, *((("yes" if r["fits"] else "NO"),) if budget_mib else ())))
    return columns, out


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(8)
    from jaxdist.models import get_model

    configs = parse_configs(args.configs) if args.configs else CONFIGS
    vit = get_model("vit").variant(args.vit_size)
    batch = vit.random_batch(args.global_batch)
    report = harness.Report(args)
    report.say(f"ViT-{args.vit_size}: {vit.param_count / 1e6:.1f}M parameters, global batch "
               f"{args.global_batch}, Adam, fp32, 8 devices; bytes per device, MiB; comm = ring "
               f"wire bytes per step from the HLO; ideal = textbook ring traffic\n")
    rows = []
    for strategy, shape in configs:
        rows.append(run_config(strategy, shape, args, vit, batch))
        r = rows[-1]
        loss = f", loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}" if r["loss"] else ""
        harness.progress(f"  {strategy} {shape}: done{loss}")
    report.table(*table_rows(rows, args.budget_mib))
    report.save()
    return 0

if __name__ == "__main__":
    sys.exit(main())
