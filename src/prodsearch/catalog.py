"""Reading a catalog file into validated product rows; bad rows become Rejections, never aborts.

Rows are numbered as the file shows them (tables.py): a CSV as a spreadsheet (the header is row
1, the first product row 2), JSON Lines by line, Parquet from 1.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from prodsearch.errors import CatalogError, RowError
from prodsearch.recipes import Recipe
from prodsearch.tables import Table, delimiter_hint, read_table

MAX_TITLE_CHARS = 2_000
RESERVED_PAYLOAD_KEYS = frozenset(
    {"product_id", "title", "image_path", "image_phash", "content_hash", "cluster_id"}
)

_BYTE_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")
_PHASH = re.compile(r"^[0-9a-fA-F]{16}$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class CatalogRow(BaseModel):
    """One valid product of a catalog."""

    model_config = ConfigDict(frozen=True)

    row: int
    product_id: str
    title: str | None = None
    image_path: Path | None = None
    #: the encoded image itself, for products that arrive with it (the HTTP API) rather than a path
    image_bytes: bytes | None = None
    phash: str | None = None
    payload: dict[str, Any] = {}


@dataclass(frozen=True)
class Rejection:
    """A row that was not ingested, and why."""

    row: int
    product_id: str | None
    field: str
    reason: str

    @classmethod
    def from_error(cls, error: RowError) -> Rejection:
        """Build a Rejection from a RowError."""
        return cls(error.row, error.product_id, error.field, error.reason)


@dataclass
class Catalog:
    """The valid rows of a catalog file and the rows rejected while reading it."""

    path: Path | None  # None for products that did not come from a file (the HTTP API)
    rows: list[CatalogRow]
    rejections: list[Rejection] = field(default_factory=list)
    rows_read: int = 0


def clean_title(raw: str) -> str:
    """Return `raw` with literal byte escapes (`\\xc3\\x89`) decoded, HTML entities unescaped
    (twice: exports hold `&amp;quot;`) and whitespace collapsed."""
    text = _BYTE_ESCAPES.sub(_decode_byte_escapes, raw)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


def _decode_byte_escapes(match: re.Match[str]) -> str:
    data = bytes.fromhex(match.group(0).replace("\\x", ""))
    return data.decode("utf-8", errors="replace")


def read_catalog(path: Path, recipe: Recipe, images_dir: Path | None = None) -> Catalog:
    """Read the catalog file at `path` (a CSV in the recipe's delimiter and encoding, Parquet or
    JSON Lines) with `recipe`'s column mapping; see `catalog_from_table`.

    Raises CatalogError when the file as a whole cannot be used (missing, not in the recipe's
    encoding, empty, wrong delimiter, required columns absent).
    """
    table = read_table(path, delimiter=recipe.delimiter, encoding=recipe.encoding)
    return catalog_from_table(table, recipe, images_dir)


def catalog_from_table(table: Table, recipe: Recipe, images_dir: Path | None = None) -> Catalog:
    """Validate every row of `table` with `recipe`'s column mapping.

    Images are resolved against `images_dir` (default: the file's folder) and must stay inside
    it. Returns the valid rows and the rejected ones. Raises CatalogError when the table as a
    whole cannot be used (required columns absent, a column clashing with a payload key).
    """
    path, frame = table.path, table.frame
    validator = RowValidator.for_columns(list(frame.columns), recipe, path, images_dir)
    validator.numeric = {c for c in validator.payload if _is_numeric(frame[c])}
    rows, rejections = validator.validate(frame)
    return Catalog(path=path, rows=rows, rejections=rejections, rows_read=len(frame))


@dataclass
class RowValidator:
    """The row rules of one catalog, applied batch by batch (a whole table at once, or a stream
    of batches as `ingest --ray` reads them): the ids seen so far are kept across batches, so a
    repeated id is rejected wherever it comes."""

    recipe: Recipe
    image_root: Path
    #: the columns kept as payload
    payload: list[str]
    #: payload columns whose values are all numbers (in the whole catalog), stored as numbers
    numeric: set[str] = field(default_factory=set)
    #: product id -> the row it was first seen on
    seen: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_columns(
        cls, columns: list[str], recipe: Recipe, path: Path, images_dir: Path | None = None
    ) -> RowValidator:
        """A validator for a catalog with header `columns` (numeric columns still to be set).
        Raises CatalogError when required columns are absent or a column clashes with a payload
        key."""
        _check_columns(columns, recipe, path)
        payload = payload_columns(columns, recipe)
        clashes = RESERVED_PAYLOAD_KEYS.intersection(payload)
        if clashes:
            raise CatalogError(
                f"{path}: column(s) {sorted(clashes)} clash with prodsearch's own payload keys; "
                "rename them, map them in a recipe, or add them to the title (--text-columns)"
            )
        return cls(recipe, (images_dir or path.parent).resolve(), payload)

    def validate(self, frame: pd.DataFrame) -> tuple[list[CatalogRow], list[Rejection]]:
        """The valid rows and the rejections of `frame` (every cell a str, the index the rows'
        numbers)."""
        validations = (
            (
                row,
                partial(
                    _validate_row,
                    row,
                    record,
                    self.recipe,
                    self.image_root,
                    self.payload,
                    self.numeric,
                ),
            )
            for row, record in zip(frame.index, frame.to_dict(orient="records"), strict=True)
        )
        return collect_rows(validations, id_field=self.recipe.id, first_row_of=self.seen)


def numeric_columns(frame: pd.DataFrame, columns: Iterable[str]) -> dict[str, bool | None]:
    """For each of `columns`: whether its non-empty values in `frame` are all numbers (None: it
    has none here). A column is numeric in a catalog when it is in some batch and False in
    none."""
    return {c: (None if (frame[c] == "").all() else _is_numeric(frame[c])) for c in columns}


def payload_columns(columns: list[str], recipe: Recipe) -> list[str]:
    """Return the columns kept as payload: every column `recipe` does not map. A text column
    stays payload too (a filter on `brand` still works), unless prodsearch reserves its name:
    its text is in the title already."""
    return [
        c
        for c in columns
        if c not in recipe.mapped_columns()
        and not (c in recipe.text_columns and c in RESERVED_PAYLOAD_KEYS)
    ]


def collect_rows(
    candidates: Iterable[tuple[int, Callable[[], CatalogRow]]],
    id_field: str,
    first_row_of: dict[str, int] | None = None,
) -> tuple[list[CatalogRow], list[Rejection]]:
    """Validate products in order: each candidate is its row number and a function building its
    CatalogRow (raising RowError). Returns the valid rows and the rejections; a repeated product
    id is rejected, the first occurrence is kept. `first_row_of` (updated) holds the ids of
    earlier batches of the same catalog."""
    rows: list[CatalogRow] = []
    rejections: list[Rejection] = []
    first_row_of = {} if first_row_of is None else first_row_of
    for row_number, build in candidates:
        try:
            row = build()
            if row.product_id in first_row_of:
                raise RowError(
                    row_number,
                    id_field,
                    f"duplicate id {row.product_id!r} (first seen on row "
                    f"{first_row_of[row.product_id]}); the first occurrence is kept",
                    row.product_id,
                )
        except RowError as error:
            rejections.append(Rejection.from_error(error))
            continue
        first_row_of[row.product_id] = row_number
        rows.append(row)
    return rows, rejections


def check_product(
    row: int,
    raw_id: str | None,
    raw_title: str | None,
    raw_phash: str | None,
    *,
    has_image: bool,
    fields: Recipe,
) -> tuple[str, str | None, str | None]:
    """Validate the parts every product source shares (a CSV row, an API item): the id, the
    title (cleaned, at most MAX_TITLE_CHARS) and the perceptual hash (16 hex digits), and that
    there is a title or an image. `fields` names the fields in error messages.

    Returns (product_id, title or None, phash or None); raises RowError naming the field.
    """
    product_id = (raw_id or "").strip()
    if not product_id or product_id.lower() in {"nan", "null", "none"}:
        raise RowError(row, fields.id, "missing product id")
    title = clean_title(raw_title or "")
    if len(title) > MAX_TITLE_CHARS:
        raise RowError(
            row,
            fields.title or "title",
            f"title is {len(title):,} characters, over the limit of {MAX_TITLE_CHARS:,}",
            product_id,
        )
    phash = (raw_phash or "").strip().lower()
    if phash and not _PHASH.match(phash):
        raise RowError(
            row,
            fields.phash or "image_phash",
            f"image_phash {phash[:40]!r} is not 16 hexadecimal digits",
            product_id,
        )
    if not title and not has_image:
        raise RowError(row, fields.title or "title", "empty title and no image", product_id)
    return product_id, title or None, phash or None


def check_payload(row: int, product_id: str, payload: Mapping[str, Any], field: str) -> None:
    """Raise RowError when `payload` uses a key prodsearch keeps for itself."""
    clashes = RESERVED_PAYLOAD_KEYS.intersection(payload)
    if clashes:
        raise RowError(
            row,
            field,
            f"payload key(s) {sorted(clashes)} are reserved by prodsearch; rename them",
            product_id,
        )


def _check_columns(columns: list[str], recipe: Recipe, path: Path) -> None:
    absent_text = [c for c in recipe.text_columns if c not in columns]
    if absent_text:
        raise CatalogError(
            f"{path}: text column(s) {absent_text} not found; the header has {columns[:20]}"
        )
    required = [recipe.id] + [c for c in (recipe.title, recipe.image) if c]
    missing = [c for c in required if c not in columns]
    if recipe.id in columns and (
        (recipe.title and recipe.title in columns) or (recipe.image and recipe.image in columns)
    ):
        return
    raise CatalogError(
        f"{path}: required column(s) {missing} not found; the header has {columns[:10]}. "
        "Choose a recipe that fits (--recipe), name the columns (--id-column, --title-column, "
        f"...) or leave --recipe out to have them guessed.{delimiter_hint(columns)}"
    )


def _is_numeric(column: pd.Series) -> bool:
    values = column[column != ""]
    if values.empty:
        return False
    return bool(pd.to_numeric(values, errors="coerce").notna().all())


def _validate_row(
    row: int,
    record: dict[str, str],
    recipe: Recipe,
    image_root: Path,
    payload_columns: list[str],
    numeric: set[str],
) -> CatalogRow:
    product_id, title, phash = check_product(
        row,
        record.get(recipe.id),
        " ".join(text for c in recipe.title_columns() if (text := (record.get(c) or "").strip())),
        record.get(recipe.phash) if recipe.phash else None,
        has_image=bool(recipe.image and (record.get(recipe.image) or "").strip()),
        fields=recipe,
    )
    image_path = _resolve_image(row, record, recipe, image_root, product_id)
    payload: dict[str, Any] = {}
    for column in payload_columns:
        value = record[column]
        if value == "":
            continue
        payload[column] = _number(value) if column in numeric else value
    return CatalogRow(
        row=row,
        product_id=product_id,
        title=title,
        image_path=image_path,
        phash=phash,
        payload=payload,
    )


def _resolve_image(
    row: int, record: dict[str, str], recipe: Recipe, image_root: Path, product_id: str
) -> Path | None:
    if not recipe.image:
        return None
    value = (record.get(recipe.image) or "").strip()
    if not value:
        return None
    if _URL.match(value):
        raise RowError(
            row,
            recipe.image,
            f"image {value[:80]!r} is a URL; download the images and pass --images-dir, or "
            "leave images out (--image-column '')",
            product_id,
        )
    candidate = (image_root / value).resolve()
    if not candidate.is_relative_to(image_root):
        raise RowError(
            row, recipe.image, f"image path {value!r} points outside {image_root}", product_id
        )
    if not candidate.is_file():
        raise RowError(row, recipe.image, f"image file not found: {candidate}", product_id)
    return candidate


def _number(value: str) -> int | float:
    number = float(value)
    if math.isfinite(number) and number.is_integer() and "." not in value and "e" not in value:
        return int(value)
    return number
