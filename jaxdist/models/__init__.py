"""The model zoo: Flax NNX modules that know nothing about meshes or devices."""

from jaxdist.models.cnn import MnistCNN

__all__ = ["MnistCNN"]
