"""The mixture of experts' speed and bytes per expert layout, and against a dense Llama with as
many active parameters.

    python -m benchmarks.moe                 # a small MoE Llama on 8 virtual CPU devices
    python -m benchmarks.moe --rounds 5 --out benchmarks/results

Each row trains the same model (AdamW, random tokens, after a warm-up) under a strategy, mesh and
exchange (`MoEConfig.exchange`: under `ep` the dropless dispatch all-gathers an expert group's
tokens, or sends each token only to its experts' devices with all-to-alls) and shows tokens/s, the
ring wire bytes of the compiled step's collectives per device (`jaxdist.observe.collective_ledger`),
of them the all-to-alls', the ideal all-to-all bytes (every assignment sent once each way, forward
and backward: `ideal_all_to_all_bytes`), and the share of assignments the exchange's buffers
dropped. The dense rows' SwiGLU is as wide as the MoE's top_k experts together: the same active
parameters per token.
"""

from __future__ import annotations

import dataclasses

from benchmarks import harness

# (model, strategy, mesh, exchange): "-" where no exchange applies (no expert axis)
ROWS = [
    ("moe", "ep", "expert=8", "all_gather"), ("moe", "ep", "expert=8", "all_to_all"),
    ("moe", "ep", "data=2,expert=4", "all_gather"), ("moe", "ep", "data=2,expert=4", "all_to_all"),
    ("moe", "ep", "fsdp=2,expert=4", "all_to_all"), ("moe", "fsdp", "fsdp=8", "-"),
    ("dense", "fsdp", "fsdp=8", "-"), ("dense", "dp", "data=8", "-"),
]
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    experts: int = 8
    """routed experts per layer"""
    top_k: int = 2
    """experts per token"""
    embed: int = 128
    """model width"""
    expert_mlp: int = 256
    """each expert's hidden width (the dense rows': top_k times it)"""
    depth: int = 2
    """layers"""
    seq_len: int = 128
    """tokens per sequence"""
    global_batch: int = 32
    """sequences per step"""
    steps: int = 5
    """timed steps per round"""
    rounds: int = 3
    """rounds (the median is shown)"""


def model_config(cfg: Config, moe: bool, exchange: str = "all_gather"):
    """The benchmark's Llama: a mixture of experts, or dense with as many active parameters."""
    from jaxdist.models.llama import llama_config
    from jaxdist.models.moe import MoEConfig

    shape = dict(seq_len=cfg.seq_len, embed=cfg.embed, depth=cfg.depth, heads=4, kv_heads=2,
                 vocab=512)
    if not moe:
        return llama_config("test", mlp=cfg.top_k * cfg.expert_mlp, **shape)
    return llama_config("test", mlp=cfg.expert_mlp, **shape, moe=MoEConfig(
        num_experts=cfg.experts, top_k=cfg.top_k, expert_mlp=cfg.expert_mlp,
        exchange="all_gather" if exchange == "-" else exchange))


def measure(cfg: Config, model: str, strategy: str, mesh: str, exchange: str) -> dict:
    """One row: step time, tokens/s, the compiled step's collective bytes, the drops."""
    import numpy as np
    import optax
    from flax import nnx

    from jaxdist import Trainer
    from jaxdist.models.llama import Llama, llama_loss, param_count
    from jaxdist.observe import collective_ledger, ideal_all_to_all_bytes

    config = model_config(cfg, model == "moe", exchange)
    trainer = Trainer(lambda: Llama(config, rngs=nnx.Rngs(0)), optax.adamw(1e-3), llama_loss,
                      strategy=strategy, mesh=mesh)
    tokens = np.random.default_rng(0).integers(0, config.vocab,
                                               (cfg.global_batch, cfg.seq_len + 1), np.int32)
    batch = trainer.shard_batch((tokens[:, :-1], tokens[:, 1:]))
    state = trainer.init()
    ledger = collective_ledger(trainer.lower(trainer.abstract_state(), batch).compile().as_text(),
                               trainer.num_devices)
    rounds, metrics = harness.step_seconds(trainer, state, [batch], steps=cfg.steps,
                                           rounds=cfg.rounds)
    step_s = rounds.median
    group = trainer.mesh.shape["expert"]
    per_device = cfg.global_batch * cfg.seq_len // trainer.num_devices
    ideal = (4 * cfg.depth * ideal_all_to_all_bytes(per_device, cfg.top_k, cfg.embed, 4, group)
             if exchange == "all_to_all" else None)
    return dict(params=param_count(config), active=param_count(config, active=True),
                step_s=step_s, tokens_per_s=cfg.global_batch * cfg.seq_len / step_s,
                wire=ledger.total(wire=True), a2a=ledger.total("all-to-all", wire=True),
                ideal=ideal, dropped=float(metrics.get("moe_dropped", 0.0)))


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(8)
    report = harness.Report(args)
    report.say(f"MoE Llama: {args.experts} experts, top-{args.top_k}, expert width "
               f"{args.expert_mlp}, embed {args.embed}, {args.depth} layers; dense: SwiGLU width "
               f"{args.top_k * args.expert_mlp}. Global batch {args.global_batch} x "
               f"{args.seq_len} tokens, AdamW, float32, median of {args.rounds} rounds of "
               f"{args.steps} steps, 8 virtual CPU devices\n")
    rows = []
    for model, strategy, mesh, exchange in ROWS:
        r = measure(args, model, strategy, mesh, exchange)
        rows.append((model, strategy, mesh, exchange, f"{r['params'] / 1e6:.2f}",
                     f"{r['active'] / 1e6:.2f}", f"{1e3 * r['step_s']:.1f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['wire'] / MIB:.2f}",
                     f"{r['a2a'] / MIB:.2f}",
                     "-" if r["ideal"] is None else f"{r['ideal'] / MIB:.2f}",
                     f"{r['dropped']:.3f}"))
    report.table(["model", "strategy", "mesh", "exchange", "params M", "active M", "step ms",
                  "tokens/s", "wire MiB/step", "all-to-all MiB", "ideal a2a MiB", "dropped"],
                 rows)
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
