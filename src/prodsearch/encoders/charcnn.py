"""Titles -> a character-aware dense vector: a byte-level CNN trained from scratch with ArcFace.

No pretrained character model ships on PyPI, so prodsearch trains its own (finetune/chars.py):
UTF-8 bytes of the lower-cased title, three dilated convolutions (receptive field 15 bytes, so
`XB-450`, `XB450` and `xb 450` land close), max- and mean-pooled, projected to 256-d. About 0.4 M
parameters, shipped in the package.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from prodsearch.encoders.base import (
    EncoderIdentity,
    EncoderInput,
    Vector,
    file_sha256,
    indices_of,
    scatter,
)
from prodsearch.encoders.runtime import InferenceOptions, NeuralEncoder, export_module

MAX_BYTES = 128
DIM = 256
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "charcnn_arcface.safetensors"


def shipped_weights() -> Path | None:
    """Return the shipped char-CNN weights, or None when they are not there."""
    return SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.is_file() else None


def byte_ids(titles: Sequence[str], max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Return (n, max_bytes) int64 ids: UTF-8 bytes of the NFKC lower-cased title + 1, 0 = pad."""
    out = np.zeros((len(titles), max_bytes), dtype=np.int64)
    for row, title in enumerate(titles):
        data = unicodedata.normalize("NFKC", title).lower().encode("utf-8")[:max_bytes]
        out[row, : len(data)] = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + 1
    return out


def build_network(dim: int = DIM, embedding: int = 48, channels: int = 256) -> Any:
    """Return the char-CNN module (untrained)."""
    import torch
    from torch import nn

    class CharCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(257, embedding, padding_idx=0)
            self.conv1 = nn.Conv1d(embedding, channels, 3, padding=1)
            self.conv2 = nn.Conv1d(channels, channels, 3, padding=2, dilation=2)
            self.conv3 = nn.Conv1d(channels, channels, 3, padding=4, dilation=4)
            self.project = nn.Linear(2 * channels, dim)
            # A normalised neck keeps ArcFace training from scratch from collapsing.
            self.neck_norm = nn.BatchNorm1d(dim)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            mask = (ids > 0).unsqueeze(1).to(torch.float32)
            x = nn.functional.gelu(self.conv1(self.embed(ids).transpose(1, 2)))
            x = x + nn.functional.gelu(self.conv2(x))
            x = (x + nn.functional.gelu(self.conv3(x))) * mask
            longest = (x + (mask - 1) * 1e4).amax(dim=2)
            mean = x.sum(dim=2) / mask.sum(dim=2).clamp(min=1)
            projected = self.neck_norm(self.project(torch.cat([longest, mean], 1)))
            return nn.functional.normalize(projected, dim=1)

    return CharCNN()


class CharCNNEncoder(NeuralEncoder):
    """The trained char-CNN (see the module docstring); dense 256-d, cosine. Runs in torch or
    ONNX Runtime, as `inference` says (default: the settings)."""

    modality = "charcnn"
    dim = DIM
    distance = "cosine"
    # Dynamic int8 turns the convolutions into ConvInteger, several times slower than fp32 here
    # (benchmarks/bench_encoders.py), so fp32 it is.
    auto_precision = "fp32"
    torch_attributes = ("network",)

    def __init__(
        self, weights: Path, batch_size: int = 256, inference: InferenceOptions | None = None
    ) -> None:
        self.weights = weights
        self.batch_size = batch_size
        self.inference = inference or InferenceOptions.from_settings()

    def identity(self) -> EncoderIdentity:
        """Return the architecture and the trained weights' hash."""
        return EncoderIdentity(
            name="byte-charcnn-arcface",
            version="1",
            weights_sha256=file_sha256(self.weights),
            params={"max_bytes": MAX_BYTES, "dim": DIM},
        )

    @cached_property
    def network(self) -> Any:
        """The trained network in eval mode (loaded on first use)."""
        from safetensors.torch import load_file

        network = build_network()
        network.load_state_dict({k: v.float() for k, v in load_file(str(self.weights)).items()})
        return network.eval()

    def export_onnx(self, path: Path) -> None:
        """Write the network (input `ids`: (batch, MAX_BYTES) int64 from `byte_ids`; output
        (batch, 256), L2-normalised) to `path`."""
        import torch

        example = torch.ones((2, MAX_BYTES), dtype=torch.int64)
        export_module(self.network, (example,), path, ["ids"], {"ids": {0: "batch"}})

    def encode_titles(self, titles: Sequence[str]) -> np.ndarray:
        """Return an (n, 256) float32 array of L2-normalised title vectors."""
        if not titles:
            return np.zeros((0, DIM), dtype=np.float32)
        ids = byte_ids(titles)
        batches = [ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        if self.inference.backend == "onnx":
            return np.concatenate([self.run_onnx({"ids": batch}) for batch in batches])
        import torch

        with torch.inference_mode():
            return np.concatenate(
                [self.network(torch.from_numpy(batch)).numpy() for batch in batches]
            ).astype(np.float32)

    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Encode the titles of `items`; None for items without a title."""
        positions = indices_of(items, "title")
        vectors = self.encode_titles([items[i].title or "" for i in positions])
        return scatter(len(items), positions, list(vectors))
