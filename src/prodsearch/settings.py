"""Settings: CLI options > environment (PRODSEARCH_*) > settings file > defaults (pydantic).

The default thresholds and fusion knobs are the values `prodsearch eval` tuned on the Shopee `val`
split (text, chars, phash) and on Grocery Store `val` photos (image); see README, "Results".
`prodsearch eval --write-settings FILE` writes new ones.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MODALITIES: tuple[str, ...] = ("text", "chars", "charcnn", "image", "phash")
#: collections of this many points or more are searched with `hnsw_ef_large` (README, "Results":
#: recall@10 falls below 0.99 with the engine's default breadth at 1M, not at 200k)
LARGE_COLLECTION = 500_000
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


# Each role has its own defaults, so a partial override (PRODSEARCH_THRESHOLDS__TEXT=0.8, or a
# TOML table naming one modality) keeps the other modalities' values.
class Thresholds(ModalityValues):
    """Per-modality prefetch score thresholds (RRF and DBSF fusion)."""

    text: float = 0.52
    chars: float = 0.6
    charcnn: float = 0.75
    image: float = 0.75
    phash: float = 0.8125


class FormulaWeights(ModalityValues):
    """Per-modality weights of the formula fusion."""

    text: float = 2.0
    chars: float = 1.0
    charcnn: float = 0.5
    image: float = 0.88
    phash: float = 1.5


class FormulaFloors(ModalityValues):
    """Per-modality prefetch thresholds under the formula fusion (candidate floors)."""

    text: float = 0.3
    chars: float = 0.15
    charcnn: float = 0.3
    image: float = 0.3
    phash: float = 0.5


class FormulaSettings(BaseModel):
    """The weighted-sum fusion: `sum(weight * score)` over the prefetches (0 where a prefetch
    missed the product) must reach `min_fused_score`; prefetches keep candidates whose modality
    score reaches its `floors` value."""

    weights: FormulaWeights = FormulaWeights()
    min_fused_score: float | None = Field(
        1.3584, description="Fused score (the weighted sum) a match must reach; None = no cut."
    )
    floors: FormulaFloors = FormulaFloors()


class SearchSettings(BaseModel):
    """A complete fusion configuration (the blended search of `dedup` has its own)."""

    fusion: FusionName = "formula"
    thresholds: Thresholds = Thresholds()
    formula: FormulaSettings = FormulaSettings()


class CalibrationSettings(BaseModel):
    """A catalog's own decision on top of the pair model, fitted on labelled pairs:
    `sigmoid(slope * logit(p) + intercept + sum(weights[f] * (x_f - centers[f]) / scales[f]))`
    over the pair features `x` (matching/features.py; a missing feature counts as its center).
    Without weights it is Platt scaling."""

    slope: float = 1.0
    intercept: float = 0.0
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="The catalog's weight of each pair feature, on the standardised feature "
        "(empty: Platt scaling alone).",
    )
    centers: dict[str, float] = Field(
        default_factory=dict, description="Each weighted feature's mean over the catalog's pairs."
    )
    scales: dict[str, float] = Field(
        default_factory=dict,
        description="Each weighted feature's standard deviation over the catalog's pairs.",
    )
    regularisation: float = Field(
        0.0, description="The ridge penalty on the weights, chosen by cross-validation."
    )
    labels: int = Field(0, description="Labelled pairs it was fitted on.")
    model_digest: str = Field(
        "",
        description="SHA-256 of the pair model file it was fitted on top of; another model "
        "refuses it (calibrate again: the labels are kept). Empty: not recorded (written "
        "before 2026-12-04), applied to any model.",
    )
    positives: int = Field(0, description="Of which answered 'same'.")
    fitted_at: str = Field("", description="When (UTC, ISO 8601).")


class PairModelSettings(BaseModel):
    """The pair model of `prodsearch dedup`: stacked gradient-boosted trees over each candidate
    pair's engine scores, neighbourhood and title features (matching/features.py lists them);
    `prodsearch eval` fits one on `val` and tunes its probabilities. The shipped model saw
    candidates of the default formula (weights and floors): change those and fit a new one."""

    model: Path | None = Field(
        None,
        description="Pair model file; None = the shipped one (fitted on Shopee val and the "
        "product_pairs train splits: assets/pair_model.manifest.json).",
    )
    min_probability: float = Field(
        0.55,
        description="Probability a match must reach (the shipped model's: the best mean F1 over "
        "its sources, each decided by a model fitted without it).",
    )
    min2_min_probability: float = Field(
        0.55, description="Probability a lone product's best candidate must reach (min-2)."
    )
    calibration: CalibrationSettings | None = Field(
        None,
        description="This catalog's recalibration of the probabilities (`prodsearch calibrate` "
        "writes it); the minimum probabilities then apply to calibrated ones.",
    )


class FusionDecisionSettings(BaseModel):
    """The fusion decider of `prodsearch dedup`: the search's own rule (RRF/DBSF: a modality
    score reaches its threshold; formula: the fused score reaches `min_fused_score`), after
    `blend_rounds` rounds of neighbourhood blending searched with `blended`."""

    blend_rounds: int = Field(1, ge=0, le=3, description="Neighbourhood-blending rounds.")
    min2_min_fused_score: float = Field(
        0.85, description="Formula fused score a lone product's best candidate must reach."
    )
    blended: SearchSettings = SearchSettings(
        fusion="rrf",
        thresholds=Thresholds(text=0.74, chars=0.69, phash=0.8125),
        formula=FormulaSettings(
            weights=FormulaWeights(text=1.5, phash=1.5), min_fused_score=1.4731
        ),
    )


DeciderName = Literal["pair-model", "fusion"]


class DedupSettings(BaseModel):
    """Whole-catalog matching (`prodsearch dedup`): which rule decides, and its knobs."""

    decider: DeciderName = Field(
        "pair-model", description="pair-model (learned, default) or fusion (the search rule)."
    )
    min2: bool = Field(True, description="A product left alone takes a close best candidate.")
    max_cluster_size: int = Field(50, ge=1, description="No duplicate cluster grows past this.")
    pair_model: PairModelSettings = PairModelSettings()
    fusion: FusionDecisionSettings = FusionDecisionSettings()


class IngestSettings(BaseModel):
    """How `prodsearch ingest` reads a catalog file: which column is which and, for a CSV, its
    delimiter and text encoding. None = the recipe's, or guessed from the header (columns.py) or
    detected (tables.py); "" = no such column."""

    id_column: str | None = None
    title_column: str | None = None
    image_column: str | None = None
    phash_column: str | None = None
    # NoDecode: the environment's `name,brand` reaches the validator as it is (JSON works too).
    text_columns: Annotated[list[str], NoDecode] = Field(
        [], description="Columns whose texts, joined in this order, are the title signal."
    )
    delimiter: str | None = None
    encoding: str | None = None

    @field_validator("text_columns", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        # `--text-columns name,brand` and `text_columns = "name,brand"` both mean a list.
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [name.strip() for name in value.split(",") if name.strip()]
        return json.loads(value) if isinstance(value, str) else value


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
    sparse_query_terms: int | None = Field(
        None,
        ge=1,
        description="Cut a sparse (chars) query to its N heaviest (rarest) terms to find "
        "candidates, then rescore them with the whole query; None = search with the whole query.",
    )
    sparse_candidates: int = Field(
        200, ge=1, le=10_000, description="Candidates the cut sparse query finds for rescoring."
    )
    thresholds: Thresholds = Field(
        Thresholds(), description="Per-modality prefetch score thresholds for RRF and DBSF."
    )
    # RRF: each modality fires on its own tuned threshold, so any subset of modalities (an
    # image-only query, a catalog without photos) works. The formula scores higher on Shopee
    # (README, "Results") but its one threshold is tuned for text + chars + phash together:
    # `prodsearch eval --write-settings` selects it for such a catalog.
    fusion: FusionName = "rrf"
    rrf_k: int = Field(2, ge=1)
    formula: FormulaSettings = FormulaSettings()
    dedup: DedupSettings = DedupSettings()
    ingest: IngestSettings = IngestSettings()
    state_dir: Path | None = Field(
        None,
        description="Folder of each collection's own state (review answers, cluster log); "
        "None = the embedded store's directory (a server URL or :memory: store needs it set).",
    )
    hnsw_ef: int | None = Field(
        None,
        ge=1,
        description="HNSW search breadth for every collection; None = engine default below "
        f"{LARGE_COLLECTION:,} points and `hnsw_ef_large` from there.",
    )
    hnsw_ef_large: int | None = Field(
        256,
        ge=1,
        description=f"HNSW search breadth for collections of {LARGE_COLLECTION:,} points or more "
        "when hnsw_ef is None (fused recall@10 at 1M: 0.985 with the engine default, 0.994 at "
        "256).",
    )
    encoders: Literal["finetuned", "finetuned+charcnn", "pretrained"] = Field(
        "finetuned",
        description="The shipped ArcFace-fine-tuned encoders (optionally with the char-CNN as "
        "one more modality), or the pretrained ones.",
    )
    text_max_tokens: int = Field(64, ge=8, le=512)
    batch_size: int = Field(256, ge=1, le=10_000)
    max_image_pixels: int = Field(40_000_000, ge=1)

    # The HTTP API (`prodsearch serve`).
    api_key: SecretStr | None = Field(
        None,
        description="When set, every API route but /health requires it in the X-API-Key header.",
    )
    max_request_bytes: int = Field(20_000_000, ge=1, description="Largest API request body.")
    max_batch_products: int = Field(1_000, ge=1, description="Most products per POST /products.")
    index_after_writes: int = Field(
        1_000,
        ge=1,
        description="Products the API writes before it rebuilds the engine's search index (new "
        "ones are searched exactly until then).",
    )
    encode_batch_size: int = Field(
        32, ge=1, description="Concurrent API requests encoded together (1 = one at a time)."
    )
    max_active_requests: int = Field(
        32, ge=1, description="API requests worked on at once (every route but /health, docs)."
    )
    max_queued_requests: int = Field(
        64, ge=0, description="API requests waiting for a turn; past that, 503 with Retry-After."
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a turn before a queued request gets 503."
    )
    # A load balancer reuses idle connections for up to its own idle timeout (60 s on AWS ALB
    # and nginx): the server must keep them longer, or it closes one just as a request is sent
    # on it, and the balancer answers 502 (deploy/README.md, "Connections and overload").
    keep_alive_timeout_s: int = Field(
        75, ge=1, description="Seconds an idle HTTP keep-alive connection is kept open."
    )
    shutdown_timeout_s: int = Field(
        20, ge=1, description="On SIGTERM, seconds in-flight requests get to finish."
    )

    # Collection creation on a Qdrant server or cluster (the embedded engine is one shard).
    shard_number: int | None = Field(None, ge=1, description="None = one per node.")
    replication_factor: int | None = Field(None, ge=1, description="None = the server's (1).")
    write_consistency_factor: int | None = Field(
        None, ge=1, description="Replicas that must confirm a write; None = the server's (1)."
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_key_is_none(cls, value: object) -> object:
        # `PRODSEARCH_API_KEY=` (set but empty) must not mean "the key is the empty string".
        return None if isinstance(value, str) and not value.strip() else value

    def collection_params(self) -> dict[str, int]:
        """Return the sharding and replication parameters to create a collection with (only the
        ones set)."""
        params = {
            "shard_number": self.shard_number,
            "replication_factor": self.replication_factor,
            "write_consistency_factor": self.write_consistency_factor,
        }
        return {name: value for name, value in params.items() if value is not None}

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

    # How the neural encoders run (issue 7). None of these changes an encoder's identity: a
    # collection written under one backend is queried under the other.
    backend: Literal["torch", "onnx"] = Field(
        "onnx", description="Run the neural encoders in ONNX Runtime or in torch."
    )
    onnx_precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="ONNX variant; auto = per encoder, the fastest one whose mean cosine to "
        "torch is >= 0.99 (benchmarks/bench_encoders.py).",
    )
    onnx_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads; None = every available core."
    )
    cache_dir: Path = Field(
        Path("~/.cache/prodsearch"), description="Where the exported ONNX models are cached."
    )
    calibration_images: Path | None = Field(
        None,
        description="A folder of product photos to calibrate the int8 image graph with; "
        "None = the Grocery Store train photos or the sample catalog's, when present.",
    )


def settings_file() -> Path:
    """The settings file in force: PRODSEARCH_SETTINGS_FILE, else ./prodsearch.toml."""
    return Path(os.environ.get(SETTINGS_FILE_ENV, DEFAULT_SETTINGS_FILE))


def update_settings_file(
    path: Path, changes: Mapping[str, Any], replace: Sequence[str] = ()
) -> dict[str, Any]:
    """Merge `changes` (nested tables, e.g. {"dedup": {"pair_model": {...}}}) into the TOML
    settings file at `path`, keeping every other key (comments are not kept); creates the file
    when missing. The tables named in `replace` (dotted paths, e.g. "dedup.pair_model.
    calibration") are replaced whole, not merged. Returns the merged document. Raises
    ConfigError when the file is not TOML or the result is not valid settings (the file is then
    left as it was)."""
    from pydantic import ValidationError

    from prodsearch.errors import ConfigError

    try:
        document = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    merged = _merged(document, changes, frozenset(replace))
    try:
        Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"{path}: the merged settings are not valid: {exc}") from exc
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(tomli_w.dumps(merged), encoding="utf-8")
    os.replace(temporary, path)
    return merged


def _merged(
    document: Mapping[str, Any],
    changes: Mapping[str, Any],
    replace: frozenset[str],
    prefix: str = "",
) -> dict[str, Any]:
    out = dict(document)
    for key, value in changes.items():
        current = out.get(key)
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(current, Mapping) and path not in replace:
            out[key] = _merged(current, value, replace, path + ".")
        else:
            out[key] = value
    return out
