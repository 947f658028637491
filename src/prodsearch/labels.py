"""Pair labels: "these two products are (not) the same product", the currency of pair-labelled
evaluation, calibration and the review page.

Two sources:
- `labels.csv` (`id_a,id_b,same`, same = 1/0, yes/no or true/false), naming products by their
  catalog ids: `read_labels` validates it row by row;
- the product_pairs format (`LEFT<TAB>RIGHT<TAB>LABEL`, each record serialised as
  `COL attr VAL value ...`): `read_pair_file` builds the catalog from the distinct records and
  the labels between them.
Positive labels chain into groups by connected components (`label_groups`).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prodsearch.catalog import CatalogRow, clean_title
from prodsearch.errors import CatalogError

LABEL_COLUMNS = ("id_a", "id_b", "same")
_TRUE = {"1", "true", "yes", "y", "same"}
_FALSE = {"0", "false", "no", "n", "different"}
_FIELD = re.compile(r"COL (\S+) VAL (.*?)(?= COL \S+ VAL |$)")
#: record attributes appended to the title when it does not already contain them
TITLE_EXTRAS = ("brand", "manufacturer", "modelno")
#: errors listed before a bad labels file is refused
MAX_LISTED_ERRORS = 10


@dataclass(frozen=True)
class PairLabel:
    """One answer: products `id_a` and `id_b` are the same product (`same`) or not."""

    id_a: str
    id_b: str
    same: bool

    @property
    def key(self) -> frozenset[str]:
        """The unordered pair."""
        return frozenset((self.id_a, self.id_b))


def parse_same(value: str) -> bool | None:
    """A label value as a bool (None when it is not one of the accepted spellings)."""
    text = value.strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def read_labels(path: Path, known_ids: Collection[str] | None = None) -> list[PairLabel]:
    """Read and validate a `labels.csv`. Raises CatalogError naming every bad row (up to
    MAX_LISTED_ERRORS): a missing column, an empty id, a value that is not same/different, a
    product paired with itself, an id not in `known_ids` (when given), a pair answered both ways.
    A pair given twice with the same answer counts once."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise CatalogError(
                    f"{path}: needs the columns {list(LABEL_COLUMNS)}; missing {missing} "
                    f"(header: {reader.fieldnames})"
                )
            records = list(enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CatalogError(f"cannot read labels file {path}: {exc}") from exc
    labels, errors = check_labels(
        ((row, r["id_a"] or "", r["id_b"] or "", r["same"] or "") for row, r in records),
        known_ids,
    )
    if errors:
        listed = "; ".join(errors[:MAX_LISTED_ERRORS])
        more = f" (and {len(errors) - MAX_LISTED_ERRORS} more)" if len(errors) > 10 else ""
        raise CatalogError(f"{path}: {listed}{more}; nothing was stored")
    return labels


def check_labels(
    rows: Iterable[tuple[int, str, str, str]], known_ids: Collection[str] | None = None
) -> tuple[list[PairLabel], list[str]]:
    """Validate labels given as (row, id_a, id_b, same); returns the labels (each pair once)
    and one message per bad row ("row N: ...")."""
    labels: dict[frozenset[str], tuple[int, PairLabel]] = {}
    errors: list[str] = []
    for row, raw_a, raw_b, raw_same in rows:
        id_a, id_b, same = raw_a.strip(), raw_b.strip(), parse_same(raw_same)
        problem = _label_problem(id_a, id_b, raw_same, same, known_ids)
        if problem:
            errors.append(f"row {row}: {problem}")
            continue
        label = PairLabel(id_a, id_b, bool(same))
        first = labels.get(label.key)
        if first and first[1].same != label.same:
            errors.append(
                f"row {row}: {id_a} / {id_b} answered {'same' if same else 'different'}, but "
                f"row {first[0]} answered the opposite"
            )
            continue
        labels.setdefault(label.key, (row, label))
    return [label for _, label in labels.values()], errors


def _label_problem(
    id_a: str, id_b: str, raw_same: str, same: bool | None, known: Collection[str] | None
) -> str | None:
    if not id_a or not id_b:
        return "id_a and id_b must both be given"
    if id_a == id_b:
        return f"product {id_a!r} is paired with itself"
    if same is None:
        return f"same is {raw_same!r}; expected 1/0, yes/no or true/false"
    unknown = [i for i in (id_a, id_b) if known is not None and i not in known]
    if unknown:
        return f"unknown product id(s) {unknown} (not in the collection)"
    return None


def write_labels(path: Path, labels: Iterable[PairLabel]) -> None:
    """Write labels as `labels.csv` (`id_a,id_b,same` with same = 1 or 0)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_COLUMNS)
        for label in labels:
            writer.writerow([label.id_a, label.id_b, int(label.same)])


def record_fields(serialised: str) -> dict[str, str]:
    """The attributes of a product_pairs record (`COL title VAL ... COL price VAL ...`)."""
    return {m.group(1): m.group(2).strip() for m in _FIELD.finditer(serialised.strip())}


def record_title(fields: dict[str, str]) -> str:
    """A record's title: its title (or name), then brand, manufacturer and model number where
    the title does not already contain them."""
    text = fields.get("title") or fields.get("name") or ""
    for extra in TITLE_EXTRAS:
        value = fields.get(extra, "")
        if value and value.lower() not in text.lower():
            text += " " + value
    return clean_title(text)


def read_pair_file(path: Path) -> tuple[list[CatalogRow], list[PairLabel]]:
    """The catalog of a product_pairs file (one row per distinct record, id = a digest of the
    record, other attributes as payload) and its labelled pairs. Raises CatalogError when the
    file cannot be read or holds no pair."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"cannot read pair file {path}: {exc}") from exc
    rows: dict[str, CatalogRow] = {}
    labels: list[tuple[int, str, str, str]] = []
    for number, line in enumerate(lines, start=1):
        columns = line.split("\t")
        if len(columns) < 3:
            continue
        ids = [_record_row(columns[i], rows) for i in (0, 1)]
        labels.append((number, ids[0], ids[1], columns[2]))
    pairs, _ = check_labels(labels)
    if not pairs:
        raise CatalogError(f"{path}: no LEFT<TAB>RIGHT<TAB>LABEL line with a 0/1 label")
    return list(rows.values()), pairs


def _record_row(serialised: str, rows: dict[str, CatalogRow]) -> str:
    """The id of a record's catalog row, adding the row on first sight."""
    product_id = "r" + hashlib.sha1(serialised.strip().encode()).hexdigest()[:12]
    if product_id not in rows:
        fields = record_fields(serialised)
        payload = {
            k: _value(v)
            for k, v in fields.items()
            if k not in ("title", "name") and v and v.lower() != "nan"
        }
        rows[product_id] = CatalogRow(
            row=len(rows) + 1,
            product_id=product_id,
            title=record_title(fields) or None,
            payload=payload,
        )
    return product_id


def _value(text: str) -> str | float:
    try:
        return float(text)
    except ValueError:
        return text


def label_groups(ids: Sequence[str], labels: Iterable[PairLabel]) -> dict[str, int]:
    """Group numbers from positive labels: connected components over `ids` (a product with no
    positive label is a group of its own)."""
    parent = {pid: pid for pid in ids}

    def root(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for label in labels:
        if label.same and label.id_a in parent and label.id_b in parent:
            parent[root(label.id_a)] = root(label.id_b)
    numbers: dict[str, int] = {}
    return {pid: numbers.setdefault(root(pid), len(numbers)) for pid in ids}
