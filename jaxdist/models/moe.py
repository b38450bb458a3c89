"""A mixture-of-experts MLP for the Llama family (Mixtral, DeepSeek-MoE and Qwen-MoE shapes).

A router scores every token against `num_experts` SwiGLU experts and sends it to its `top_k`,
whose outputs are mixed with the top-k scores normalised to sum to 1; `shared_experts` more
SwiGLUs of the same width see every token (DeepSeek's shared experts). The experts' weights are
stacked on a leading `expert` logical axis, which the `ep` rules
(`jaxdist.parallel.rules.EP`) split over the mesh's `expert` axis: expert parallelism.

Two dispatches:
- `dropless`: the (token, choice) assignments sorted by expert, each expert's contiguous group
  multiplied by its weights with `jax.lax.ragged_dot` (grouped matmuls); every token is routed.
- `capacity`: each expert takes at most ceil(capacity_factor * tokens * top_k / num_experts)
  assignments, in token order (the batch's rows one after another, a token's first choice before
  its second); the rest are dropped (they add nothing; the residual stream carries the token on).
  The kept ones go into a fixed (expert, capacity, embed) buffer and through a batched matmul.

Under the `ep` rules (experts split over the mesh's `expert` axis, which splits the batch too) the
dropless dispatch is written out with `jax.shard_map` (`dropless_in_expert_groups`): the devices
along the expert axis, an expert group, all-gather their tokens, each runs the assignments of its
own experts, and the partial outputs are reduce-scattered back (Megatron's all-gather token
dispatcher; XLA:CPU has no ragged all-to-all to send each token only where it goes). Everywhere
else, and for the capacity dispatch, the global computation is left to XLA's SPMD partitioner:
the expert weights are split over `expert`, the tokens over the batch axes, the capacity buffer is
constrained to (`expert`, ...). The capacity counts the tokens of the whole step, as one device
does, so every mesh drops the same tokens.

Two auxiliary losses keep the router healthy, added to the loss with their weights and reported
as metrics: the load-balancing loss of Switch/GShard, num_experts * sum_e f_e P_e (f_e the share
of assignments that chose expert e, P_e its mean router probability; 1 when balanced), and the
router z-loss of ST-MoE, the mean of logsumexp(logits)^2. Both are means over the layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdist.core.layout import activation_spec, constrain, current_layout
from jaxdist.errors import UsageError
from jaxdist.models.layers import param

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")
EXCHANGES = ("all_gather", "all_to_all")  # how the dropless dispatch moves tokens under ep
# the MoE layer's parameters, each with a leading `layers` axis (shared_* only with shared experts)
MOE_PARAMS = ("router", "expert_gate", "expert_up", "expert_down",
              "shared_gate", "shared_up", "shared_down")
FLOAT32_PARAMS = ("router",)  # routing decisions stay in float32 under a bfloat16 compute dtype


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MoE MLP of every layer of a `LlamaConfig(moe=...)`.

    `expert_mlp` is each expert's hidden width (0: the model's `mlp`); `router` "softmax"
    (Mixtral) or "sigmoid" (DeepSeek-V3: independent scores, normalised over the chosen ones).
    `exchange`: how the dropless dispatch moves tokens between an expert group's devices under
    expert parallelism: "all_gather" (every device sees the group's tokens; never drops) or
    "all_to_all" (each token goes only to its experts' devices, in fixed buffers of
    ceil(exchange_capacity * assignments / group) per destination; past that dropped, as
    `moe_dropped` reports; 0: buffers of every assignment, never dropping, group times the
    bytes)."""

    num_experts: int = 8
    top_k: int = 2
    expert_mlp: int = 0
    shared_experts: int = 0
    router: str = "softmax"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    exchange: str = "all_gather"
    exchange_capacity: float = 2.0


