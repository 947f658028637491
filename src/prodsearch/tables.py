"""Reading a catalog export into a table of text: CSV (delimiter and text encoding detected when
not given), Parquet and JSON Lines.

Every cell arrives as text, as a CSV cell would ("" when empty): typed Parquet and JSON values are
written the way a CSV export writes them, so the same export in another format gives the same
products. Rows are numbered as the file shows them: a CSV as a spreadsheet (the header is row 1,
the first product row 2), JSON Lines by line, Parquet from 1.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import date, datetime, time
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prodsearch.errors import CatalogError

#: Delimiters a CSV is tried with, in order of preference when two fit equally well.
CSV_DELIMITERS = (",", ";", "\t", "|")
_SNIFF_CHARS = 64_000
_SNIFF_RECORDS = 200
_UTF8_NAMES = {"utf-8", "utf8", "utf_8", "utf-8-sig", "utf_8_sig"}


class FileFormat(StrEnum):
    """The kinds of catalog file prodsearch reads."""

    CSV = "csv"
    PARQUET = "parquet"
    JSON_LINES = "jsonl"


_FORMAT_OF_SUFFIX = {
    "": FileFormat.CSV,
    ".csv": FileFormat.CSV,
    ".tsv": FileFormat.CSV,
    ".tab": FileFormat.CSV,
    ".txt": FileFormat.CSV,
    ".parquet": FileFormat.PARQUET,
    ".pq": FileFormat.PARQUET,
    ".jsonl": FileFormat.JSON_LINES,
    ".ndjson": FileFormat.JSON_LINES,
    ".json": FileFormat.JSON_LINES,
}


@dataclass(frozen=True)
class Table:
    """A catalog file read as text: every cell a str, the index the rows' numbers."""

    path: Path
    frame: pd.DataFrame
    format: FileFormat
    #: a CSV's delimiter and text encoding (None for other formats), and which were detected
    delimiter: str | None = None
    encoding: str | None = None
    detected: frozenset[str] = frozenset()

    @property
    def columns(self) -> list[str]:
        """Return the header, in file order."""
        return [str(c) for c in self.frame.columns]

    def describe(self) -> str:
        """Return one line saying what was read and how: format, rows, delimiter, encoding."""
        label = {"csv": "CSV", "parquet": "Parquet", "jsonl": "JSON Lines"}[self.format]
        rows = len(self.frame)
        parts = [f"{self.path.name}: {label}, {rows:,} row{'' if rows == 1 else 's'}"]
        for name, value in (("delimiter", self.delimiter), ("encoding", self.encoding)):
            if value is not None:
                how = " (detected)" if name in self.detected else ""
                shown = repr(value) if name == "delimiter" else value
                parts.append(f"{name} {shown}{how}")
        return "; ".join(parts)


def read_table(path: Path, *, delimiter: str | None = None, encoding: str | None = None) -> Table:
    """Read the catalog file at `path`; its format comes from the suffix (.csv/.tsv/.txt,
    .parquet/.pq, .jsonl/.ndjson/.json).

    A CSV is read with `delimiter`, a CSV or JSON Lines file with `encoding`, each detected when
    None (see `detect_delimiter`, `decode_text`). Raises CatalogError when the file as a whole
    cannot be read (missing, unknown format, empty, undecodable, malformed).
    """
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    file_format = _FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if file_format is None:
        raise CatalogError(
            f"{path}: cannot read {path.suffix!r} files; export the catalog as CSV, Parquet "
            "(.parquet) or JSON Lines (.jsonl)"
        )
    if file_format is FileFormat.PARQUET:
        return Table(path, _read_parquet(path), file_format)
    text, used_encoding = decode_text(path.read_bytes(), encoding, path)
    detected = {"encoding"} if encoding is None else set()
    if file_format is FileFormat.JSON_LINES:
        frame = _read_json_lines(path, text)
        return Table(path, frame, file_format, None, used_encoding, frozenset(detected))
    used_delimiter = delimiter or detect_delimiter(text)
    if delimiter is None:
        detected.add("delimiter")
    frame = _parse_csv(text, used_delimiter, path)
    return Table(path, frame, file_format, used_delimiter, used_encoding, frozenset(detected))


def decode_text(raw: bytes, encoding: str | None, path: Path) -> tuple[str, str]:
    """Decode a file's bytes; returns (text, encoding used).

    With `encoding` None it is detected: a byte-order mark says UTF-8 (`utf-8-sig`) or UTF-16;
    otherwise UTF-8 if the bytes decode as UTF-8, else cp1252, else latin-1. cp1252 goes before
    latin-1 because the two agree on every printable latin-1 character and differ only on bytes
    0x80-0x9F, which are invisible control codes in latin-1 but € ‚ “ ” – — ™ in cp1252, so a
    file holding them is a Windows export; the five bytes cp1252 leaves undefined fall back to
    latin-1, which decodes anything. A UTF-8 file may carry a byte-order mark either way.
    Raises CatalogError when the bytes are not in the given encoding, or it is unknown.
    """
    if encoding is None:
        return _detect_and_decode(raw)
    codec = "utf-8-sig" if encoding.lower() in _UTF8_NAMES else encoding
    try:
        return raw.decode(codec), encoding
    except LookupError as exc:
        raise CatalogError(f"unknown text encoding {encoding!r} (e.g. utf-8, cp1252)") from exc
    except UnicodeDecodeError as exc:
        name = "UTF-8" if codec == "utf-8-sig" else encoding
        raise CatalogError(
            f"{path} is not {name} (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "re-save the file as UTF-8, or name its encoding (--encoding cp1252), or leave "
            "--encoding and --recipe out to have it detected"
        ) from exc


