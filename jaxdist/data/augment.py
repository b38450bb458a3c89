"""Per-example augmentations for the training stream, seeded so that resuming reads the same data.

An augmentation is `(image, rng) -> image` for one example; `train_batches` applies it with grain's
`random_map`, whose generator depends only on the seed and the example's position in the stream,
so a global batch is the same whatever the number of processes and after a restart.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxdist.errors import UsageError

Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def random_shift(max_pixels: int = 2) -> Augment:
    """Moves an HWC image by up to `max_pixels` in each direction, filling with zeros."""
    if max_pixels < 1:
        raise UsageError(f"a random shift needs max_pixels >= 1, got {max_pixels}")

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m = max_pixels
        dy, dx = rng.integers(0, 2 * m + 1, size=2)
        padded = np.pad(image, ((m, m), (m, m), (0, 0)))
        return padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]

    return shift


AUGMENTATIONS: dict[str, Callable[[], Augment] | None] = {"none": None, "shift": random_shift}


def make_augment(name: str) -> Augment | None:
    if name not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    factory = AUGMENTATIONS[name]
    return factory() if factory else None
