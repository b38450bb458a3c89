"""Pipeline schedules compiled: FLOPs and temporary bytes per stage of GPipe, 1F1B and
interleaved, and step times against the bubble formula.

    python -m benchmarks.pipeline                          # S=4, M=8,16, 4 virtual CPU devices
    python -m benchmarks.pipeline --microbatches 8,16,32 --virtual_stages 2 --time false

A stack of `layers` residual MLP layers (width `width`) and a squared-error head, its loss and
gradients jitted on pipeline=S, one device per stage. FLOPs: XLA's cost analysis of the compiled
step with every tick compiled on its own (`unroll=True`: the analysis counts a loop's body once).
Temp: `memory_analysis().temp_size_in_bytes` of the step as it runs (ticks in a loop), per device
i.e. per stage: the activations a stage keeps for its backward, plus scratch. Time (`--time`):
the median step (rounds alternate over the rows); per tick = step / (ticks in units of a whole
stage, (V M + S - 1) / V), which the bubble formula says is the same for every schedule and M.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from benchmarks import harness


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    stages: int = 4
    """S, pipeline stages (one virtual CPU device each)"""
    microbatches: tuple[int, ...] = (8, 16)
    """M, microbatches per step, comma separated"""
    virtual_stages: int = 2
    """V, chunks per device of the interleaved schedule"""
    layers: int = 8
    """layers of the stack (divisible by S x V)"""
    width: int = 256
    """width of every layer"""
    rows: int = 64
    """rows of one microbatch (the batch is M x rows)"""
    time: bool = True
    """also time the steps (median of `rounds` rounds of `steps` steps)"""
    rounds: int = 5
    """timing rounds, each over every schedule and M"""
    steps: int = 5
    """steps per timing round"""


def _layer(params, h):
    return h + jax.nn.gelu(h @ params["w1"]) @ params["w2"]


def _head_loss(head, h, targets):
    return jnp.mean((h @ head - targets) ** 2)


def _problem(cfg: Config, m: int):
    import numpy as np

    rng = np.random.default_rng(0)
    scale = cfg.width ** -0.5
    stacked = {"w1": rng.normal(0, scale, (cfg.layers, cfg.width, cfg.width)),
               "w2": rng.normal(0, scale, (cfg.layers, cfg.width, cfg.width))}
    stacked = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), stacked)
    head = jnp.asarray(rng.normal(0, scale, (cfg.width,)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(m * cfg.rows, cfg.width)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(m * cfg.rows,)), jnp.float32)
    return stacked, head, x, y


def step_fn(cfg: Config, schedule: str, m: int, mesh, unroll: bool):
    """The jitted loss-and-gradients of the stack under `schedule`."""
    from jaxdist.core.layout import scan_layers
    from jaxdist.parallel.pipeline import as_stages, pipeline_call
    from jaxdist.parallel.pipeline_1f1b import pipeline_loss_1f1b

    s = mesh.shape["pipeline"]
    v = cfg.virtual_stages if schedule == "interleaved" else 1
    stage_fn = functools.partial(scan_layers, _layer, unroll=True)
    options = dict(mesh=mesh, num_microbatches=m, batch_axes=(), unroll=unroll)

    def loss(stacked, head, x, y):
        if schedule == "1f1b":
            return pipeline_loss_1f1b(stage_fn, _head_loss, as_stages(stacked, s), head, x, y,
                                      **options)
        out = pipeline_call(stage_fn, as_stages(stacked, s, v), x, virtual_stages=v, **options)
        return _head_loss(head, out, y)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def measure(cfg: Config, schedule: str, m: int, mesh) -> dict:
    """FLOPs, temporary bytes, the bubble and (with `--time`) a timer of one schedule at M."""
    from jaxdist.parallel.pipeline import bubble_fraction

    s, v = mesh.shape["pipeline"], cfg.virtual_stages if schedule == "interleaved" else 1
    args = _problem(cfg, m)
    flops = step_fn(cfg, schedule, m, mesh, True).lower(*args).compile().cost_analysis()["flops"]
    step = step_fn(cfg, schedule, m, mesh, False)
    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(step(*args))

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(cfg.steps):
            out = step(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / cfg.steps

    return dict(schedule=schedule if v == 1 else f"interleaved V={v}", m=m, flops=flops,
                temp=temp, bubble=bubble_fraction(s, m, schedule, v), ticks=(v * m + s - 1) / v,
                timed=timed)


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    global jax, jnp
    cfg = harness.parse(Config, argv, __doc__)

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(cfg.stages)
    import jax
    import jax.numpy as jnp

    from jaxdist.parallel import make_mesh

    report = harness.Report(cfg)
    mesh = make_mesh(f"pipeline={cfg.stages}")
    rows = []
    for m in cfg.microbatches:
        for schedule in ("gpipe", "1f1b", "interleaved"):
            harness.progress(f"  {schedule} M={m}")
            rows.append(measure(cfg, schedule, m, mesh))
    if cfg.time:  # rounds alternate over every schedule and M: drift hits them alike
        times = harness.alternate({i: row["timed"] for i, row in enumerate(rows)}, cfg.rounds,
                                  label=lambda i: f"{rows[i]['schedule']} M={rows[i]['m']}")
        for i, row in enumerate(rows):
            row["step_s"] = times[i].median
    report.say(f"pipeline={cfg.stages}, {cfg.layers} layers of width {cfg.width}, "
               f"{cfg.rows} rows per microbatch, float32; per device (= per stage)\n")
    columns = ["schedule", "M", "GFLOPs", "vs GPipe", "temp MiB", "vs GPipe", "bubble"]
    if cfg.time:
        columns += ["step ms", "ticks (whole stages)", "ms per tick"]
    table = []
    for row in rows:
        base = next(r for r in rows if r["m"] == row["m"] and r["schedule"] == "gpipe")
        line = [row["schedule"], row["m"], f"{row['flops'] / 1e9:.3f}",
                f"{row['flops'] / base['flops']:.2f}", f"{row['temp'] / 2**20:.2f}",
                f"{row['temp'] / base['temp']:.2f}", f"{row['bubble']:.3f}"]
        if cfg.time:
            line += [f"{1e3 * row['step_s']:.1f}", f"{row['ticks']:g}",
                     f"{1e3 * row['step_s'] / row['ticks']:.2f}"]
        table.append(line)
    report.table(columns, table)
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