def validate_moe(moe: MoEConfig) -> MoEConfig:
    """`moe`, or a one-line UsageError naming what is wrong."""
    if not isinstance(moe, MoEConfig):
        raise UsageError(f"moe must be a MoEConfig, got {type(moe).__name__}")
    if moe.num_experts < 1:
        raise UsageError(f"num_experts must be >= 1, got {moe.num_experts}")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise UsageError(f"top_k must be between 1 and num_experts ({moe.num_experts}), "
                         f"got {moe.top_k}")
    if moe.expert_mlp < 0 or moe.shared_experts < 0:
        raise UsageError(f"expert_mlp and shared_experts must be >= 0, got {moe.expert_mlp} "
                         f"and {moe.shared_experts}")
    if moe.router not in ROUTERS:
        raise UsageError(f"unknown router {moe.router!r}; choose one of {', '.join(ROUTERS)}")
    if moe.dispatch not in DISPATCHES:
        raise UsageError(f"unknown dispatch {moe.dispatch!r}; choose one of "
                         f"{', '.join(DISPATCHES)}")
    if min(moe.aux_loss_weight, moe.z_loss_weight) < 0:
        raise UsageError(f"aux_loss_weight and z_loss_weight must be >= 0, got "
                         f"{moe.aux_loss_weight} and {moe.z_loss_weight}")
    if not moe.capacity_factor > 0:
        raise UsageError(f"capacity_factor must be > 0, got {moe.capacity_factor}")
    if moe.exchange not in EXCHANGES:
        raise UsageError(f"unknown exchange {moe.exchange!r}; choose one of "
                         f"{', '.join(EXCHANGES)}")
    if not moe.exchange_capacity >= 0:
        raise UsageError(f"exchange_capacity must be >= 0 (0: no limit), got "
                         f"{moe.exchange_capacity}")
    return moe


def expert_width(moe: MoEConfig, mlp: int) -> int:
    return moe.expert_mlp or mlp


def capacity(moe: MoEConfig, tokens: int) -> int:
    """Assignments each expert takes per step under the capacity dispatch."""
    return math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.num_experts)


def moe_params(moe: MoEConfig, depth: int, embed: int, mlp: int, *,
               rngs: nnx.Rngs) -> dict[str, nnx.Param]:
    """The MoE MLP's parameters of `depth` stacked layers, by name (`MOE_PARAMS`)."""
    n, e, f, x = depth, embed, expert_width(moe, mlp), moe.num_experts
    std = 0.02

    def stacked(shape, names):
        return param(rngs, shape, names, std)

    out = {
        # replicated over experts: every device routes its own tokens
        "router": stacked((n, e, x), ("layers", "embed", None)),
        "expert_gate": stacked((n, x, e, f), ("layers", "expert", "embed", "mlp")),
        "expert_up": stacked((n, x, e, f), ("layers", "expert", "embed", "mlp")),
        "expert_down": stacked((n, x, f, e), ("layers", "expert", "mlp", "embed")),
    }
    if moe.shared_experts:  # s shared experts of width f are one SwiGLU of width s f
        s = moe.shared_experts * f
        out |= {"shared_gate": stacked((n, e, s), ("layers", "embed", "mlp")),
                "shared_up": stacked((n, e, s), ("layers", "embed", "mlp")),
                "shared_down": stacked((n, s, e), ("layers", "mlp", "embed"))}
    return out


def moe_param_count(moe: MoEConfig, embed: int, mlp: int, *, active: bool = False) -> int:
    """One layer's MoE parameters; `active`: those one token uses (its top_k experts)."""
    f = expert_width(moe, mlp)
    experts = moe.top_k if active else moe.num_experts
    return embed * moe.num_experts + 3 * embed * f * (experts + moe.shared_experts)


class Routing(NamedTuple):
    """A router's decision for T tokens: the normalised router distribution (T, E), the chosen
    experts (T, k) with their mixing weights (T, k), and the router's logits (T, E)."""

    probs: jax.Array
    experts: jax.Array
    weights: jax.Array
    logits: jax.Array


