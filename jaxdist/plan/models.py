"""What the planner compiles for one model name and size."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxdist.errors import UsageError

MODELS = ("vit", "lm")
DEFAULT_LM_REMAT = "full"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the planner compiles for one model size.

    Attributes:
        label: the table's name of it ("vit-base", "lm-1.3b", plus any overrides).
        config: the model's config (`ViTConfig` or `LMConfig`).
        model_fn: builds the model (called abstractly: nothing is allocated).
        loss_fn: the Trainer's loss, `loss_fn(model, batch)`.
        layers: depth of the layer stack a pipeline splits; None when the model has none.
        inputs: what one example is, for the printed assumptions.
    """

    label: str
    config: Any
    model_fn: Callable[[], Any]
    loss_fn: Callable
    layers: int | None
    inputs: str

    def batch(self, global_batch: int) -> tuple:
        """ShapeDtypeStructs of a global batch (no sharding: `abstract_batch` lays them out)."""
        import jax
        import numpy as np

        cfg = self.config
        if self.layers is None:  # the ViT: uint8 NHWC images and int32 labels
            return (jax.ShapeDtypeStruct((global_batch, cfg.image_size, cfg.image_size,
                                          cfg.channels), np.uint8),
                    jax.ShapeDtypeStruct((global_batch,), np.int32))
        tokens = jax.ShapeDtypeStruct((global_batch, cfg.seq_len), np.int32)
        return tokens, tokens  # (inputs, targets)

    def step_flops(self, global_batch: int) -> float | None:
        """Training FLOPs of one step summed over all devices, from the model's shapes (the
        LM); None: read XLA's cost analysis of the compiled step instead (the ViT)."""
        if self.layers is None:
            return None
        return lm_step_flops(self.config, global_batch * self.config.seq_len)


def lm_step_flops(cfg: Any, tokens: int) -> float:
    """Training FLOPs of `tokens` tokens through the LM `cfg`, all devices together.

    `jaxdist.models.lm.flops_per_token` (6 N for the matmuls with the parameters, 12 L T E for
    attention's scores and mixing: forward and backward), plus the forward the backward pass
    computes again: the remat policy's (full: the blocks' forward but for the last matmul, whose
    output no gradient needs, 2 (N_layers - L E F) + 4 L T E per token; dots_no_batch:
    attention's scores and mixing, 4 L T E; dots and none: only elementwise work, not counted).
    A pipeline's extra work (GPipe's idle ticks, 1F1B's masked units) is its `bubble`. Matmuls
    only: XLA's count of one layer (where its cost analysis is right) is 3-4% higher, from
    elementwise work. XLA's own cost analysis is not used for the LM: it counts the body of a
    `lax.scan` (the layer stack, the pipeline's ticks) once."""
    from jaxdist.models.lm import flops_per_token, param_count

    layer_params = param_count(cfg) - param_count(dataclasses.replace(cfg, depth=0))
    attention = 4 * cfg.depth * cfg.seq_len * cfg.embed  # scores and mixing, forward
    block_forward = 2 * layer_params + attention
    again = {"none": 0, "dots": 0, "dots_no_batch": attention,
             "full": block_forward - 2 * cfg.depth * cfg.mlp * cfg.embed}[cfg.remat]
    return float(tokens) * (flops_per_token(cfg) + again)


def model_spec(model: str, size: str, overrides: dict | None = None) -> ModelSpec:
    """The `ModelSpec` of a model name and size, optionally with config fields replaced (e.g.
    {"depth": 2}; the LM's `remat` defaults to `DEFAULT_LM_REMAT`); UsageError when unknown."""
    from flax import nnx

    overrides = dict(overrides or {})
    label = f"{model}-{size}" + "".join(f",{k}={v}" for k, v in overrides.items())
    fields = {"vit": "ViTConfig", "lm": "LMConfig"}
    if model in fields:
        import jaxdist.models.lm as lm
        import jaxdist.models.vit as vit

        known = {f.name for f in dataclasses.fields(
            vit.ViTConfig if model == "vit" else lm.LMConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UsageError(f"{fields[model]} has no field {unknown[0]!r}")
    if model == "vit":
        from jaxdist.models import ViT, vit_config
        from jaxdist.models.classification import mnist_loss

        cfg = vit_config(size, **overrides)
        return ModelSpec(label, cfg, lambda: ViT(cfg, rngs=nnx.Rngs(0)), mnist_loss, None,
                         f"uint8 {cfg.image_size}x{cfg.image_size}x{cfg.channels} images, "
                         f"int32 labels")
    if model == "lm":
        from jaxdist.models.lm import GPT, lm_config, lm_loss

        cfg = lm_config(size, **{"remat": DEFAULT_LM_REMAT, **overrides})
        return ModelSpec(label, cfg, lambda: GPT(cfg, rngs=nnx.Rngs(0)), lm_loss, cfg.depth,
                         f"sequences of {cfg.seq_len} int32 tokens, inputs and targets; "
                         f"remat {cfg.remat}")
    raise UsageError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
