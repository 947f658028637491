"""A catalog as a Ray Dataset: CSV or Parquet, a local path or an object-store URI Ray reads.

Every cell is read as text, as the local reader (`tables.read_table`) reads it, and the columns
are mapped by the same rules (`columns.resolve_columns`), from the header. The rows keep their
file order (`preserve_order`), so the driver numbers them as the local reader
does: a CSV's first product row is row 2 (the header is row 1), a Parquet file's row 1.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from prodsearch.catalog import RowValidator, numeric_columns
from prodsearch.columns import resolve_columns
from prodsearch.errors import CatalogError
from prodsearch.recipes import Recipe
from prodsearch.settings import IngestSettings
from prodsearch.tables import as_text, decode_text, detect_delimiter

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: bytes of a CSV's start read on the driver to find its encoding, delimiter and header
SNIFF_BYTES = 1 << 16


@dataclass
class CatalogDataset:
    """A catalog read by Ray Data, its columns mapped."""

    source: str
    dataset: Any  # ray.data.Dataset
    recipe: Recipe
    columns: list[str]
    #: the number of the first product row (2 for a CSV, 1 for Parquet)
    first_row: int
    parquet: bool

    def validator(self, images_dir: Path | None) -> RowValidator:
        """The catalog's row rules, its numeric payload columns found over the whole dataset
        (one Ray Data pass, as the local reader looks at the whole column)."""
        where = Path(self.source)
        validator = RowValidator.for_columns(self.columns, self.recipe, where, images_dir)
        if validator.payload:
            flags = self.dataset.map_batches(
                _numeric_flags, fn_kwargs={"columns": validator.payload}, batch_format="pandas"
            ).take_all()
            validator.numeric = {
                c
                for c in validator.payload
                if any(f[c] == 1 for f in flags) and not any(f[c] == 0 for f in flags)
            }
        return validator

    def frames(self, batch_size: int) -> Iterator[pd.DataFrame]:
        """The catalog in file order, `batch_size` rows at a time: every cell a str, the index
        the rows' numbers."""
        row = self.first_row
        for batch in self.dataset.iter_batches(batch_size=batch_size, batch_format="pandas"):
            frame = _as_text(batch)
            frame.index = pd.RangeIndex(row, row + len(frame))
            row += len(frame)
            yield frame


def _numeric_flags(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row: for each column 1 (all numbers), 0 (not) or -1 (no values in this batch)."""
    flags = numeric_columns(_as_text(frame), columns)
    return pd.DataFrame([{c: -1 if f is None else int(f) for c, f in flags.items()}])


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as the local reader has it: a Python str ("" for a null; Parquet values as a
    CSV export writes them), in object columns (pandas' Arrow-backed columns read a failed
    number conversion as NaN, not as missing)."""
    return frame.astype(object).map(as_text)


def read_dataset(source: str, choices: IngestSettings, recipe: Recipe | None) -> CatalogDataset:
    """Open `source` (a CSV or Parquet file or folder: a path or a URI such as s3://...) as a
    Ray Dataset and map its columns as `ingest` maps them (`choices`, then `recipe`, then
    guessed). Raises CatalogError for another format, an unreadable file or unmappable columns.
    """
    import ray

    # Rows keep their catalog order: row numbers and "the first occurrence of an id is kept".
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    suffix = Path(source.rstrip("/")).suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            dataset = ray.data.read_parquet(source)
            header = list(dataset.schema().names)
            delimiter, encoding = None, None
        elif suffix in CSV_SUFFIXES:
            delimiter = choices.delimiter or (recipe.delimiter if recipe else None)
            encoding = choices.encoding or (recipe.encoding if recipe else None)
            header, delimiter, encoding = _sniff_csv(source, delimiter, encoding)
            dataset = _read_csv(ray, source, header, delimiter, encoding)
        else:
            raise CatalogError(
                f"{source}: `ingest --ray` reads CSV (.csv, .tsv, .txt) or Parquet (.parquet); "
                "convert the catalog, or ingest it without --ray"
            )
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise CatalogError(f"{source}: cannot read the catalog: {exc}") from exc
    mapping, _ = resolve_columns(header, choices, recipe, where=source)
    read_as = {"delimiter": delimiter or ",", "encoding": encoding or "utf-8"}
    parquet = suffix in PARQUET_SUFFIXES
    return CatalogDataset(
        source, dataset, mapping.model_copy(update=read_as), header, 1 if parquet else 2, parquet
    )


def _sniff_csv(
    source: str, delimiter: str | None, encoding: str | None
) -> tuple[list[str], str, str]:
    """The header, delimiter and encoding of a CSV, from its first SNIFF_BYTES (detected as the
    local reader detects them where not given)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(_uri(source))
    with filesystem.open_input_stream(path) as stream:
        raw = stream.read(SNIFF_BYTES)
    if len(raw) == SNIFF_BYTES and b"\n" in raw:
        raw = raw[: raw.rindex(b"\n") + 1]  # whole lines: no character cut in two
    text, used_encoding = decode_text(raw, encoding, Path(source))
    used_delimiter = delimiter or detect_delimiter(text)
    header = next(csv.reader(io.StringIO(text), delimiter=used_delimiter), None)
    if not header:
        raise CatalogError(f"{source} is empty: expected a header row and product rows")
    return [h.lstrip("\ufeff") for h in header], used_delimiter, used_encoding


def _read_csv(ray: Any, source: str, header: list[str], delimiter: str, encoding: str) -> Any:
    """The CSV as a Dataset of str columns ("" for an empty cell, as pandas reads it locally)."""
    import pyarrow as pa
    from pyarrow import csv as pacsv

    codec = "utf8" if encoding.lower().replace("-", "") in ("utf8", "utf8sig") else encoding
    return ray.data.read_csv(
        source,
        read_options=pacsv.ReadOptions(encoding=codec),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(header, pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


def _uri(source: str) -> str:
    """A local path as an absolute path (pyarrow's from_uri takes those and URIs)."""
    return source if "://" in source else str(Path(source).resolve())
