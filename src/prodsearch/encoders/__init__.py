"""Encoders: one per named vector. `EncoderSet` holds the active ones, loaded lazily."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prodsearch.encoders.base import (
    Encoder,
    EncoderIdentity,
    EncoderInput,
    SparseVec,
    Vector,
)
from prodsearch.encoders.charcnn import CharCNNEncoder, shipped_weights
from prodsearch.encoders.chars import CharsEncoder
from prodsearch.encoders.image import ImageEncoder, shipped_head
from prodsearch.encoders.phash import PhashEncoder, compute_phash
from prodsearch.encoders.runtime import InferenceOptions
from prodsearch.encoders.text import TextEncoder, shipped_adapter
from prodsearch.errors import ConfigError

__all__ = [
    "CharCNNEncoder",
    "CharsEncoder",
    "Encoder",
    "EncoderIdentity",
    "EncoderInput",
    "EncoderSet",
    "ImageEncoder",
    "InferenceOptions",
    "PhashEncoder",
    "SparseVec",
    "TextEncoder",
    "Vector",
    "compute_phash",
]

log = logging.getLogger("prodsearch")


@dataclass
class EncoderSet:
    """The encoders that fill a collection's named vectors, keyed by vector name."""

    encoders: dict[str, Encoder]

    @classmethod
    def default(
        cls,
        text_max_tokens: int = 64,
        inference: InferenceOptions | None = None,
        with_charcnn: bool = False,
        text_adapter: Path | None = None,
    ) -> EncoderSet:
        """Return the shipped fine-tuned encoders, run as `inference` says (default: the
        settings' backend); `text_adapter`: another text adapter's folder in place of the
        shipped one (a benchmark's encoder that has not seen some catalog). Raises ConfigError
        when a shipped artefact (text adapter, image head) is missing: the pretrained encoders
        are an explicit choice, never a fall-back.

        The ArcFace char-CNN joins only `with_charcnn`: fused with text, sparse chars and phash
        it added nothing to Shopee test F1 (formula 0.829 -> 0.826, README "Results"), so it is
        opt-in.
        """
        inference = inference or InferenceOptions.from_settings()
        encoders: list[Encoder] = [
            TextEncoder(
                max_tokens=text_max_tokens,
                adapter=text_adapter or shipped_adapter(),
                inference=inference,
            ),
            CharsEncoder(),
            ImageEncoder(head=shipped_head(), inference=inference),
            PhashEncoder(),
        ]
        weights = shipped_weights()
        if with_charcnn:
            if weights is None:
                raise ConfigError("no char-CNN weights are shipped: run python -m finetune.chars")
            encoders.insert(2, CharCNNEncoder(weights, inference=inference))
        return cls({e.modality: e for e in encoders})

    @classmethod
    def pretrained(
        cls, text_max_tokens: int = 64, inference: InferenceOptions | None = None
    ) -> EncoderSet:
        """Return the pretrained encoders the fine-tuned ones start from (no char-CNN), run as
        `inference` says (default: the settings' backend)."""
        inference = inference or InferenceOptions.from_settings()
        encoders = (
            TextEncoder(max_tokens=text_max_tokens, inference=inference),
            CharsEncoder(),
            ImageEncoder(inference=inference),
            PhashEncoder(),
        )
        return cls({e.modality: e for e in encoders})

    @classmethod
    def from_settings(
        cls, choice: str, text_max_tokens: int = 64, inference: InferenceOptions | None = None
    ) -> EncoderSet:
        """Return the encoder set a settings value names ("finetuned", "finetuned+charcnn" or
        "pretrained"), run as `inference` says (default: the settings' backend, e.g.
        PRODSEARCH_BACKEND=torch)."""
        if choice == "pretrained":
            log.warning(
                "PRODSEARCH_ENCODERS=pretrained: using the pretrained encoders, not the shipped "
                "fine-tuned ones the README's figures measure"
            )
            return cls.pretrained(text_max_tokens, inference)
        return cls.default(text_max_tokens, inference, with_charcnn=choice == "finetuned+charcnn")

    def __iter__(self) -> Iterator[Encoder]:
        return iter(self.encoders.values())

    def __getitem__(self, modality: str) -> Encoder:
        return self.encoders[modality]

    def identities(self) -> dict[str, EncoderIdentity]:
        """Return each encoder's identity, keyed by vector name."""
        return {name: encoder.identity() for name, encoder in self.encoders.items()}

    def prepare(self, items: Sequence[EncoderInput]) -> list[EncoderInput]:
        """Return `items` with every encoder's CPU-side input work done (image cropping), so it
        can run on another thread than `encode`; the vectors are the same either way."""
        prepared = list(items)
        for encoder in self.encoders.values():
            prepared = encoder.prepare(prepared)
        return prepared

    def encode(
        self, items: Sequence[EncoderInput], neural: bool | None = None
    ) -> list[dict[str, Vector]]:
        """Return, per item, its vectors keyed by vector name (missing inputs leave gaps);
        `neural` True (False) runs only the encoders that run (do not run) a network."""
        per_item: list[dict[str, Vector]] = [{} for _ in items]
        if not items:
            return per_item
        for name, encoder in self.encoders.items():
            if neural is not None and encoder.neural != neural:
                continue
            for vectors, vector in zip(per_item, encoder.encode(items), strict=True):
                if vector is not None:
                    vectors[name] = vector
        return per_item
