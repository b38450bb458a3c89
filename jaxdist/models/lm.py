"""A GPT-style decoder-only language model, from ~50k parameters (tests) to 7B (planning only).

Pre-norm blocks (RMSNorm), rotary position embeddings, causal attention, a GELU MLP, tied or
untied embeddings. Every parameter names its dimensions with logical axes (`vocab`, `embed`,
`heads`, `kv` for the head dimension, `mlp`, and `layers` for the stack), so a strategy's rules
shard it; activations name theirs too (`batch`, `seq`, ...), so sequence parallelism is a rule.
The blocks are one stack of parameters with a leading `layers` axis, run by
`jaxdist.core.layout.run_layers`: a scan on one device, a GPipe or 1F1B pipeline over the mesh's
`pipeline` axis inside a trainer, from this one definition.

    >>> model = GPT(lm_config("test"), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdist.core.layout import constrain, layers_then_loss, run_layers
from jaxdist.errors import UsageError
from jaxdist.models.attention import context_attention, context_split
from jaxdist.models.layers import param

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A decoder's shape. `vocab` 256 reads raw bytes; `remat` is the `jax.checkpoint` policy of
    each block: none (keep every activation), full (keep only block inputs), dots (keep matmul
    outputs), dots_no_batch (keep only matmuls without a batch dimension)."""

    vocab: int = 256
    seq_len: int = 128
    embed: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 512
    tied: bool = True
    remat: str = "none"
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads


LM_SIZES = {
    "test": LMConfig(seq_len=32, embed=32, depth=4, heads=4, mlp=64),                 # 0.06M
    "tiny": LMConfig(),                                                                # 0.82M
    "small": LMConfig(seq_len=256, embed=256, depth=6, heads=8, mlp=1024),            # 4.8M
    "125m": LMConfig(vocab=50304, seq_len=2048, embed=768, depth=12, heads=12, mlp=3072),
    "350m": LMConfig(vocab=50304, seq_len=2048, embed=1024, depth=24, heads=16, mlp=4096),
    "1.3b": LMConfig(vocab=50304, seq_len=2048, embed=2048, depth=24, heads=16, mlp=8192),
    "7b": LMConfig(vocab=50304, seq_len=2048, embed=4096, depth=32, heads=32, mlp=16384),
}


def lm_config(size: str, **overrides) -> LMConfig:
    """A named size (test, tiny, small, 125m, 350m, 1.3b, 7b), optionally with fields replaced."""
    if size not in LM_SIZES:
        raise UsageError(f"unknown LM size {size!r}; choose one of {', '.join(LM_SIZES)}")
    return validate(dataclasses.replace(LM_SIZES[size], **overrides))


def validate(cfg: LMConfig) -> LMConfig:
    if min(cfg.vocab, cfg.seq_len, cfg.embed, cfg.depth, cfg.heads, cfg.mlp) < 1:
        raise UsageError(f"LM sizes must be positive: {cfg}")
    if cfg.embed % cfg.heads or cfg.head_dim % 2:
        raise UsageError(f"embed {cfg.embed} must split into {cfg.heads} heads of an even size "
                         f"(rotary embeddings rotate pairs)")
    if cfg.remat not in REMAT_POLICIES:
        raise UsageError(f"unknown remat policy {cfg.remat!r}; choose one of "
                         f"{', '.join(REMAT_POLICIES)}")
    return cfg


def param_count(cfg: LMConfig) -> int:
    """Parameters, from the shapes alone (the big sizes are never allocated)."""
    e, f, layers = cfg.embed, cfg.mlp, cfg.depth
    per_layer = 4 * e * e + 2 * e * f + 2 * e
    return layers * per_layer + cfg.vocab * e * (1 if cfg.tied else 2) + e


