"""Context parallelism: causal attention over a sequence split across the mesh's `context` axis.

Outside attention every token is independent, so the sequence of the residual stream, the MLP
and the logits is simply split over `context` (the rules' `seq` and `length` activations).
Attention is where tokens meet: it runs in `jax.shard_map` with only the context axis manual
(data, fsdp and tensor stay with XLA, as in the pipeline), in one of two ways:

- **ring** (`ring_attention`): each device keeps its queries and passes its key/value block
  around the ring with `lax.ppermute`, C - 1 times; scores are folded in with an online softmax
  (running max and sum in float32), so no device ever holds more than two blocks of keys.
- **allgather** (`allgather_attention`): every device all-gathers the keys and values (small
  under grouped-query attention) and attends with its own queries: one collective, fewer,
  larger messages, keys of the whole sequence on every device.

Causal work is balanced with the zig-zag order: the sequence is cut into 2C chunks and device i
holds chunks i and 2C - 1 - i (`zigzag_order`; the model permutes its tokens once, before the
embedding). In the ring, a block from an earlier device is then seen by all local queries but
only through its first chunk, one from a later device by the second half of the queries only:
every step is half a block of work on every device. Masks come from each token's original index
and segment id (packed documents), so any order is correct; the zig-zag order makes it fast.

Gradients are autodiff's: the transpose of a ppermute is the reverse ppermute, of an all-gather a
reduce-scatter.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxdist.core.layout import current_layout
from jaxdist.errors import UsageError

CONTEXT_AXIS = "context"
CONTEXT_ATTENTIONS = ("ring", "allgather")
_MASKED = -1e30  # a finite "minus infinity": a fully masked block adds exp(-1e30 - max) = 0


class ContextSplit(NamedTuple):
    """How the current trainer splits the sequence: `ways` devices on the context axis, the
    `kind` of attention ("ring" or "allgather") and the zig-zag `order` of a window."""

    ways: int
    kind: str
    order: np.ndarray


def zigzag_order(length: int, ways: int) -> np.ndarray:
    """The token order that puts chunks i and 2C - 1 - i of 2C on device i of C.

    >>> zigzag_order(8, 2)
    array([0, 1, 6, 7, 2, 3, 4, 5])
    """
    if length % (2 * ways):
        raise UsageError(f"a sequence of {length} tokens does not split into {2 * ways} chunks "
                         f"(2 per device of context={ways}); use a multiple of {2 * ways}")
    chunks = np.arange(length).reshape(2 * ways, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ways - 1 - i]])
                           for i in range(ways)])


def context_split(length: int) -> ContextSplit | None:
    """The current trainer's context parallelism for windows of `length` tokens; None when there
    is none (no trainer, or a context axis of one device)."""
    layout = current_layout()
    if layout is None or layout.mesh.shape.get(CONTEXT_AXIS, 1) < 2:
        return None
    ways = layout.mesh.shape[CONTEXT_AXIS]
    return ContextSplit(ways, layout.context_attention, zigzag_order(length, ways))


def _allowed(q_seg, q_index, k_seg, k_index) -> jax.Array:
    """(b, 1, 1, q, k): causal by original index, within a document."""
    ok = (k_index[:, None, :] <= q_index[:, :, None]) & (k_seg[:, None, :] == q_seg[:, :, None])
    return ok[:, None, None]


class _Softmax(NamedTuple):
    """Online-softmax state of a block of queries: running max, sum (b, kv, g, q) and the
    unnormalized output (b, kv, g, q, d), all float32."""

    top: jax.Array
    total: jax.Array
    out: jax.Array

    @classmethod
    def empty(cls, q: jax.Array) -> _Softmax:
        b, t, kv, g, d = q.shape
        return cls(jnp.full((b, kv, g, t), -jnp.inf, jnp.float32),
                   jnp.zeros((b, kv, g, t), jnp.float32), jnp.zeros((b, kv, g, t, d), jnp.float32))

    def rows(self, start: int, stop: int | None = None) -> _Softmax:
        return _Softmax(self.top[..., start:stop], self.total[..., start:stop],
                        self.out[..., start:stop, :])

    def result(self, dtype) -> jax.Array:
        """(b, q, kv, g, d): the normalized output."""
        return (self.out / self.total[..., None]).transpose(0, 3, 1, 2, 4).astype(dtype)


def _fold(state: _Softmax, q, k, v, allowed) -> _Softmax:
    """`state` with the keys k, values v (b, s, kv, d) of a block folded in, for the queries
    q (b, t, kv, g, d) it holds. The running max is a stabilizer only (the result does not
    depend on it), so it is not differentiated."""
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(q.shape[-1])
    logits = jnp.where(allowed, logits.astype(jnp.float32), _MASKED)
    top = jnp.maximum(state.top, lax.stop_gradient(logits.max(-1)))
    weights = jnp.exp(logits - top[..., None])
    scale = jnp.exp(state.top - top)
    mixed = jnp.einsum("bkgqs,bskd->bkgqd", weights.astype(v.dtype), v)
    return _Softmax(top, state.total * scale + weights.sum(-1),
                    state.out * scale[..., None] + mixed.astype(jnp.float32))


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    """(b, t, h, d) -> (b, t, kv, g, d): query head h serves key/value head h // g."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def ring_attention(q, k, v, segment_ids, index, *, axis: str = CONTEXT_AXIS) -> jax.Array:
    """Causal attention of this device's queries over the whole ring's keys (inside
    `jax.shard_map` over `axis`, the sequence in zig-zag order): q (b, t, h, d), k and v
    (b, t, kv, d), segment ids and original token indices (b, t) of the local 2 chunks.

    A block from another device is half a block of work, two chunk pairs: our second chunk
    sees its first always; then our first its first (it came from an earlier device) or our
    second its second (from a later one). The choice is a select, not a branch, so every
    device runs the same program (a collective inside a branch only some devices take
    deadlocks)."""
    ways = lax.axis_size(axis)
    me = lax.axis_index(axis)
    half = q.shape[1] // 2
    qg = _grouped(q, k.shape[2])
    state = _fold_chunk(_Softmax.empty(qg), (qg, segment_ids, index), (k, v, segment_ids, index))
    mine = [(qg[:, :half], segment_ids[:, :half], index[:, :half]),
            (qg[:, half:], segment_ids[:, half:], index[:, half:])]
    ring = [(j, (j + 1) % ways) for j in range(ways)]

    def step(carry, hop):
        (first, second), block = carry
        block = lax.ppermute(block, axis, ring)
        theirs = [tuple(a[:, :half] for a in block), tuple(a[:, half:] for a in block)]
        second = _fold_chunk(second, mine[1], theirs[0])
        earlier = hop <= me  # the block came from device me - hop, before us in the ring

        def pick(a, b):
            return jax.tree.map(lambda x, y: jnp.where(earlier, x, y), a, b)

        rows = _fold_chunk(pick(first, second), pick(mine[0], mine[1]),
                           pick(theirs[0], theirs[1]))
        return ((pick(rows, first), pick(second, rows)), block), None

    carry = ((state.rows(0, half), state.rows(half)), (k, v, segment_ids, index))
    (first, second), _ = lax.scan(step, carry, jnp.arange(1, ways))[0]
    state = _Softmax(*(jnp.concatenate([a, b], axis=a.ndim - (1 if a.ndim == 4 else 2))
                       for a, b in zip(first, second)))
    return state.result(q.dtype).reshape(q.shape)


