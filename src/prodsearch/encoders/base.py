"""The one small interface every encoder implements, and the values it exchanges."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from prodsearch.errors import ConfigError

Distance = Literal["cosine", "dot"]


@dataclass(frozen=True)
class SparseVec:
    """A sparse vector: sorted unique indices and their values."""

    indices: np.ndarray  # int64
    values: np.ndarray  # float32


Vector = np.ndarray | SparseVec


@dataclass(frozen=True)
class EncoderInput:
    """What an encoder may read of one product; any part can be missing."""

    title: str | None = None
    image: Image.Image | None = None
    phash: str | None = None
    #: the image already cropped to the image encoder's input (uint8, height x width x 3), set
    #: by `Encoder.prepare` so that work can run on another thread than the encoding
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EncoderIdentity:
    """Which encoder wrote a vector: recorded in the collection, compared on every open."""

    name: str
    version: str
    weights_sha256: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "name": self.name,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "params": dict(self.params),
        }


class Encoder(ABC):
    """Turns products into one named vector each (or None when the input it needs is missing)."""

    #: the Qdrant vector name this encoder fills
    modality: str
    #: dense dimension, or None for a sparse vector
    dim: int | None
    distance: Distance = "cosine"
    #: the vector is a binary code (each dimension one of two values): the engine searches it
    #: by brute force over 1-bit quantized codes, with no HNSW graph (`store.base.VectorSpec`)
    binary: bool = False
    #: a network computes it (the costly encoders: ingest runs the others on its reader thread)
    neural: bool = False

    @property
    def sparse(self) -> bool:
        """True when the encoder produces sparse vectors."""
        return self.dim is None

    @abstractmethod
    def identity(self) -> EncoderIdentity:
        """Return the identity recorded in collections it writes (cheap: no model load)."""

    @abstractmethod
    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Return one vector per item, None where the item lacks this encoder's input."""

    def prepare(self, items: Sequence[EncoderInput]) -> list[EncoderInput]:
        """Return `items` with this encoder's CPU-side input work done ahead of `encode` (for
        ingest's reader thread); `encode` gives the same vectors either way. Default: none."""
        return list(items)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a weights file (cached per path, size and mtime)."""
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def indices_of(items: Sequence[EncoderInput], present: str) -> list[int]:
    """Return the positions of the items whose attribute `present` is set."""
    return [i for i, item in enumerate(items) if getattr(item, present)]


def scatter(n: int, positions: list[int], vectors: Sequence[Vector]) -> list[Vector | None]:
    """Place `vectors` at `positions` of a list of length `n`, None elsewhere."""
    out: list[Vector | None] = [None] * n
    for position, vector in zip(positions, vectors, strict=True):
        out[position] = vector
    return out


def missing_artefact(what: str, path: Path, recipe: str) -> ConfigError:
    """Return the error for a shipped fine-tuned artefact that is not where the package keeps
    it: which file, how to get it back, and the explicit way to run without it."""
    return ConfigError(
        f"the shipped {what} {path} is missing, so the default (fine-tuned) encoders cannot "
        f"load. Reinstall prodsearch (in a checkout: `git checkout -- {path}`) or rebuild it "
        f"with `python -m {recipe}`; to run on the pretrained encoders instead (not what the "
        "README's figures measure), set PRODSEARCH_ENCODERS=pretrained"
    )
