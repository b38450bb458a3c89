"""A Vision Transformer for MNIST-sized images, from a few thousand to over 100M parameters.

Every parameter carries logical axis names (see `jaxdist.parallel.rules`), so the same model
trains replicated, FSDP-sharded or tensor-parallel by changing only the rules.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdist.errors import UsageError
from jaxdist.models.layers import axes




@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    channels: int = 1
    patch: int = 4
    embed: int = 64
    depth: int = 4
    heads: int = 4
    mlp: int = 128
    num_classes: int = 10

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


VIT_SIZES = {
    "tiny": ViTConfig(),                                                     # 0.14M
    "small": ViTConfig(embed=256, depth=6, heads=8, mlp=1024),              # 4.8M
    "base": ViTConfig(embed=768, depth=12, heads=12, mlp=3072),             # 85.1M
    "large": ViTConfig(embed=1024, depth=8, heads=16, mlp=4096),            # 100.8M
}


def vit_config(size: str, **overrides) -> ViTConfig:
    """A named size ('tiny', 'small', 'base', 'large'), optionally with fields replaced."""
    if size not in VIT_SIZES:
        raise UsageError(f"unknown ViT size {size!r}; choose one of {', '.join(VIT_SIZES)}")
    return validate(dataclasses.replace(VIT_SIZES[size], **overrides))


def validate(cfg: ViTConfig) -> ViTConfig:
    if min(cfg.patch, cfg.embed, cfg.depth, cfg.heads, cfg.mlp) < 1:
        raise UsageError(f"ViT sizes must be positive: {cfg}")
    if cfg.image_size % cfg.patch:
        raise UsageError(f"image size {cfg.image_size} is not a multiple of patch {cfg.patch}")
    if cfg.embed % cfg.heads:
        raise UsageError(f"embed {cfg.embed} does not divide into {cfg.heads} heads")
    return cfg


class Block(nnx.Module):
    """Pre-LN transformer block: x + attention(LN(x)); x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        e, self.heads = cfg.embed, cfg.heads
        ln = dict(scale_metadata=axes("embed"), bias_metadata=axes("embed"), rngs=rngs)
        self.ln1, self.ln2 = nnx.LayerNorm(e, **ln), nnx.LayerNorm(e, **ln)
        column = dict(kernel_metadata=axes("embed", "heads"), bias_metadata=axes("heads"),
                      rngs=rngs)
        self.query, self.value = nnx.Linear(e, e, **column), nnx.Linear(e, e, **column)
        # no key bias: softmax over keys cancels it, so its gradient is pure rounding noise
        # (which Adam would amplify into random updates)
        self.key = nnx.Linear(e, e, use_bias=False, kernel_metadata=axes("embed", "heads"),
                              rngs=rngs)
        self.out = nnx.Linear(e, e, kernel_metadata=axes("heads", "embed"),
                              bias_metadata=axes("embed"), rngs=rngs)
        self.fc1 = nnx.Linear(e, cfg.mlp, kernel_metadata=axes("embed", "mlp"),
                              bias_metadata=axes("mlp"), rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp, e, kernel_metadata=axes("mlp", "embed"),
                              bias_metadata=axes("embed"), rngs=rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        b, t, e = x.shape
        split = lambda y: y.reshape(b, t, self.heads, e // self.heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(e // self.heads)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.out(mixed.reshape(b, t, e))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
    """Patches -> linear embedding + learned positions -> blocks -> LN -> mean pool -> classes.

    Takes NHWC images (batch, size, size, channels) and returns log-probabilities.

    Example:
        >>> ViT(vit_config("tiny"), rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = validate(cfg)
        self.embed = nnx.Linear(cfg.patch * cfg.patch * cfg.channels, cfg.embed,
                                kernel_metadata=axes("patch", "embed"),
                                bias_metadata=axes("embed"), rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.positions = nnx.Param(init(rngs.params(), (cfg.num_patches, cfg.embed)),
                                   **axes("seq", "embed"))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(cfg.embed, scale_metadata=axes("embed"),
                                  bias_metadata=axes("embed"), rngs=rngs)
        self.head = nnx.Linear(cfg.embed, cfg.num_classes, kernel_metadata=axes("embed", "classes"),
                               bias_metadata=axes("classes"), rngs=rngs)

    def patches(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.cfg.patch
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.embed(self.patches(images)) + self.positions[...]
        for block in self.blocks:
            x = block(x)
        return nnx.log_softmax(self.head(self.norm(x).mean(axis=1)))


def param_count(cfg: ViTConfig) -> int:
    """Parameters of a ViT of this config, counted from shapes alone (nothing is allocated)."""
    model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