def route(moe: MoEConfig, logits: jax.Array) -> Routing:
    """Top-k routing of float32 logits (T, E); the chosen scores normalised to sum to 1."""
    if moe.router == "softmax":
        scores = probs = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdims=True)
    top, experts = jax.lax.top_k(scores, moe.top_k)
    return Routing(probs, experts, top / top.sum(-1, keepdims=True), logits)


def expert_load(routing: Routing, num_experts: int) -> jax.Array:
    """f_e: the share of the (token, choice) assignments that chose each expert (sums to 1)."""
    counts = jnp.bincount(routing.experts.reshape(-1), length=num_experts)
    return counts.astype(jnp.float32) / routing.experts.size


def load_balancing_loss(routing: Routing, num_experts: int) -> jax.Array:
    """Switch/GShard: E sum_e f_e P_e; gradients reach the router through P_e only."""
    return num_experts * jnp.sum(expert_load(routing, num_experts) * routing.probs.mean(0))


def z_loss(routing: Routing) -> jax.Array:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2)


def _swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    h = jax.nn.silu(jnp.einsum("te,ef->tf", x, gate)) * jnp.einsum("te,ef->tf", x, up)
    return jnp.einsum("tf,fe->te", h, down)


def dropless(x: jax.Array, routing: Routing, p: dict[str, jax.Array]) -> jax.Array:
    """Every (token, choice) through its expert: assignments sorted by expert, one grouped
    matmul per weight (`ragged_dot`), unsorted, mixed. x (T, e) -> (T, e)."""
    t, k = routing.experts.shape
    chosen = routing.experts.reshape(-1)
    order = jnp.argsort(chosen, stable=True)  # by expert, token order within each
    sizes = jnp.bincount(chosen, length=p["expert_gate"].shape[0]).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)
    gate = jax.lax.ragged_dot(xs, p["expert_gate"], sizes)
    up = jax.lax.ragged_dot(xs, p["expert_up"], sizes)
    ys = jax.lax.ragged_dot(jax.nn.silu(gate) * up, p["expert_down"], sizes)
    y = jnp.take(ys, _inverse(order), axis=0).reshape(t, k, -1)
    return jnp.einsum("tk,tke->te", routing.weights.astype(y.dtype), y)


def _inverse(order: jax.Array) -> jax.Array:
    """The permutation that undoes `order`."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))


def _axes(value) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def expert_groups(x: jax.Array) -> tuple[Mesh, P] | None:
    """(mesh, the tokens' spec) when the current trainer splits the experts over an expert axis of
    more than one device that splits the tokens x (T, e) too (the `ep` rules); None otherwise."""
    layout = current_layout()
    if layout is None or "expert" not in _axes(layout.activations.get("expert")):
        return None
    if layout.mesh.shape["expert"] < 2:
        return None
    spec = activation_spec(x.shape, ("batch", None), layout.activations, dict(layout.mesh.shape))
    return (layout.mesh, spec) if "expert" in _axes(spec[0]) else None


def _expert_rows(xs: jax.Array, ids: jax.Array, gate: jax.Array, up: jax.Array,
                 down: jax.Array) -> jax.Array:
    """Each row of xs (R, e) through its expert ids (R,) among the n = gate.shape[0] given:
    sorted by expert, grouped matmuls (`ragged_dot`), unsorted; rows with id n (none of these
    experts) are sorted last, left out, and come back 0."""
    n = gate.shape[0]
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=n + 1)[:n].astype(jnp.int32)
    xs = jnp.take(xs, order, axis=0)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jnp.take(jax.lax.ragged_dot(h, down, sizes), _inverse(order), axis=0)
    return jnp.where((ids < n)[:, None], ys, 0)  # ragged_dot leaves rows past the groups as is


def _wire_dtype(dtype) -> jnp.dtype:
    """The dtype of the dispatch's collectives: XLA:CPU aborts compiling the gradient's bfloat16
    collectives, so there they are float32."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(dtype)


def _expert_group_map(local, mesh: Mesh, spec: P, x: jax.Array, routing: Routing,
                      p: dict[str, jax.Array], out_specs):
    """`local(x, chosen, mix, gate, up, down)` under `jax.shard_map`: the tokens and their
    routing split as `spec`, each device's experts (the weights split over `expert`, gathered
    along the rest, and typed as varying along the token axes other than `expert`)."""
    rows = P(spec[0], None)
    manual = _axes(spec[0])
    others = tuple(a for a in manual if a != "expert")  # the weights are the same along these
    experts = P("expert", None, None)
    dtype, wire = x.dtype, _wire_dtype(x.dtype)

    def body(x, chosen, mix, gate, up, down):
        if others:  # shard_map's types: the weights now meet tokens that differ along others
            gate, up, down = jax.lax.pcast((gate, up, down), others, to="varying")
        return local(x, chosen, mix, *(a.astype(dtype) for a in (gate, up, down)))

    wide = [a.astype(wire) for a in (x, p["expert_gate"], p["expert_up"], p["expert_down"])]
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, experts, experts, experts),
                         out_specs=out_specs(rows), axis_names=set(manual))(
        wide[0], routing.experts, routing.weights, *wide[1:])