@jax.checkpoint
def _fold_chunk(state: _Softmax, queries, keys) -> _Softmax:
    """`_fold` of a chunk of keys (k, v, segment ids, indices) into the state of a chunk of
    queries (grouped q, segment ids, indices). Its scores are computed again for the backward
    (`jax.checkpoint`), as flash attention does: the ring's C steps keep their inputs, not C
    blocks of scores."""
    q, q_seg, q_index = queries
    k, v, k_seg, k_index = keys
    return _fold(state, q, k, v, _allowed(q_seg, q_index, k_seg, k_index))


def allgather_attention(q, k, v, segment_ids, index, *, axis: str = CONTEXT_AXIS) -> jax.Array:
    """Causal attention of this device's queries over the keys and values all-gathered from
    the context axis (inside `jax.shard_map` over `axis`); shapes as `ring_attention`'s."""
    gather = functools.partial(lax.all_gather, axis_name=axis, axis=1, tiled=True)
    k_all, v_all, seg_all, index_all = (gather(a) for a in (k, v, segment_ids, index))
    qg = _grouped(q, k.shape[2])
    state = _fold(_Softmax.empty(qg), qg, k_all, v_all,
                  _allowed(segment_ids, index, seg_all, index_all))
    return state.result(q.dtype).reshape(q.shape)


def context_attention(split: ContextSplit, q, k, v, segment_ids, index) -> jax.Array:
    """Causal attention of q (b, t, h, d) over k, v (b, t, kv, d), the sequence (in zig-zag
    order, `split.order`) split over the context axis; `segment_ids` (None: one document) and
    `index` (the tokens' original positions) are (b, t)."""
    if split.kind not in CONTEXT_ATTENTIONS:
        raise UsageError(f"unknown context attention {split.kind!r}; choose one of "
                         f"{', '.join(CONTEXT_ATTENTIONS)}")
    if segment_ids is None:
        segment_ids = jnp.ones(index.shape, jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = current_layout().mesh
    attend = ring_attention if split.kind == "ring" else allgather_attention
    sequence = P(None, CONTEXT_AXIS)
    return jax.shard_map(functools.partial(attend, axis=CONTEXT_AXIS), mesh=mesh,
                         in_specs=(sequence,) * 5, out_specs=sequence,
                         axis_names={CONTEXT_AXIS})(q, k, v, segment_ids, index)
