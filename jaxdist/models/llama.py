"""The Llama family of decoders (Llama 2/3, Mistral, Qwen-style shapes), in the layout of
Hugging Face's `LlamaForCausalLM`, so its checkpoints load as they are (`jaxdist.io.hf`).

Grouped-query attention (`kv_heads` dividing `heads`; 1 is multi-query), a SwiGLU MLP, rotary
embeddings with a chosen theta and, optionally, Llama 3's frequency scaling, RMSNorm, tied or
untied embeddings. Every parameter names its dimensions with logical axes, so every strategy's
rules shard it; the blocks are one stack with a leading `layers` axis, run by
`jaxdist.core.layout.run_layers` (a scan, or a pipeline over the mesh's `pipeline` axis).

Packed documents: `model(tokens, segment_ids)` lets a token attend only to earlier tokens of its
own document (segment ids number the documents of a row from 1; 0 is padding), and rotary
positions restart at each document, so a document's logits do not depend on its neighbours.

    >>> model = Llama(llama_config("test"), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdist.core.layout import constrain, current_layout, layers_then_loss, run_layers
from jaxdist.errors import UsageError
from jaxdist.models.attention import context_attention, context_split
from jaxdist.models.layers import param
from jaxdist.models.lm import REMAT_POLICIES, remat, rms_norm, token_losses
from jaxdist.models.moe import (FLOAT32_PARAMS, MOE_PARAMS, MoEConfig, MoEStats, moe_metrics,
                                moe_mlp, moe_param_count, moe_params, moe_penalty, validate_moe)


COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's rotary frequency scaling (HF `rope_type: llama3`): wavelengths longer than the
    original context / `low_freq_factor` are stretched by `factor`, shorter than original /
    `high_freq_factor` kept, those between interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family decoder's shape; `to_hf` / `from_hf` translate HF's `config.json`.

    `seq_len` is the training window (not a limit of the model: rotary embeddings have none;
    `max_positions` is what HF's config records). `remat` is each block's `jax.checkpoint`
    policy (see `jaxdist.models.lm.LMConfig`). `unroll` compiles each layer on its own
    (`jaxdist.core.layout.scan_layers`): faster small models on a CPU, longer compiles.
    `compute_dtype` bfloat16 runs the matmuls in bfloat16 (float32 master weights, norms,
    softmax and loss in float32). `moe`: every layer's MLP is that mixture of experts
    (`jaxdist.models.moe`); None, the dense SwiGLU."""

    vocab: int = 256
    seq_len: int = 128
    embed: int = 128
    depth: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 352
    head_dim: int = 0  # 0: embed // heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tied: bool = False
    max_positions: int = 2048
    remat: str = "none"
    unroll: bool = False
    compute_dtype: str = "float32"
    moe: MoEConfig | None = None

    @property
    def dim(self) -> int:
        """Features per head."""
        return self.head_dim or self.embed // self.heads

    def to_hf(self) -> dict[str, Any]:
        """HF `LlamaConfig` fields (both the `rope_theta`/`rope_scaling` of transformers 4 and
        the `rope_parameters` of 5 are written, so either reads it)."""
        if self.moe is not None:
            raise UsageError("a mixture-of-experts Llama has no HF LlamaForCausalLM config")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling)}
        scaling = None if self.rope_scaling is None else {
            k: v for k, v in rope.items() if k != "rope_theta"}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab, "hidden_size": self.embed,
            "intermediate_size": self.mlp, "num_hidden_layers": self.depth,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.dim, "hidden_act": "silu", "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
            "tie_word_embeddings": self.tied, "max_position_embeddings": self.max_positions,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """The config of HF's `config.json` fields; UsageError naming what jaxdist cannot run
        (another architecture, biases, another activation or rope type)."""
        if hf.get("model_type", "llama") not in ("llama", "mistral"):
            raise UsageError(f"config.json: model_type {hf.get('model_type')!r} is not a Llama "
                             f"(llama or mistral)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise UsageError(f"config.json: {flag} is true; jaxdist's Llama has no biases")
        if hf.get("hidden_act", "silu") != "silu":
            raise UsageError(f"config.json: hidden_act {hf['hidden_act']!r}; only silu (SwiGLU)")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UsageError(f"config.json: rope type {rope_type!r}; only default and llama3")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(**{f.name: rope[f.name] for f in
                                     dataclasses.fields(RopeScaling) if f.name in rope})
        try:
            heads = hf["num_attention_heads"]
            config = cls(
                vocab=hf["vocab_size"], embed=hf["hidden_size"], mlp=hf["intermediate_size"],
                depth=hf["num_hidden_layers"], heads=heads,
                kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or 0, rope_theta=float(theta), rope_scaling=scaling,
                norm_eps=hf.get("rms_norm_eps", 1e-6), tied=hf.get("tie_word_embeddings", False),
                max_positions=hf.get("max_position_embeddings", 2048))
        except KeyError as missing:
            raise UsageError(f"config.json has no {missing.args[0]!r}") from None
        if config.head_dim == config.embed // config.heads:
            config = dataclasses.replace(config, head_dim=0)
        return validate(dataclasses.replace(config, **overrides))


# Small sizes train here; the published shapes are for the planner (`python -m jaxdist.plan`).
LLAMA_SIZES = {
    "test": LlamaConfig(seq_len=32, embed=32, depth=4, heads=4, kv_heads=2, mlp=64),
    "tiny": LlamaConfig(unroll=True),
    "small": LlamaConfig(vocab=4096, seq_len=256, embed=256, depth=6, heads=8, kv_heads=2,
                         mlp=704, unroll=True),
    "base": LlamaConfig(vocab=8192, seq_len=512, embed=512, depth=8, heads=8, kv_heads=4,
                        mlp=1408, unroll=True),
    "3.2-1b": LlamaConfig(
        vocab=128256, seq_len=8192, embed=2048, depth=16, heads=32, kv_heads=8, mlp=8192,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tied=True,
        max_positions=131072),
    "3.1-8b": LlamaConfig(
        vocab=128256, seq_len=8192, embed=4096, depth=32, heads=32, kv_heads=8, mlp=14336,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        max_positions=131072),
    "3.1-70b": LlamaConfig(
        vocab=128256, seq_len=8192, embed=8192, depth=80, heads=64, kv_heads=8, mlp=28672,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        max_positions=131072),
    # Qwen2.5-7B's shapes (its q/k/v biases, 0.01% of the parameters, are left out)
    "qwen2.5-7b": LlamaConfig(
        vocab=152064, seq_len=4096, embed=3584, depth=28, heads=28, kv_heads=4, mlp=18944,
        rope_theta=1000000.0, norm_eps=1e-6, max_positions=32768),
    "mistral-7b": LlamaConfig(
        vocab=32000, seq_len=4096, embed=4096, depth=32, heads=32, kv_heads=8, mlp=14336,
        rope_theta=10000.0, max_positions=32768),
    # mixtures of experts, for the planner: Mixtral-8x7B's shapes (46.7B parameters, 12.9B active)
    "mixtral-8x7b": LlamaConfig(
        vocab=32000, seq_len=4096, embed=4096, depth=32, heads=32, kv_heads=8, mlp=14336,
        rope_theta=1000000.0, max_positions=32768,
        moe=MoEConfig(num_experts=8, top_k=2, aux_loss_weight=0.02, exchange="all_to_all")),
    # DeepSeek-V3's MoE shapes (256 routed experts of width 2048 + 1 shared, sigmoid top-8),
    # approximated: multi-head attention (128 heads of 56) in place of its multi-head latent
    # attention, with about as many parameters (206M a layer for MLA's 187M), and all 61 layers
    # MoE (V3's first 3 are dense): 705B parameters, 38.7B active, for the published 671B, 37B
    "deepseek-v3-like": LlamaConfig(
        vocab=129280, seq_len=4096, embed=7168, depth=61, heads=128, kv_heads=128, mlp=18432,
        norm_eps=1e-6, max_positions=163840,
        moe=MoEConfig(num_experts=256, top_k=8, expert_mlp=2048, shared_experts=1,
                      router="sigmoid", exchange="all_to_all")),
}


def llama_config(size: str, **overrides: Any) -> LlamaConfig:
    """A named size, optionally with fields replaced."""
    if size not in LLAMA_SIZES:
        raise UsageError(f"unknown Llama size {size!r}; choose one of {', '.join(LLAMA_SIZES)}")
    return validate(dataclasses.replace(LLAMA_SIZES[size], **overrides))


def validate(cfg: LlamaConfig) -> LlamaConfig:
    if min(cfg.vocab, cfg.seq_len, cfg.embed, cfg.depth, cfg.heads, cfg.kv_heads, cfg.mlp) < 1:
        raise UsageError(f"Llama sizes must be positive: {cfg}")
    if cfg.heads % cfg.kv_heads:
        raise UsageError(f"kv_heads {cfg.kv_heads} must divide heads {cfg.heads} "
                         f"(each key/value head serves a group of query heads)")
    if not cfg.head_dim and cfg.embed % cfg.heads:
        raise UsageError(f"embed {cfg.embed} does not split into {cfg.heads} heads; set head_dim")
    if cfg.dim % 2:
        raise UsageError(f"head dimension {cfg.dim} must be even (rotary embeddings rotate pairs)")
    if cfg.remat not in REMAT_POLICIES:
        raise UsageError(f"unknown remat policy {cfg.remat!r}; choose one of "
                         f"{', '.join(REMAT_POLICIES)}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"unknown compute dtype {cfg.compute_dtype!r}; choose one of "
                         f"{', '.join(COMPUTE_DTYPES)}")
    if cfg.moe is not None:
        validate_moe(cfg.moe)
    return cfg


def param_count(cfg: LlamaConfig, *, active: bool = False) -> int:
    """Parameters, from the shapes alone (the published sizes are never allocated); `active`:
    those one token uses (a mixture of experts': its top_k experts, not all)."""
    e, f, d = cfg.embed, cfg.mlp, cfg.dim
    attention = e * d * (2 * cfg.heads + 2 * cfg.kv_heads)
    mlp = 3 * e * f if cfg.moe is None else moe_param_count(cfg.moe, e, f, active=active)
    per_layer = attention + mlp + 2 * e
    return cfg.depth * per_layer + cfg.vocab * e * (1 if cfg.tied else 2) + e


def train_flops(cfg: LlamaConfig, tokens: int) -> float:
    """Training FLOPs of `tokens` tokens: 6 per parameter of every matmul (the embedding lookup
    is none, the unembedding is one) plus attention's scores and mixing, 12 L T H d (PaLM's
    appendix B), the full causal square, as XLA computes it; plus the forward that remat
    recomputes (see `jaxdist.models.lm.train_flops`). A mixture of experts counts the
    parameters a token uses (`param_count(active=True)`; the dispatch's sorting is not counted)."""
    active = param_count(cfg, active=True)
    matmul_params = active - cfg.embed * (cfg.depth * 2 + 1) - (
        0 if cfg.tied else cfg.vocab * cfg.embed)
    attention = 4 * cfg.depth * cfg.seq_len * cfg.heads * cfg.dim  # forward
    layer_matmuls = active - param_count(dataclasses.replace(cfg, depth=0), active=True) \
        - 2 * cfg.embed * cfg.depth
    again = {"none": 0, "dots": 0, "dots_no_batch": attention,
             "full": 2 * layer_matmuls + attention - 2 * cfg.depth * _down_width(cfg) * cfg.embed
             }[cfg.remat]
    return float(tokens) * (6 * matmul_params + 3 * attention + again)


def _down_width(cfg: LlamaConfig) -> int:
    """The hidden units a token's MLP down-projection reads."""
    if cfg.moe is None:
        return cfg.mlp
    return (cfg.moe.top_k + cfg.moe.shared_experts) * (cfg.moe.expert_mlp or cfg.mlp)


LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


class LlamaLayers(nnx.Module):
    """All blocks' parameters, each with a leading axis of `depth` layers. Key/value heads are
    their own logical axis (`kv_heads`): tensor parallelism splits query heads and replicates
    the few key/value heads (multi-query has one), whose projections are small. With
    `cfg.moe` the MLP's are the mixture of experts' (`jaxdist.models.moe.MOE_PARAMS`)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        n, e, h, k, d, f = cfg.depth, cfg.embed, cfg.heads, cfg.kv_heads, cfg.dim, cfg.mlp
        std = 0.02  # HF's initializer_range, for every matrix
        self.attn_norm = param(rngs, (n, e), ("layers", "embed"), None)
        self.wq = param(rngs, (n, e, h, d), ("layers", "embed", "heads", "kv"), std)
        self.wk = param(rngs, (n, e, k, d), ("layers", "embed", "kv_heads", "kv"), std)
        self.wv = param(rngs, (n, e, k, d), ("layers", "embed", "kv_heads", "kv"), std)
        self.wo = param(rngs, (n, h, d, e), ("layers", "heads", "kv", "embed"), std)
        self.mlp_norm = param(rngs, (n, e), ("layers", "embed"), None)
        if cfg.moe is not None:
            for name, variable in moe_params(cfg.moe, n, e, f, rngs=rngs).items():
                setattr(self, name, variable)
            return
        self.w_gate = param(rngs, (n, e, f), ("layers", "embed", "mlp"), std)
        self.w_up = param(rngs, (n, e, f), ("layers", "embed", "mlp"), std)
        self.w_down = param(rngs, (n, f, e), ("layers", "mlp", "embed"), std)

    def stacked(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in LAYER_PARAMS + MOE_PARAMS
                if hasattr(self, name)}


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Rotary angular frequencies of a head's feature pairs, with Llama 3's scaling if set
    (HF's `_compute_llama3_parameters`)."""
    d = cfg.dim
    inverse = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d)
    s = cfg.rope_scaling
    if s is None:
        return inverse.astype(np.float32)
    low_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    wavelength = 2 * math.pi / inverse
    scaled = np.where(wavelength > low_wavelength, inverse / s.factor, inverse)
    smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate(x: jax.Array, positions: jax.Array, inverse: np.ndarray) -> jax.Array:
    """Rotary embedding in HF's layout: feature i pairs with feature i + d/2 ("rotate half")."""
    angles = positions[..., None].astype(jnp.float32) * inverse  # (b, t, d/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Each token's position within its document: its index less its document's first index."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def attention_mask(segment_ids: jax.Array | None, t: int) -> jax.Array:
    """(b or 1, 1, t, t): causal, and within a document where segment ids are given."""
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if segment_ids is None:
        return causal
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same