def dropless_in_expert_groups(x: jax.Array, routing: Routing, p: dict[str, jax.Array],
                              mesh: Mesh, spec: P) -> jax.Array:
    """`dropless` written out for expert parallelism: each device of an expert group holds E /
    group experts; the group all-gathers its tokens and their routing, each device runs the
    assignments of its own experts (`_expert_rows`), and the partial outputs are
    reduce-scattered back to the tokens' devices."""
    dtype, wire = x.dtype, _wire_dtype(x.dtype)

    def local(x, chosen, mix, gate, up, down):
        x, chosen, mix = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                          for a in (x, chosen, mix))
        n, (t, k) = gate.shape[0], chosen.shape
        own = chosen - jax.lax.axis_index("expert") * n
        mine = (own >= 0) & (own < n)
        ids = jnp.where(mine, own, n).reshape(-1)  # n: another device's expert
        ys = _expert_rows(jnp.repeat(x.astype(dtype), k, axis=0), ids, gate, up, down)
        y = jnp.einsum("tk,tke->te", mix.astype(wire), ys.astype(wire).reshape(t, k, -1))
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    return _expert_group_map(local, mesh, spec, x, routing, p, lambda rows: rows).astype(dtype)


def exchange_slots(moe: MoEConfig, assignments: int, group: int) -> int:
    """Assignments one device sends each device of its expert group per step under the
    all-to-all exchange: `exchange_capacity` times an even split, at most all of them."""
    if moe.exchange_capacity == 0:
        return assignments
    return min(assignments, math.ceil(moe.exchange_capacity * assignments / group))


