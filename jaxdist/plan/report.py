"""The plan as text: the assumptions, the table and the recommended mesh per device count."""

from __future__ import annotations

from typing import Sequence

from jaxdist.plan.cost import GIB, MIB, Assumptions
from jaxdist.plan.search import PlanRow, recommend


def _inputs_line(rows: Sequence[PlanRow]) -> str:
    by_model: dict[str, str] = {}
    for r in rows:
        by_model.setdefault(r.model, r.inputs or "uint8 28x28x1 images, int32 labels")
    texts = list(dict.fromkeys(by_model.values()))
    if len(texts) <= 1:
        return texts[0] if texts else "uint8 28x28x1 images, int32 labels"
    return "; ".join(f"{m}: {t}" for m, t in by_model.items())


def _config_name(r: PlanRow) -> str:
    return f"{r.strategy} {r.mesh}" + (f" {r.schedule} M={r.microbatches}" if r.schedule else "")


def format_plan(rows: Sequence[PlanRow], *, memory_gib: float, global_batch: int,
                optimizer: str, assumptions: Assumptions) -> str:
    """The assumptions, the table and the recommendations, as text.

    Pipeline rows add three columns: the schedule, the microbatches M and the bubble fraction;
    their `compute` includes the bubble (compute / (1 - bubble)), so compute + comm = step.
    Rows of a mixture of experts with all-to-alls add `a2a MiB`: those of `comm MiB` that are
    all-to-all (the tokens' dispatch and combine). Plans with context-parallel rows add
    `p2p MiB`: those of `comm MiB` that are collective-permutes (the ring attention's key/value
    blocks, a pipeline's activations)."""
    pipelines = any(r.schedule for r in rows)
    a2a = any(r.all_to_all_bytes for r in rows)
    p2p = any("context=" in r.mesh for r in rows)
    lines = assumptions.describe(
        xla_flops=not rows or any(r.flops_from == "xla" for r in rows),
        model_flops=any(r.flops_from == "model" for r in rows), pipelines=pipelines)
    lines.append(f"- budget {memory_gib:g} GiB per device; global batch {global_batch} "
                 f"({_inputs_line(rows)}); optimizer {optimizer}; fp32 parameters")
    lines.append("")
    mw = max([10] + [len(r.model) for r in rows])
    sw = max([24] + [len(r.mesh) for r in rows])
    pw = max([5] + [len(r.schedule) for r in rows])
    pipe_head = f" {'sched':<{pw}} {'M':>3} {'bubble':>6}" if pipelines else ""
    prefix_of = lambda model, n, strategy, mesh: (  # noqa: E731
        f"{model:<{mw}} {n:>4} {strategy:<8} {mesh:<{sw}}")
    head_prefix = prefix_of("model", "n", "strategy", "mesh") + pipe_head
    head = (f"{head_prefix} {'params':>8} {'optim':>8} {'grads':>8} {'temp':>8} {'peak':>8} "
            f"{'comm MiB':>9}" + (f" {'a2a MiB':>8}" if a2a else "")
            + (f" {'p2p MiB':>8}" if p2p else "")
            + f" {'compute':>8} {'comm':>8} {'step':>8}  fits")
    lines += [head, f"{'':<{len(head_prefix)}}{'(memory: MiB per device)':<44}"
                    f"{'(per device per step)':<10}{'':>7}" + ("" if not a2a else " " * 9)
                    + ("" if not p2p else " " * 9) + "(ms)"]
    for r in rows:
        prefix = prefix_of(r.model, r.n, r.strategy, r.mesh)
        if pipelines:
            prefix += (f" {r.schedule:<{pw}} {r.microbatches:>3} {r.bubble:>6.2f}" if r.schedule
                       else f" {'-':<{pw}} {'-':>3} {'-':>6}")
        if r.skipped:
            lines.append(f"{prefix} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>9} "
                         + (f"{'-':>8} " if a2a else "") + (f"{'-':>8} " if p2p else "")
                         + f"{'-':>8} {'-':>8} {'-':>8}  {r.reason}")
            continue
        m = r.memory
        lines.append(
            f"{prefix} {m.params / MIB:>8.1f} {m.optimizer / MIB:>8.1f} {m.grads / MIB:>8.1f} "
            f"{m.temp / MIB:>8.1f} {m.peak_estimate / MIB:>8.1f} {r.wire_bytes / MIB:>9.1f} "
            + (f"{r.all_to_all_bytes / MIB:>8.1f} " if a2a else "")
            + (f"{r.permute_bytes / MIB:>8.1f} " if p2p else "")
            + f"{r.busy_s * 1e3:>8.2f} {r.comm_s * 1e3:>8.2f} {r.step_s * 1e3:>8.2f}  "
            + ("yes" if r.fits else f"NO: {r.reason.removeprefix('rejected: ')}"))
    lines += ["", "Recommended (fastest that fits):"]
    for (model, n), row in recommend(rows).items():
        if row is None:
            lines.append(f"  {model:<{mw}} n={n:<4} none fits in {memory_gib:g} GiB/device")
        else:
            lines.append(f"  {model:<{mw}} n={n:<4} {_config_name(row)}: "
                         f"{row.step_s * 1e3:.2f} ms/step, peak "
                         f"{row.memory.peak_estimate / GIB:.2f} GiB/device")
    return "\n".join(lines)
