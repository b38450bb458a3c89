"""The model zoo: Flax NNX modules that know nothing about meshes or devices.

Models that support model parallelism name their parameters' dimensions with the logical axes of
`jaxdist.parallel.rules`. Every model is registered once by name (`registry`): recipes, the
planner and the benchmarks look it up with `get_model(name)`.
"""

from jaxdist.models.cnn import MnistCNN
from jaxdist.models.vit import VIT_SIZES, ViT, ViTConfig, param_count, vit_config
from jaxdist.models.wide_cnn import WideCNN
from jaxdist.models.registry import ModelSpec, ModelVariant, get_model, model_names, register

__all__ = ["VIT_SIZES", "MnistCNN", "ModelSpec", "ModelVariant", "ViT", "ViTConfig", "WideCNN",
           "get_model", "model_names", "param_count", "register", "vit_config"]
