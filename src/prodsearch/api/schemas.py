"""The API's request and response bodies, and the limits they check."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console

from prodsearch.catalog import (
    MAX_TITLE_CHARS,
)
from prodsearch.errors import (
    ConfigError,
)
from prodsearch.filters import FilterSpec
from prodsearch.recipes import Recipe
from prodsearch.settings import FusionName

#: the API's field names, used in rejection messages as a recipe's column names are for a CSV
API_FIELDS = Recipe(id="id", title="title", image="image_base64", phash="image_phash")
K_MAX = 1_000
# Payload keys the API does not show: bookkeeping of ingest, and the image's path on the
# ingesting machine (a server file path is not for clients).
HIDDEN_PAYLOAD_KEYS = frozenset({"content_hash", "image_path", "cluster_id"})
_PHASH_PATTERN = r"^[0-9a-fA-F]{16}$"
QUIET = Console(stderr=True, quiet=True)


# -- bodies -----------------------------------------------------------------------------------
class MatchRequest(BaseModel):
    """A product to match: a title, an image and/or a known perceptual hash, and options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    title: str | None = Field(None, max_length=MAX_TITLE_CHARS, examples=["Oatly oat drink 1L"])
    image_base64: str | None = Field(
        None,
        description="The image file, base64-encoded (a `data:image/...;base64,` prefix is ok).",
    )
    phash: str | None = Field(
        None, pattern=_PHASH_PATTERN, description="A known 64-bit perceptual hash, 16 hex digits."
    )
    k: int | None = Field(None, ge=1, le=K_MAX, description="Matches to return (default 10).")
    thresholds: dict[str, float] | None = Field(
        None,
        description="Per-modality prefetch score thresholds (for the formula: its floors), "
        'e.g. {"text": 0.8}.',
    )
    fusion: FusionName | None = None
    filter: dict[str, Any] | None = Field(
        None,
        description='Payload filter: {"key": value}, {"key": [a, b]}, {"price": {"gte": 1}}, '
        '{"seller": {"not": "x"}}.',
    )
    exclude_ids: list[str] = Field([], max_length=K_MAX, description="Product ids to leave out.")
    decide: bool = Field(
        True,
        description="Beside the engine's scores, the catalog's decision on each match (the "
        "dedup decision on the query's neighbourhood); false: the engine's scores alone.",
    )

    @field_validator("filter")
    @classmethod
    def _engine_can_filter(cls, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        """Refuse a filter the engine cannot run (FilterSpec says why) before any work."""
        try:
            FilterSpec.from_mapping(spec)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return spec


class MatchOut(BaseModel):
    """One matching product and why it matched."""

    product_id: str
    score: float = Field(description="The fused score (its scale depends on the fusion).")
    scores: dict[str, float] = Field(description="The engine's score of each modality.")
    matched_by: list[str] = Field(description="The modalities whose score reached the threshold.")
    decision: Literal["match", "no match"] | None = Field(
        None, description="The catalog's decision: the same product or not (with `decide`)."
    )
    probability: float | None = Field(
        None, description="How sure: the pair model's (calibrated) probability of the same product."
    )
    rule: str | None = Field(None, description="What decided (pair model, min-2, ...).")
    cluster_id: str | None = Field(None, description="The product's stored cluster, if any.")
    payload: dict[str, Any]


class MatchResponse(BaseModel):
    """Matches, best first."""

    matches: list[MatchOut]


class ProductIn(BaseModel):
    """One product to upsert. Its content is checked as a catalog row is: a bad product is
    rejected and reported, the rest of the batch goes on."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    id: str | None = None
    title: str | None = None
    image_base64: str | None = Field(None, description="The image file, base64-encoded.")
    image_phash: str | None = Field(None, description="A known perceptual hash, 16 hex digits.")
    payload: dict[str, Any] = Field({}, description="Any other fields, kept with the product.")


class ProductBatch(BaseModel):
    """Products to insert or replace (by id)."""

    products: list[ProductIn]
    assign: bool = Field(
        False,
        description="Put each new or changed product in a stored product cluster (the dedup "
        "decision on its neighbourhood), or start one; the answer says which and why.",
    )


class RejectionOut(BaseModel):
    """A product that was not stored, and why."""

    row: int = Field(description="Its position in `products`, from 0.")
    id: str | None
    field: str
    reason: str


class AssignmentOut(BaseModel):
    """Where an assigned product went, and the evidence."""

    product_id: str
    cluster_id: str
    how: Literal["founded", "joined"]
    matches: list[dict[str, Any]] = Field(
        description="The matches that decided, most probable first: product id, cluster, "
        "probability, fused score, each modality's score."
    )
    proposed_merges: list[str] = Field(
        description="Other clusters its matches are in: a merge with each is proposed for review."
    )


class UpsertResponse(BaseModel):
    """What a batch upsert did."""

    upserted: int = Field(description="Products written (new or changed).")
    unchanged: int = Field(description="Products already stored exactly so (not rewritten).")
    rejected: int
    rejections: list[RejectionOut]
    assignments: list[AssignmentOut] = Field(
        [], description="With `assign`: where each new or changed product went."
    )


class ProductOut(BaseModel):
    """A stored product."""

    id: str
    cluster_id: str | None = Field(None, description="Its stored product cluster, if any.")
    payload: dict[str, Any]


class ClusterMemberOut(BaseModel):
    """A product in a cluster."""

    product_id: str
    joined_at: str
    title: str | None = None


class ClusterOut(BaseModel):
    """A stored product cluster: its members and its history."""

    cluster_id: str
    members: list[ClusterMemberOut]
    events: list[dict[str, Any]] = Field(
        description="Every recorded change with its evidence, oldest first."
    )


class DeleteResponse(BaseModel):
    """A deleted product."""

    id: str
    deleted: bool = True


class HealthResponse(BaseModel):
    """Whether the engine answers, the collection exists and fits these encoders."""

    status: Literal["ok", "empty", "error"] = Field(
        description="ok; empty (no collection yet: POST /products creates it); error (see detail)."
    )
    engine_reachable: bool
    store: Literal["embedded", "server"]
    collection: str
    collection_present: bool
    encoders_match: bool | None = None
    products: int | None = None
    encoders: dict[str, dict[str, Any]] = Field(description="This process's encoder identities.")
    detail: str | None = None


class ValidationIssue(BaseModel):
    """One way a request does not fit the schema."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error: a message, or the list of schema violations."""

    detail: str | list[ValidationIssue]
