"""Gradient reductions for the `shard_map` data-parallel step: fewer bytes per step, measured.

Each reducer is an optax-style pair: `init(params)` builds one replica's state and
`update(grads, state)` runs inside `jax.shard_map` on that replica's gradients, performs its own
collectives over the data axis and returns the replica mean (exact or approximated) and the new
state. The step chains it before the optimizer (`make_train_step(grad_reduce=...)`), so it
composes with any optax optimizer and with gradient accumulation: microbatch gradients are summed
first and compressed once per step.

| reducer | on the wire per replica (N replicas, G gradient bytes in fp32) |
|---|---|
| `mean_reduce()` | ring all-reduce of G: 2(N-1)/N G |
| `mean_reduce(jnp.bfloat16)` | the same in bf16: half |
| `int8_reduce()` | int8 all-to-all + int8 all-gather (+ one fp32 scale per block): ~1/4 |
| `topk_reduce(f)` | all-gather of f*G values and their int32 indices |
| `powersgd_reduce(r)` | all-reduce of the rank-r factors P (m x r) and Q (n x r) of each matrix |

Under FSDP or tensor parallelism gradients are reduce-scattered by XLA inside the jitted program,
not by this step: these reducers are for data parallelism (`strategy="shard_map"`) only. Top-k
and PowerSGD keep an error-feedback residual per replica (what compression dropped is added to
the next step's gradient), so nothing is lost over steps, only delayed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdist.errors import UsageError
from jaxdist.core.axes import DATA_AXIS


class GradReducer(NamedTuple):
    """`init(params) -> state` (one replica's) and `update(grads, state) -> (mean grads, state)`,
    the latter called inside `shard_map` over `axis_name`."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any], tuple[Any, Any]]


def _no_state(params):
    del params
    return ()


def _flatten(tree) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """All leaves as one fp32 vector, and the function that puts a vector back into leaves."""
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [x.size for x in leaves]
    vector = jnp.concatenate([x.astype(jnp.float32).ravel() for x in leaves])

    def unflatten(v):
        parts = jnp.split(v, np.cumsum(sizes)[:-1].tolist()) if len(sizes) > 1 else [v]
        return treedef.unflatten([p.reshape(x.shape).astype(x.dtype)
                                  for p, x in zip(parts, leaves)])

    return vector, unflatten


def _two_phase_mean(vector: jax.Array, block: int, encode, decode, axis_name: str) -> jax.Array:
    """The replica mean of `vector` sent in a compact encoding: a reduce-scatter made of an
    all-to-all of encoded chunks (each replica decodes and averages its chunk in fp32), then an
    all-gather of the encoded means. Only data movement crosses the wire, so the encoding's dtype
    is what is sent, whatever the backend supports for reductions."""
    n = lax.axis_size(axis_name)
    size = vector.size
    chunk = math.ceil(size / (n * block)) * block
    blocks = jnp.pad(vector, (0, n * chunk - size)).reshape(n, chunk // block, block)
    # row j after the all-to-all: replica j's encoded copy of this replica's chunk
    mine = decode(jax.tree.map(
        lambda x: lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0, tiled=True),
        encode(blocks))).mean(0)
    gathered = jax.tree.map(lambda x: lax.all_gather(x, axis_name), encode(mine))
    return decode(gathered).reshape(-1)[:size]


def _bits(dtype):
    """(encode, decode) sending `dtype` values bit-cast to unsigned integers of the same width."""
    carrier = {2: jnp.uint16, 1: jnp.uint8}[jnp.dtype(dtype).itemsize]
    encode = lambda x: lax.bitcast_convert_type(x.astype(dtype), carrier)  # noqa: E731
    decode = lambda b: lax.bitcast_convert_type(b, dtype).astype(jnp.float32)  # noqa: E731
    return encode, decode


def mean_reduce(dtype: Any = None, axis_name: str = DATA_AXIS) -> GradReducer:
    """The replica mean, communicated in `dtype` (default: the gradients' own, one `lax.pmean`).

    The reduction dtype is independent of the compute dtype: fp32 master gradients may be
    averaged in bf16 (half the bytes), and bf16 compute may still be averaged in fp32. A 16-bit
    mean is sent as bit-cast data (all-to-all + all-gather, summed in fp32): XLA's CPU backend
    widens a bf16 all-reduce to fp32 (seen in the compiled HLO), which would send fp32 bytes.
    """
    if dtype is not None and jnp.dtype(dtype).itemsize not in (1, 2, 4):
        raise UsageError(f"cannot reduce in {dtype}")

    def update(grads, state):
        if dtype is None or jnp.dtype(dtype).itemsize == 4:
            return jax.tree.map(lambda g: lax.pmean(g.astype(dtype or g.dtype), axis_name)
                                .astype(g.dtype), grads), state
        encode, decode = _bits(dtype)
        vector, unflatten = _flatten(grads)
        return unflatten(_two_phase_mean(vector, 1, encode, decode, axis_name)), state

    return GradReducer(_no_state, update)


def _quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 values and one fp32 scale per row (last axis = a block): x ~ q * scale."""
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def _dequantize(qs: tuple[jax.Array, jax.Array]) -> jax.Array:
    q, scale = qs
    return q.astype(jnp.float32) * scale[..., None]


def int8_error_bound(per_replica: jax.Array, block: int) -> jax.Array:
    """Per element: the largest error of `int8_reduce` for these replicas' gradients
    (`per_replica`: (N, size), flattened), from its two rounding steps: each replica's blocks are
    rounded to half a step, then the mean's blocks are rounded again to half a step."""
    n, size = per_replica.shape
    chunk = math.ceil(size / (n * block)) * block
    padded = jnp.pad(per_replica, ((0, 0), (0, n * chunk - size)))
    blocks = padded.reshape(n, -1, block)
    first = (jnp.max(jnp.abs(blocks), axis=-1) / 127.0 / 2).mean(0)  # mean of half-steps
    mean_blocks = jnp.abs(blocks.mean(0)).max(-1) + first              # bound on |rounded mean|
    second = mean_blocks / 127.0 / 2
    return jnp.repeat(first + second, block)[:size]


def int8_reduce(block: int = 256, axis_name: str = DATA_AXIS) -> GradReducer:
    """The replica mean through an int8 all-reduce with one fp32 scale per `block` values.

    Like ZeRO++'s quantized gradients: every replica quantizes its gradient in blocks, an int8
    all-to-all hands replica j the j-th chunk of everyone's (a reduce-scatter), j dequantizes and
    averages in fp32, quantizes the mean of its chunk again, and an int8 all-gather returns all
    chunks to everyone. Bytes: a quarter of an fp32 all-reduce, plus 4/block for the scales and
    the padding of each chunk to whole blocks. The error is bounded by two roundings (see
    `int8_error_bound`); no state is kept.
    """
    if block < 1:
        raise UsageError(f"the int8 block size must be >= 1, got {block}")

    def update(grads, state):
        vector, unflatten = _flatten(grads)
        return unflatten(_two_phase_mean(vector, block, _quantize, _dequantize, axis_name)), state

    return GradReducer(_no_state, update)


class ResidualState(NamedTuple):
    residual: Any  # what compression left out, added to the next gradient


def topk_reduce(fraction: float = 0.01, error_feedback: bool = True,
                axis_name: str = DATA_AXIS) -> GradReducer:
    """The mean of every replica's `fraction` largest-magnitude gradient entries (of all
    parameters together), with error feedback: the entries not sent stay in a residual that is
    added to the next step's gradient, so every gradient entry is applied eventually.

    Each replica all-gathers k = fraction * size values and their int32 indices and scatter-adds
    them into a dense mean.
    """
    if not 0 < fraction <= 1:
        raise UsageError(f"the top-k fraction must be in (0, 1], got {fraction}")

    def init(params):
        return ResidualState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(grads, state):
        n = lax.axis_size(axis_name)
        corrected = jax.tree.map(lambda g, r: g.astype(jnp.float32) + r, grads, state.residual)
        vector, unflatten = _flatten(corrected)
        k = max(1, int(fraction * vector.size))
        _, index = lax.top_k(jnp.abs(vector), k)
        values = vector[index]
        sent = jnp.zeros_like(vector).at[index].set(values)
        residual = vector - sent if error_feedback else jnp.zeros_like(vector)
        values = lax.all_gather(values, axis_name).reshape(-1)
        index = lax.all_gather(index.astype(jnp.int32), axis_name).reshape(-1)
        mean = jnp.zeros_like(vector).at[index].add(values) / n
        mean_tree = jax.tree.map(lambda m, g: m.astype(g.dtype), unflatten(mean), grads)
        return mean_tree, ResidualState(unflatten(residual))

    return GradReducer(init, update)


class PowerSGDState(NamedTuple):
    q: Any         # per compressed matrix: (columns, rank), warm-started from the last step
    residual: Any  # per compressed matrix: error feedback, (rows, columns)


def _as_matrix(x) -> tuple[int, int]:
    return (math.prod(x.shape[:-1]), x.shape[-1]) if x.ndim >= 2 else (x.size, 1)


def _compressible(x, rank: int) -> bool:
    rows, cols = _as_matrix(x)
    return x.ndim >= 2 and rank * (rows + cols) < rows * cols


def powersgd_reduce(rank: int = 4, error_feedback: bool = True, seed: int = 0,
                    axis_name: str = DATA_AXIS) -> GradReducer:
    """PowerSGD (Vogels et al. 2019): each weight matrix's mean gradient approximated at rank r by
    one power iteration, P = M Q, all-reduce P, orthonormalize, Q = M^T P, all-reduce Q,
    M ~ P Q^T, with Q warm-started from the previous step and error feedback.

    Convolution kernels are taken as (kh*kw*in, out) matrices; vectors (biases) and matrices too
    small to gain are all-reduced exactly. When the mean gradient has rank <= r the result is
    exact.
    """
    if rank < 1:
        raise UsageError(f"the PowerSGD rank must be >= 1, got {rank}")

    def init(params):
        key = jax.random.key(seed)

        def q0(i, p):
            cols = _as_matrix(p)[1]
            return (jax.random.normal(jax.random.fold_in(key, i), (cols, rank), jnp.float32)
                    if _compressible(p, rank) else jnp.zeros((0,), jnp.float32))

        leaves, treedef = jax.tree.flatten(params)
        q = treedef.unflatten([q0(i, p) for i, p in enumerate(leaves)])
        residual = jax.tree.map(
            lambda p: jnp.zeros(_as_matrix(p) if _compressible(p, rank) else (0,), jnp.float32),
            params)
        return PowerSGDState(q, residual)

    def update(grads, state):
        leaves, treedef = jax.tree.flatten(grads)
        qs = treedef.flatten_up_to(state.q)
        residuals = treedef.flatten_up_to(state.residual)
        small = [i for i, g in enumerate(leaves) if not _compressible(g, rank)]
        big = [i for i, g in enumerate(leaves) if _compressible(g, rank)]
        out, new_q, new_residual = list(leaves), list(qs), list(residuals)
        if small:
            exact = lax.pmean([leaves[i] for i in small], axis_name)
            for i, g in zip(small, exact):
                out[i] = g
        matrices = [leaves[i].astype(jnp.float32).reshape(_as_matrix(leaves[i])) + residuals[i]
                    for i in big]
        ps = lax.pmean([m @ qs[i] for m, i in zip(matrices, big)], axis_name)
        ps = [jnp.linalg.qr(p)[0] for p in ps]
        q_next = lax.pmean([m.T @ p for m, p in zip(matrices, ps)], axis_name)
        for i, m, p, q in zip(big, matrices, ps, q_next):
            approx = p @ q.T
            out[i] = approx.reshape(leaves[i].shape).astype(leaves[i].dtype)
            new_q[i] = q
            new_residual[i] = m - approx if error_feedback else jnp.zeros_like(m)
        return treedef.unflatten(out), PowerSGDState(treedef.unflatten(new_q),
                                                     treedef.unflatten(new_residual))

    return GradReducer(init, update)


REDUCERS = ("mean", "bf16", "int8", "topk", "powersgd")


def make_reducer(name: str, *, topk_fraction: float = 0.01, powersgd_rank: int = 4,
                 int8_block: int = 256) -> GradReducer:
    """A reducer by name: mean (fp32), bf16 (mean in bf16), int8, topk, powersgd."""
    if name == "mean":
        return mean_reduce()
    if name == "bf16":
        return mean_reduce(jnp.bfloat16)
    if name == "int8":
        return int8_reduce(int8_block)
    if name == "topk":
        return topk_reduce(topk_fraction)
    if name == "powersgd":
        return powersgd_reduce(powersgd_rank)
    raise UsageError(f"unknown gradient reduction {name!r}; choose one of {', '.join(REDUCERS)}")