@jax.custom_vjp
def _cotangent_once(x: jax.Array) -> jax.Array:
    return x


def _cotangent_once_fwd(x):
    return x, None


def _cotangent_once_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


_cotangent_once.defvjp(_cotangent_once_fwd, _cotangent_once_bwd)


def dense(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(spec, x, w)` whose output's gradient is computed once, before the two matmuls of
    the backward use it. Without the barrier XLA's CPU compiler fuses the elementwise gradient
    of what follows (SwiGLU, RMSNorm, rotary) into each of them, recomputing it, once into a
    transposed layout: the backward took 5x the forward instead of 2x."""
    return _cotangent_once(jnp.einsum(spec, x, w))


def block(cfg: LlamaConfig, p: dict[str, jax.Array], x: jax.Array,
          context: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """One pre-norm block on the residual stream x (batch, seq, embed); `context` is (segment
    ids, positions) of packed documents, None for one document per row."""
    p = _in_compute_dtype(cfg, p)
    x = _attention(cfg, p, x, context)
    h = _norm(x, p["mlp_norm"], cfg)
    gate = dense("bte,ef->btf", h, p["w_gate"])
    up = dense("bte,ef->btf", h, p["w_up"])
    h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return constrain(x + dense("btf,fe->bte", h, p["w_down"]), ("batch", "seq", "embed"))


def moe_block(cfg: LlamaConfig, p: dict[str, jax.Array], carry: tuple[jax.Array, MoEStats],
              context: tuple[jax.Array, jax.Array] | None = None
              ) -> tuple[jax.Array, MoEStats]:
    """`block` with the mixture-of-experts MLP: the residual stream travels with the router
    statistics of the layers so far, which the layer adds its own to."""
    x, stats = carry
    p = _in_compute_dtype(cfg, p)
    x = _attention(cfg, p, x, context)
    y, layer = moe_mlp(cfg.moe, p, _norm(x, p["mlp_norm"], cfg))
    return constrain(x + y, ("batch", "seq", "embed")), stats.add(layer)


def _in_compute_dtype(cfg: LlamaConfig, p: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The matrices in the compute dtype; the norms and the router stay float32."""
    dtype = jnp.dtype(cfg.compute_dtype)
    return {name: w.astype(dtype) if w.ndim > 1 and name not in FLOAT32_PARAMS else w
            for name, w in p.items()}


def _attention(cfg: LlamaConfig, p: dict[str, jax.Array], x: jax.Array,
               context: tuple[jax.Array, ...] | None) -> jax.Array:
    """The residual stream after the block's attention. Under context parallelism `context`
    also holds each token's original index (the window is in zig-zag order, `_sequence`)."""
    b, t, _ = x.shape
    segment_ids, positions, *index = context if context is not None else (
        None, jnp.broadcast_to(jnp.arange(t), (b, t)))
    heads = ("batch", "length", "heads", "kv")
    inverse = inverse_frequencies(cfg)
    h = _norm(x, p["attn_norm"], cfg)
    q = rotate(constrain(dense("bte,ehd->bthd", h, p["wq"]), heads), positions, inverse)
    k = rotate(dense("bte,ekd->btkd", h, p["wk"]), positions, inverse)
    v = dense("bte,ekd->btkd", h, p["wv"])
    split = context_split(t) if index else None
    if split is not None:  # the sequence split over the mesh's context axis
        mixed = constrain(context_attention(split, q, k, v, segment_ids, index[0]), heads)
        return constrain(x + dense("bthd,hde->bte", mixed, p["wo"]), ("batch", "seq", "embed"))
    group = cfg.heads // cfg.kv_heads  # query heads per key/value head
    k = constrain(jnp.repeat(k, group, axis=2), heads)
    v = constrain(jnp.repeat(v, group, axis=2), heads)
    logits = dense("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.dim)
    logits = jnp.where(attention_mask(segment_ids, t), logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    mixed = constrain(dense("bhqk,bkhd->bqhd", weights, v), heads)
    return constrain(x + dense("bthd,hde->bte", mixed, p["wo"]), ("batch", "seq", "embed"))


def _norm(x: jax.Array, scale: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """RMSNorm in float32, its output in the compute dtype (HF's LlamaRMSNorm)."""
    return rms_norm(x.astype(jnp.float32), scale, cfg.norm_eps).astype(cfg.compute_dtype)


def _context(segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array] | None:
    if segment_ids is None:
        return None
    return segment_ids, document_positions(segment_ids)


def _sequence(tokens: jax.Array, segment_ids: jax.Array | None
              ) -> tuple[jax.Array, tuple[jax.Array, ...] | None, np.ndarray | None]:
    """(tokens, context, order): as given, or under context parallelism permuted once into the
    zig-zag order (`jaxdist.models.attention.zigzag_order`, `order`), the context then holding
    the permuted segment ids, the rotary positions of the original order and each token's
    original index; every layer works in that order and the loss does not depend on it."""
    split = context_split(tokens.shape[1])
    if split is None:
        return tokens, _context(segment_ids), None
    order = split.order
    positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                 if segment_ids is None else document_positions(segment_ids))
    index = jnp.broadcast_to(jnp.asarray(order, jnp.int32), tokens.shape)
    segments = None if segment_ids is None else segment_ids[:, order]
    return tokens[:, order], (segments, positions[:, order], index), order


class Llama(nnx.Module):
    """Tokens (batch, seq) int [, segment ids (batch, seq)] -> next-token logits
    (batch, seq, vocab)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = validate(cfg)
        self.embedding = param(rngs, (cfg.vocab, cfg.embed), ("vocab", "embed"), 0.02)
        self.layers = LlamaLayers(cfg, rngs=rngs)
        self.final_norm = param(rngs, (cfg.embed,), ("embed",), None)
        if not cfg.tied:
            self.unembed = param(rngs, (cfg.embed, cfg.vocab), ("embed", "vocab"), 0.02)

    def _layer_fn(self):
        layer = block if self.cfg.moe is None else moe_block
        return remat(lambda p, x, context=None: layer(self.cfg, p, x, context), self.cfg.remat)

    def _head(self) -> dict[str, jax.Array]:
        out = self.embedding[...].T if self.cfg.tied else self.unembed[...]
        return {"norm": self.final_norm[...], "out": out}

    def _logits(self, head: dict[str, jax.Array], h: jax.Array) -> jax.Array:
        out = head["out"].astype(self.cfg.compute_dtype)
        logits = dense("bte,ev->btv", _norm(h, head["norm"], self.cfg), out)
        return constrain(logits, ("batch", "length", "vocab"))

    def _embed(self, tokens: jax.Array) -> jax.Array:
        # the residual stream stays float32: each block adds its compute-dtype output to it
        return constrain(jnp.take(self.embedding[...], tokens, axis=0), ("batch", "seq", "embed"))

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        tokens, context, order = _sequence(tokens, segment_ids)
        if self.cfg.moe is not None:
            logits = self._logits(self._head(), self._moe_layers(tokens, context)[0])
        else:
            h = run_layers(self._layer_fn(), self.layers.stacked(), self._embed(tokens),
                           unroll=self.cfg.unroll, **_context_kw(context))
            logits = self._logits(self._head(), h)
        return logits if order is None else logits[:, np.argsort(order)]

    def loss(self, tokens: jax.Array, targets: jax.Array,
             segment_ids: jax.Array | None = None) -> jax.Array:
        """Mean cross-entropy in nats over the targets that are not padding (target < 0).

        Each token's loss is weighted by (tokens in the batch) / (real targets in the batch),
        worked out here on the whole batch, so the mean over any split of the batch into
        microbatches is the mean over its real tokens (a pipeline averages microbatch means).
        A mixture of experts adds its weighted auxiliary losses (`moe_loss`)."""
        if self.cfg.moe is not None:
            return self.moe_loss(tokens, targets, segment_ids)[0]
        weights = _target_weights(targets)
        tokens, context, order = _sequence(tokens, segment_ids)
        if order is not None:
            targets, weights = targets[:, order], weights[:, order]

        def head_loss(head, h, target_weights):
            targets, weights = target_weights
            return (token_losses(self._logits(head, h), targets) * weights).mean()

        return layers_then_loss(self._layer_fn(), head_loss, self.layers.stacked(),
                                self._head(), self._embed(tokens), (targets, weights),
                                unroll=self.cfg.unroll, **_context_kw(context))

    def moe_loss(self, tokens: jax.Array, targets: jax.Array,
                 segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, MoEStats]:
        """A mixture of experts' (loss, cross-entropy, router statistics): the loss is the
        cross-entropy (as `loss`) plus the weighted auxiliary losses. The load-balancing loss is
        a statistic of all the tokens given, so gradient accumulation's microbatches (each its
        own) change it."""
        weights = _target_weights(targets)
        tokens, context, order = _sequence(tokens, segment_ids)
        if order is not None:
            targets, weights = targets[:, order], weights[:, order]
        h, stats = self._moe_layers(tokens, context)
        logits = self._logits(self._head(), h)
        cross_entropy = (token_losses(logits, targets) * weights).mean()
        return cross_entropy + moe_penalty(self.cfg.moe, stats), cross_entropy, stats

    def _moe_layers(self, tokens: jax.Array, context: tuple[jax.Array, ...] | None
                    ) -> tuple[jax.Array, MoEStats]:
        layout = current_layout()
        if layout is not None and layout.run_layers is not None:
            raise UsageError("the mixture-of-experts Llama does not run in a pipeline yet (its "
                             "router statistics travel with the layer stack); use pipeline=1")
        start = (self._embed(tokens), MoEStats.empty(self.cfg.depth, self.cfg.moe.num_experts))
        return run_layers(self._layer_fn(), self.layers.stacked(), start, unroll=self.cfg.unroll,
                          **_context_kw(context))


def _target_weights(targets: jax.Array) -> jax.Array:
    """Per-target loss weights: 0 for padding, (tokens / real targets) for the rest."""
    real = (targets >= 0).astype(jnp.float32)
    return real * (real.size / jnp.maximum(real.sum(), 1.0))


def _context_kw(context: tuple[jax.Array, ...] | None) -> dict[str, Any]:
    return {} if context is None else {"context": context}


def _unpack(batch: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    inputs, targets, *rest = batch
    return inputs, targets, rest[0] if rest else None


def llama_loss(model: Llama, batch: Any) -> tuple[jax.Array, dict]:
    """The Trainer's loss: `batch` is (inputs, targets[, segment_ids]) of int (batch, seq);
    targets < 0 are padding. Mean loss per real token in nats, and in bits. A mixture of
    experts' loss adds its auxiliary losses; bits_per_token is then of the cross-entropy alone,
    and its router statistics are metrics too (`jaxdist.models.moe.moe_metrics`)."""
    inputs, targets, segment_ids = _unpack(batch)
    if model.cfg.moe is not None:
        loss, cross_entropy, stats = model.moe_loss(inputs, targets, segment_ids)
        return loss, {"loss": loss, "cross_entropy": cross_entropy,
                      "bits_per_token": cross_entropy / math.log(2), **moe_metrics(stats)}
    loss = model.loss(inputs, targets, segment_ids)
    return loss, {"loss": loss, "bits_per_token": loss / math.log(2)}


def llama_moe_stats(model: Llama, batch: Any) -> MoEStats:
    """The router statistics of a mixture of experts on (inputs, targets[, segment_ids]): per
    layer the share of assignments each expert got (depth, E) and the share dropped."""
    inputs, targets, segment_ids = _unpack(batch)
    return model.moe_loss(inputs, targets, segment_ids)[2]


def llama_eval(model: Llama, batch: Any) -> dict[str, jax.Array]:
    """Sums over an evaluation batch (inputs, targets[, segment_ids], row mask): the loss of
    every real target token in nats and in bits, and their count, so `fit`'s means are per
    token."""
    *train, mask = batch
    inputs, targets, segment_ids = _unpack(train)
    real = (targets >= 0) & (mask[:, None] > 0)
    losses = jnp.where(real, token_losses(model(inputs, segment_ids), jnp.maximum(targets, 0)), 0)
    return {"loss": losses.sum(), "bits_per_token": losses.sum() / math.log(2),
            "count": real.sum().astype(jnp.float32)}