def dropless_all_to_all(moe: MoEConfig, x: jax.Array, routing: Routing,
                        p: dict[str, jax.Array], mesh: Mesh, spec: P
                        ) -> tuple[jax.Array, jax.Array]:
    """The dropless dispatch with each token sent only to the devices of its experts: every
    device packs its (token, choice) assignments by destination device into a fixed
    (group, slots, embed) buffer (in token order; those past `exchange_slots` dropped), one
    `all_to_all` delivers them with their expert ids, each device runs its experts on what it
    received (`_expert_rows`), a second `all_to_all` returns the outputs to the buffer they came
    from, and each token mixes its choices. (output (T, e), fraction of assignments dropped)."""
    dtype, wire = x.dtype, _wire_dtype(x.dtype)
    group = mesh.shape["expert"]
    manual = tuple(_axes(spec[0]))

    def local(x, chosen, mix, gate, up, down):
        n, (t, k), e = gate.shape[0], chosen.shape, x.shape[-1]
        slots = exchange_slots(moe, t * k, group)
        place, kept = capacity_slots(chosen // n, group, slots)
        send = jnp.zeros((group * slots, e), wire).at[place].add(
            jnp.repeat(x, k, axis=0), mode="drop")
        ids = jnp.full((group * slots,), n, jnp.int32).at[place].set(
            (chosen % n).reshape(-1).astype(jnp.int32), mode="drop")
        exchange = lambda a: jax.lax.all_to_all(  # noqa: E731 [d] to device d, [s] from s
            a.reshape(group, slots, *a.shape[1:]), "expert", 0, 0).reshape(a.shape)
        ys = _expert_rows(exchange(send).astype(dtype), exchange(ids), gate, up, down)
        back = jnp.take(exchange(ys.astype(wire)), place, axis=0, mode="fill", fill_value=0)
        weights = (mix * kept.reshape(t, k)).astype(wire)
        y = jnp.einsum("tk,tke->te", weights, back.reshape(t, k, e))
        dropped = jax.lax.psum(jnp.sum(~kept).astype(jnp.float32), manual)
        return y, dropped

    y, dropped = _expert_group_map(local, mesh, spec, x, routing, p, lambda rows: (rows, P()))
    return y.astype(dtype), dropped / routing.experts.size


def capacity_slots(experts: jax.Array, num_experts: int, slots: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Each assignment's place in the (expert, capacity) buffer, flattened, in token order (a
    token's choices in rank order); those past an expert's `slots` are dropped: (place, kept)
    with place E * slots (outside the buffer) where dropped. experts (T, k) -> (T k,) twice."""
    chosen = experts.reshape(-1)
    one_hot = jax.nn.one_hot(chosen, num_experts, dtype=jnp.int32)
    queue = jnp.sum(jnp.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1  # place in its expert
    kept = queue < slots
    return jnp.where(kept, chosen * slots + queue, num_experts * slots), kept


def with_capacity(x: jax.Array, routing: Routing, p: dict[str, jax.Array], slots: int
                  ) -> tuple[jax.Array, jax.Array]:
    """The capacity dispatch: (output (T, e), the fraction of assignments dropped)."""
    t, k = routing.experts.shape
    n = p["expert_gate"].shape[0]
    place, kept = capacity_slots(routing.experts, n, slots)
    buffer = jnp.zeros((n * slots, x.shape[-1]), x.dtype)
    # each place is taken once: an add, whose gradient is a gather (a set's is not as simple)
    buffer = buffer.at[place].add(jnp.repeat(x, k, axis=0), mode="drop")
    buffer = constrain(buffer.reshape(n, slots, -1), ("expert", None, None))
    gate = jnp.einsum("xce,xef->xcf", buffer, p["expert_gate"])
    up = jnp.einsum("xce,xef->xcf", buffer, p["expert_up"])
    if jax.default_backend() == "cpu":
        # XLA:CPU (jaxlib 0.12.1) with the matmuls given to oneDNN (XLA_FLAGS with
        # --xla_cpu_experimental_ynn_fusion_type=-individual_dot beside the oneDNN flags, not
        # jaxdist's default) miscompiles the gradient of a batched SwiGLU: the gate's and the
        # input's gradients come out wrong. A barrier between the matmuls and the activation
        # keeps them apart, whatever the flags.
        gate, up = jax.lax.optimization_barrier((gate, up))
    h = jax.nn.silu(gate) * up
    out = constrain(jnp.einsum("xcf,xfe->xce", h, p["expert_down"]), ("expert", None, None))
    y = jnp.take(out.reshape(n * slots, -1), place, axis=0, mode="fill", fill_value=0)
    weights = (routing.weights * kept.reshape(t, k)).astype(y.dtype)
    return jnp.einsum("tk,tke->te", weights, y.reshape(t, k, -1)), 1.0 - kept.mean()


class LayerStats(NamedTuple):
    """One MoE layer's router statistics."""

    aux: jax.Array  # load-balancing loss
    z: jax.Array  # router z-loss
    load: jax.Array  # (E,) f_e, before any drop
    dropped: jax.Array  # fraction of assignments dropped (0 when dropless)


def moe_mlp(moe: MoEConfig, p: dict[str, jax.Array], h: jax.Array
            ) -> tuple[jax.Array, LayerStats]:
    """The MoE MLP on normed activations h (batch, seq, embed): its output and statistics."""
    b, t, e = h.shape
    x = constrain(h.reshape(b * t, e), ("batch", None))
    logits = jnp.einsum("te,ex->tx", x.astype(jnp.float32), p["router"].astype(jnp.float32))
    routing = route(moe, logits)
    n = moe.num_experts
    groups = expert_groups(x) if moe.dispatch == "dropless" else None
    if groups is not None and moe.exchange == "all_to_all":
        y, dropped = dropless_all_to_all(moe, x, routing, p, *groups)
    elif groups is not None:
        y, dropped = dropless_in_expert_groups(x, routing, p, *groups), jnp.zeros((), jnp.float32)
    elif moe.dispatch == "dropless":
        y, dropped = dropless(x, routing, p), jnp.zeros((), jnp.float32)
    else:
        y, dropped = with_capacity(x, routing, p, capacity(moe, b * t))
    if moe.shared_experts:
        y = y + _swiglu(x, p["shared_gate"], p["shared_up"], p["shared_down"])
    stats = LayerStats(load_balancing_loss(routing, n), z_loss(routing), expert_load(routing, n),
                       dropped)
    return constrain(y.reshape(b, t, e), ("batch", "seq", "embed")), stats


class MoEStats(NamedTuple):
    """Router statistics of a layer stack, carried through it with the residual stream: the
    losses summed over the layers so far, and per layer the expert load (depth, E) and the
    dropped fraction (depth,)."""

    layer: jax.Array
    aux: jax.Array
    z: jax.Array
    load: jax.Array
    dropped: jax.Array

    @classmethod
    def empty(cls, depth: int, num_experts: int) -> MoEStats:
        zero = jnp.zeros((), jnp.float32)
        return cls(jnp.zeros((), jnp.int32), zero, zero,
                   jnp.zeros((depth, num_experts), jnp.float32), jnp.zeros((depth,), jnp.float32))

    def add(self, layer: LayerStats) -> MoEStats:
        i = self.layer
        return MoEStats(i + 1, self.aux + layer.aux, self.z + layer.z,
                        self.load.at[i].set(layer.load), self.dropped.at[i].set(layer.dropped))


def moe_penalty(moe: MoEConfig, stats: MoEStats) -> jax.Array:
    """What the auxiliary losses add to the loss: their layer means, weighted."""
    depth = stats.load.shape[0]
    return (moe.aux_loss_weight * stats.aux + moe.z_loss_weight * stats.z) / depth


# per-expert metrics only up to this many (layers x experts): each is a scalar read every step
MAX_EXPERT_METRICS = 512


def moe_metrics(stats: MoEStats) -> dict[str, jax.Array]:
    """Scalar metrics of a stack's statistics, so that a collapsing router shows: the layer
    means of the two auxiliary losses and of the dropped fraction, the busiest expert's load
    relative to a balanced one (`moe_max_load`, 1: balanced); per layer i the busiest and the
    idlest expert's (`moe_max_load_l{i}`, `moe_min_load_l{i}`: E and 0 when one expert takes
    everything) and the share dropped (`moe_dropped_l{i}`); and, for up to `MAX_EXPERT_METRICS`
    layers x experts, each expert's (`moe_load_l{i}_e{j}`: the tokens it got over an even
    split's)."""
    depth, n = stats.load.shape
    relative = n * stats.load
    out = {"moe_aux_loss": stats.aux / depth, "moe_z_loss": stats.z / depth,
           "moe_dropped": stats.dropped.mean(), "moe_max_load": relative.max()}
    for i in range(depth):
        out |= {f"moe_max_load_l{i}": relative[i].max(), f"moe_min_load_l{i}": relative[i].min(),
                f"moe_dropped_l{i}": stats.dropped[i]}
        if depth * n <= MAX_EXPERT_METRICS:
            out |= {f"moe_load_l{i}_e{j}": relative[i, j] for j in range(n)}
    return out
