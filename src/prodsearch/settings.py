"""Settings: CLI options > environment (PRODSEARCH_*) > settings file > defaults (pydantic).

The default thresholds and fusion knobs are the values `prodsearch eval` tuned on the Shopee `val`
split (text, chars, phash) and on Grocery Store `val` photos (image); see README, "Results".
`prodsearch eval --write-settings FILE` writes new ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MODALITIES: tuple[str, ...] = ("text", "chars", "charcnn", "image", "phash")
FusionName = Literal["rrf", "dbsf", "formula"]

SETTINGS_FILE_ENV = "PRODSEARCH_SETTINGS_FILE"
DEFAULT_SETTINGS_FILE = "prodsearch.toml"


class ModalityValues(BaseModel):
    """One number per modality (a threshold or a weight)."""

    text: float
    chars: float
    charcnn: float
    image: float
    phash: float

    def get(self, modality: str) -> float:
        """Return the value for `modality` (one of MODALITIES)."""
        return float(getattr(self, modality))


class FormulaSettings(BaseModel):
    """The weighted-sum fusion: `sum(weight * score)` over the prefetches (0 where a prefetch
    missed the product) must reach `threshold`; prefetches keep candidates above `floors`."""

    weights: ModalityValues = ModalityValues(
        text=0.5, chars=1.0, charcnn=0.5, image=0.88, phash=0.75
    )
    threshold: float | None = 0.6587
    floors: ModalityValues = ModalityValues(text=0.5, chars=0.15, charcnn=0.5, image=0.3, phash=0.5)


class Settings(BaseSettings):
    """Every knob of prodsearch. Nested values use `__` in the environment:
    `PRODSEARCH_THRESHOLDS__TEXT=0.8`."""

    model_config = SettingsConfigDict(
        env_prefix="PRODSEARCH_", env_nested_delimiter="__", extra="ignore"
    )

    store: str = Field(
        "./prodsearch-data",
        description="A directory (embedded Qdrant Edge), a URL (Qdrant server), "
        "or 'local:DIR' / ':memory:' (qdrant-client local mode).",
    )
    collection: str = "products"
    k: int = Field(10, ge=1, le=1000, description="Matches returned per query.")
    prefetch_limit: int = Field(50, ge=1, le=1000, description="Candidates per modality.")
    thresholds: ModalityValues = Field(
        ModalityValues(text=0.76, chars=0.36, charcnn=0.8, image=0.75, phash=0.75),
        description="Per-modality prefetch score thresholds for RRF and DBSF fusion.",
    )
    fusion: FusionName = "rrf"
    rrf_k: int = Field(2, ge=1)
    formula: FormulaSettings = FormulaSettings()
    hnsw_ef: int | None = Field(
        None, ge=1, description="HNSW search breadth; None = engine default."
    )
    encoders: Literal["finetuned", "pretrained"] = Field(
        "finetuned",
        description="The shipped ArcFace-fine-tuned encoders, or the pretrained ones.",
    )
    text_max_tokens: int = Field(64, ge=8, le=512)
    batch_size: int = Field(256, ge=1, le=10_000)
    max_image_pixels: int = Field(40_000_000, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get(SETTINGS_FILE_ENV, DEFAULT_SETTINGS_FILE))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))