def flops_per_token(cfg: LMConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 N for the matmuls with the parameters,
    plus 12 L T E for attention's scores and mixing (PaLM's appendix B)."""
    return 6 * (param_count(cfg) - cfg.embed) + 12 * cfg.depth * cfg.seq_len * cfg.embed


def train_flops(cfg: LMConfig, tokens: int) -> float:
    """Training FLOPs of `tokens` tokens, all devices together: `flops_per_token` plus the
    forward the backward pass computes again under the remat policy.

    Again per token: full, the blocks' forward but for the last matmul, whose output no gradient
    needs, 2 (N_layers - L E F) + 4 L T E; dots_no_batch, attention's scores and mixing, 4 L T E;
    dots and none, only elementwise work, not counted. A pipeline's extra work (the masked
    halves of its fill and drain ticks) is its bubble, not counted here. Matmuls only: XLA's
    count of one layer (where its cost analysis is right) is 3-4% higher, from elementwise work. XLA's own
    cost analysis undercounts the LM: it counts the body of a `lax.scan` (the layer stack, a
    pipeline's ticks) once."""
    layer_params = param_count(cfg) - param_count(dataclasses.replace(cfg, depth=0))
    attention = 4 * cfg.depth * cfg.seq_len * cfg.embed  # scores and mixing, forward
    block_forward = 2 * layer_params + attention
    again = {"none": 0, "dots": 0, "dots_no_batch": attention,
             "full": block_forward - 2 * cfg.depth * cfg.mlp * cfg.embed}[cfg.remat]
    return float(tokens) * (flops_per_token(cfg) + again)


LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_in", "w_out")


class Layers(nnx.Module):
    """All blocks' parameters, each with a leading axis of `depth` layers."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        n, e, h, d, f = cfg.depth, cfg.embed, cfg.heads, cfg.head_dim, cfg.mlp
        std, out_std = 0.02, 0.02 / math.sqrt(2 * n)  # GPT-2: residual projections scaled down
        self.attn_norm = param(rngs, (n, e), ("layers", "embed"), None)
        self.wq = param(rngs, (n, e, h, d), ("layers", "embed", "heads", "kv"), std)
        self.wk = param(rngs, (n, e, h, d), ("layers", "embed", "heads", "kv"), std)
        self.wv = param(rngs, (n, e, h, d), ("layers", "embed", "heads", "kv"), std)
        self.wo = param(rngs, (n, h, d, e), ("layers", "heads", "kv", "embed"), out_std)
        self.mlp_norm = param(rngs, (n, e), ("layers", "embed"), None)
        self.w_in = param(rngs, (n, e, f), ("layers", "embed", "mlp"), std)
        self.w_out = param(rngs, (n, f, e), ("layers", "mlp", "embed"), out_std)

    def stacked(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in LAYER_PARAMS}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotary(x: jax.Array, base: float, positions: jax.Array | None = None) -> jax.Array:
    """Rotates each head's pairs of features by an angle proportional to the position (each
    token's index, or `positions` (batch, seq))."""
    t, d = x.shape[1], x.shape[-1]
    inverse = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    if positions is None:
        positions = jnp.arange(t)[None]
    angles = positions[..., None].astype(jnp.float32) * inverse  # (b or 1, t, d/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)


def block(cfg: LMConfig, p: dict[str, jax.Array], x: jax.Array,
          index: jax.Array | None = None) -> jax.Array:
    """One pre-norm block on the residual stream x (batch, seq, embed).

    Inside attention and the MLP the sequence is whole and heads / hidden units are split
    (tensor parallelism); outside them the stream is named (batch, seq, embed), which sequence
    parallelism splits along seq. Under context parallelism the window is in zig-zag order and
    `index` (batch, seq) is each token's original position (`jaxdist.models.attention`)."""
    heads = ("batch", "length", "heads", "kv")
    h = rms_norm(x, p["attn_norm"])
    q = constrain(jnp.einsum("bte,ehd->bthd", h, p["wq"]), heads)
    k = constrain(jnp.einsum("bte,ehd->bthd", h, p["wk"]), heads)
    v = constrain(jnp.einsum("bte,ehd->bthd", h, p["wv"]), heads)
    q, k = rotary(q, cfg.rope_base, index), rotary(k, cfg.rope_base, index)
    split = None if index is None else context_split(x.shape[1])
    if split is not None:  # the sequence split over the mesh's context axis
        mixed = context_attention(split, q, k, v, None, index)
        return _mlp(p, constrain(x + jnp.einsum("bthd,hde->bte", constrain(mixed, heads),
                                                 p["wo"]), ("batch", "seq", "embed")))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = constrain(x + jnp.einsum("bthd,hde->bte", constrain(mixed, heads), p["wo"]),
                  ("batch", "seq", "embed"))
    return _mlp(p, x)


def _mlp(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The residual stream after the block's MLP."""
    h = jax.nn.gelu(jnp.einsum("bte,ef->btf", rms_norm(x, p["mlp_norm"]), p["w_in"]))
    h = constrain(h, ("batch", "length", "mlp"))
    return constrain(x + jnp.einsum("btf,fe->bte", h, p["w_out"]), ("batch", "seq", "embed"))


def remat(fn, policy: str):
    """`fn` under the `jax.checkpoint` policy named `policy` (one of REMAT_POLICIES)."""
    if policy == "none":
        return fn
    policies = {"full": None, "dots": jax.checkpoint_policies.dots_saveable,
                "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    return jax.checkpoint(fn, policy=policies[policy])


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Next-token cross-entropy per position, in nats (divide by ln 2 for bits per token):
    log-sum-exp of the logits less the target's logit (log_softmax is never materialized).

    The target's logit is a one-hot contraction rather than a gather: with the vocabulary split
    over the tensor axis it is a local product and one reduction, where a gather would need the
    whole row (and XLA's partitioner cannot always split a gather inside a pipeline stage). A
    target outside the vocabulary (e.g. -1 for padding) picks no logit."""
    logits = logits.astype(jnp.float32)
    picked = jnp.sum(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype) * logits,
                     axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats."""
    return token_losses(logits, targets).mean()


class GPT(nnx.Module):
    """Tokens (batch, seq) int -> next-token logits (batch, seq, vocab)."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = validate(cfg)
        self.embedding = param(rngs, (cfg.vocab, cfg.embed), ("vocab", "embed"), 0.02)
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = param(rngs, (cfg.embed,), ("embed",), None)
        if not cfg.tied:
            self.unembed = param(rngs, (cfg.embed, cfg.vocab), ("embed", "vocab"), 0.02)

    def _layer_fn(self):
        return remat(lambda p, x, index=None: block(self.cfg, p, x, index), self.cfg.remat)

    def _head(self) -> dict[str, jax.Array]:
        out = self.embedding[...].T if self.cfg.tied else self.unembed[...]
        return {"norm": self.final_norm[...], "out": out}

    @staticmethod
    def _logits(head: dict[str, jax.Array], h: jax.Array) -> jax.Array:
        logits = jnp.einsum("bte,ev->btv", rms_norm(h, head["norm"]), head["out"])
        return constrain(logits, ("batch", "length", "vocab"))

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return constrain(jnp.take(self.embedding[...], tokens, axis=0), ("batch", "seq", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens, context, order = _zigzag(tokens)
        h = run_layers(self._layer_fn(), self.layers.stacked(), self._embed(tokens), **context)
        logits = self._logits(self._head(), h)
        return logits if order is None else logits[:, np.argsort(order)]

    def loss(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean cross-entropy of predicting `targets` (tokens shifted by one), in nats."""
        def head_loss(head, h, targets):
            return cross_entropy(self._logits(head, h), targets)

        tokens, context, order = _zigzag(tokens)
        targets = targets if order is None else targets[:, order]
        return layers_then_loss(self._layer_fn(), head_loss, self.layers.stacked(),
                                self._head(), self._embed(tokens), targets, **context)


def _zigzag(tokens: jax.Array) -> tuple[jax.Array, dict, np.ndarray | None]:
    """(tokens, run_layers' context keyword, order): as given, or under context parallelism in
    zig-zag order with each token's original position as the layers' context."""
    split = context_split(tokens.shape[1])
    if split is None:
        return tokens, {}, None
    index = jnp.broadcast_to(jnp.asarray(split.order, jnp.int32), tokens.shape)
    return tokens[:, split.order], {"context": index}, split.order


def lm_loss(model: GPT, batch: Any) -> tuple[jax.Array, dict]:
    """The Trainer's loss: `batch` is (inputs, targets), each (batch, seq) integer tokens; the
    mean next-token loss in nats, and in bits per token (bits per byte for byte tokens)."""
    inputs, targets = batch
    loss = model.loss(inputs, targets)
    return loss, {"loss": loss, "bits_per_byte": loss / math.log(2)}


def lm_eval(model: GPT, batch: Any) -> dict[str, jax.Array]:
    """Sums over an evaluation batch (inputs, targets, mask) of each sequence's mean next-token
    loss, in nats and in bits per byte, with their count (`fit` reports the means)."""
    inputs, targets, mask = batch
    per_sequence = token_losses(model(inputs), targets).mean(axis=1) * mask
    return {"loss": per_sequence.sum(), "bits_per_byte": per_sequence.sum() / math.log(2),
            "count": mask.sum()}


def generate(model: Any, prompt: jax.Array, steps: int, key: jax.Array,
             temperature: float = 0.8) -> jax.Array:
    """Samples `steps` tokens after `prompt` (1-D), recomputing a window of `seq_len` each step
    (no key-value cache: this is for a short sample at the end of a run). A model that takes
    segment ids (the Llama) is told the left padding of a short context is another document."""
    window = model.cfg.seq_len
    graphdef, state = nnx.split(model)
    documents = "segment_ids" in inspect.signature(type(model).__call__).parameters

    @jax.jit
    def next_token(state, context, real, key):
        module = nnx.merge(graphdef, state)
        logits = (module(context[None], real[None]) if documents else module(context[None]))[0, -1]
        return jax.random.categorical(key, logits / temperature)

    tokens = list(map(int, prompt))
    for i in range(steps):
        context = jnp.asarray(([0] * window + tokens)[-window:], jnp.int32)
        real = jnp.asarray(([0] * window + [1] * len(tokens))[-window:], jnp.int32)
        tokens.append(int(next_token(state, context, real, jax.random.fold_in(key, i))))
    return jnp.asarray(tokens[len(prompt):], jnp.int32)
