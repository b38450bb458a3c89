"""What the planner compiles for one model name and size: the registry's variant
(`jaxdist.models.registry`) with the planner's defaults."""

from __future__ import annotations

from typing import Any

from jaxdist.errors import UsageError
from jaxdist.models.registry import ModelVariant, get_model, model_names

# the registered models with named sizes (each has a --<model>_size flag)
MODELS = tuple(name for name in model_names() if get_model(name).sizes)
DEFAULT_SIZES = {"vit": "small", "lm": "125m", "llama": "3.2-1b"}
DEFAULT_LM_REMAT = "full"
# config fields the planner sets unless overridden: the sizes it plans need the memory remat saves
PLAN_DEFAULTS: dict[str, dict[str, Any]] = {"lm": {"remat": DEFAULT_LM_REMAT},
                                             "llama": {"remat": DEFAULT_LM_REMAT}}


def planned_model(model: str, size: str, overrides: dict | None = None) -> ModelVariant:
    """The registered `model` at `size`, optionally with config fields replaced (e.g.
    {"depth": 2}; the LM's `remat` defaults to `DEFAULT_LM_REMAT`); UsageError when unknown."""
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    return get_model(model).variant(size, PLAN_DEFAULTS.get(model), **(overrides or {}))


def inputs(variant: ModelVariant) -> str:
    """What one example is, for the printed assumptions (the LM adds its remat policy)."""
    remat = getattr(variant.config, "remat", None)
    return variant.inputs + (f"; remat {remat}" if remat is not None else "")
