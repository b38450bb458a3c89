"""The model zoo: Flax NNX modules that know nothing about meshes or devices.

Models that support model parallelism name their parameters' dimensions with the logical axes of
`jaxdist.parallel.rules`.
"""

from jaxdist.models.cnn import MnistCNN
from jaxdist.models.vit import VIT_SIZES, ViT, ViTConfig, param_count, vit_config
from jaxdist.models.wide_cnn import WideCNN

__all__ = ["VIT_SIZES", "MnistCNN", "ViT", "ViTConfig", "WideCNN", "param_count", "vit_config"]
