"""The loss and evaluation sums of image classification, for models that return log-probabilities
(the CNNs and the ViT here): uint8 NHWC images normalized inside the step, int32 labels."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _normalized(images, mean: float, std: float):
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def classification_loss(mean: float = MNIST_MEAN, std: float = MNIST_STD) -> Callable:
    """`loss_fn(model, (images, labels)) -> (mean NLL, {"accuracy"})`."""

    def loss_fn(model, batch):
        images, labels = batch
        log_probs = model(_normalized(images, mean, std))
        nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
        return nll.mean(), {"accuracy": (log_probs.argmax(-1) == labels).mean()}

    return loss_fn


def classification_eval(mean: float = MNIST_MEAN, std: float = MNIST_STD) -> Callable:
    """`eval_fn(model, (images, labels, mask))` -> sums of count, accuracy and loss over the
    batch, padding masked out (`jaxdist.fit` reports them as means)."""

    def eval_fn(model, batch):
        images, labels, mask = batch
        log_probs = model(_normalized(images, mean, std))
        nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
        correct = (log_probs.argmax(-1) == labels).astype(jnp.float32)
        return {"count": mask.sum(), "accuracy": (correct * mask).sum(),
                "loss": (nll * mask).sum()}

    return eval_fn


mnist_loss = classification_loss()
mnist_eval = classification_eval()