def _detect_and_decode(raw: bytes) -> tuple[str, str]:
    if raw.startswith(codecs.BOM_UTF8):
        return raw.decode("utf-8-sig"), "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16"), "utf-16"
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1"), "latin-1"


def detect_delimiter(text: str) -> str:
    """Return the delimiter of the CSV `text`, one of CSV_DELIMITERS.

    A candidate must split the header into two columns or more; among those, the one giving the
    most sampled rows as many fields as the header wins, then the one giving the most columns,
    then the earlier in CSV_DELIMITERS. A header no candidate splits is one column: ",".
    """
    sample = text[:_SNIFF_CHARS]
    best: tuple[float, int] | None = None
    chosen = ","
    for delimiter in CSV_DELIMITERS:
        records = list(islice(csv.reader(io.StringIO(sample), delimiter=delimiter), _SNIFF_RECORDS))
        if len(text) > len(sample):
            records = records[:-1]  # the last sampled record may be cut short
        records = [r for r in records if r]
        if not records or len(records[0]) < 2:
            continue
        width = len(records[0])
        rows = records[1:]
        fitting = sum(len(r) == width for r in rows) / len(rows) if rows else 1.0
        if best is None or (fitting, width) > best:
            best, chosen = (fitting, width), delimiter
    return chosen


def delimiter_hint(columns: list[str]) -> str:
    """Return a sentence for an error about a one-column header that another delimiter would
    split ("" when there is none to give)."""
    if len(columns) != 1:
        return ""
    for delimiter in CSV_DELIMITERS[1:]:
        if delimiter in columns[0]:
            return f" The header looks {delimiter!r}-delimited: pass --delimiter {delimiter!r}."
    return ""


def _parse_csv(text: str, delimiter: str, path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            sep=delimiter,
            quoting=csv.QUOTE_MINIMAL,
        )
    except pd.errors.EmptyDataError as exc:
        raise CatalogError(f"{path} is empty: expected a header row and product rows") from exc
    except pd.errors.ParserError as exc:
        raise CatalogError(f"{path} is not a valid CSV: {exc}") from exc
    frame.index = pd.RangeIndex(2, len(frame) + 2)
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except ImportError as exc:
        raise CatalogError(f"reading Parquet needs pyarrow: pip install pyarrow ({exc})") from exc
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise CatalogError(f"{path} is not a readable Parquet file: {exc}") from exc
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    frame = frame.map(as_text) if len(frame.columns) else frame
    frame.index = pd.RangeIndex(1, len(frame) + 1)
    return frame


def _read_json_lines(path: Path, text: str) -> pd.DataFrame:
    if not text.strip():
        raise CatalogError(f"{path} is empty: expected one JSON object per line")
    if text.lstrip().startswith("["):  # a JSON array of objects, as some exports write .json
        records = _json(text, path, "the file")
        if not isinstance(records, list):
            raise CatalogError(f"{path}: expected a JSON array of objects")
        numbered = list(enumerate(records, start=1))
    else:
        numbered = [
            (number, _json(line, path, f"line {number}"))
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    for number, record in numbered:
        if not isinstance(record, dict):
            raise CatalogError(
                f"{path}, record {number}: expected a JSON object, got {type(record).__name__}"
            )
    frame = pd.DataFrame.from_records(
        [{str(k): as_text(v) for k, v in record.items()} for _, record in numbered],
        index=[number for number, _ in numbered],
    )
    return frame.fillna("")


def _json(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}, {where}: not valid JSON ({exc.msg}, column {exc.colno})"
        ) from exc


def as_text(value: Any) -> str:
    """Return `value` (a Parquet or JSON cell) as a CSV export writes it: "" for null or NaN,
    integers without a decimal point (also a float that holds one, as a CSV's "3" in a column of
    prices becomes 3.0), other floats in their shortest form, true/false, lists and objects as
    JSON, dates and times in ISO 8601."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isnan(number):
            return ""
        if number.is_integer() and abs(number) < 2**53:
            return str(int(number))
        return repr(number)
    if isinstance(value, list | tuple | dict | np.ndarray):
        plain = value.tolist() if isinstance(value, np.ndarray) else value
        return json.dumps(plain, ensure_ascii=False, default=str)
    if value is None or pd.isna(value):
        return ""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)
