"""Perceptual hash -> a 64-d vector of +-1/8 whose dot product is 1 - hamming/32.

Two hashes at Hamming distance h score 1 - h/32: 1.0 identical, 0.6875 at h = 10, 0 unrelated.
"""

from __future__ import annotations

from collections.abc import Sequence

import imagehash
import numpy as np
from PIL import Image

from prodsearch.encoders.base import (
    Encoder,
    EncoderIdentity,
    EncoderInput,
    Vector,
    scatter,
)

BITS = 64


def compute_phash(image: Image.Image) -> str:
    """Return the 16-hex-digit perceptual hash of `image` (equal to Shopee's `image_phash`)."""
    return str(imagehash.phash(image))


def hamming_to_score(distance: float) -> float:
    """Return the phash vector score for a Hamming distance."""
    return 1.0 - distance / (BITS / 2)


def phash_vector(hex_hash: str) -> np.ndarray:
    """Return the unit +-1/8 vector of a 16-hex-digit hash."""
    bits = imagehash.hex_to_hash(hex_hash).hash.flatten()
    return np.where(bits, 0.125, -0.125).astype(np.float32)


class PhashEncoder(Encoder):
    """A product's perceptual hash (given or computed from its image) as a dense vector."""

    modality = "phash"
    dim = BITS
    distance = "dot"
    binary = True

    def identity(self) -> EncoderIdentity:
        """Return the hash scheme (no weights: the hash is a fixed algorithm)."""
        return EncoderIdentity(
            name="phash",
            version="imagehash-dct-8x8",
            weights_sha256="",
            params={"bits": BITS, "value": 0.125},
        )

    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Vectorise each item's phash, computing it from the image when only that is given."""
        positions = [i for i in range(len(items)) if items[i].phash or items[i].image]
        vectors = [
            phash_vector(items[i].phash or compute_phash(items[i].image))  # type: ignore[arg-type]
            for i in positions
        ]
        return scatter(len(items), positions, vectors)
