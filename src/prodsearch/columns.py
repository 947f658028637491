"""Which columns of a catalog file hold the product id, title, image and perceptual hash: the one
place the guessing rules live.

A column the user names (a flag, the environment, the settings file) is taken as named; a recipe
names the rest. Without a recipe, each role left is guessed from the header among the names
exports commonly give it (GUESSES, compared blind to case and punctuation: `Image Src`,
`image-src` and `imageSrc` are all image_src). A role that two columns could fill is refused,
naming both, rather than picked; a catalog with `id,title,image,image_phash` is guessed exactly
as the `generic` recipe maps it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from prodsearch.catalog import payload_columns
from prodsearch.errors import CatalogError
from prodsearch.recipes import Recipe, builtin_recipes, load_recipe
from prodsearch.settings import IngestSettings
from prodsearch.tables import Table, delimiter_hint, read_table

ROLES = ("id", "title", "image", "phash")

#: The column names each role is guessed from, as `normalise` spells them. The lists are
#: disjoint, and none holds a name that is not, in most exports, that role: a barcode (ean,
#: gtin) is not a listing's id and `description` is not its title.
GUESSES: dict[str, tuple[str, ...]] = {
    "id": (
        "id",
        "sku",
        "product_id",
        "item_id",
        "variant_sku",
        "listing_id",
        "offer_id",
        "article_id",
    ),
    "title": (
        "title",
        "name",
        "product_name",
        "product_title",
        "item_name",
        "item_title",
        "listing_title",
    ),
    "image": (
        "image",
        "image_url",
        "image_src",
        "image_path",
        "image_file",
        "image_link",
        "img",
        "img_url",
        "picture",
        "photo",
        "main_image",
    ),
    "phash": ("image_phash", "phash", "perceptual_hash"),
}

#: The command-line flag that names each role's column.
FLAGS = {role: f"--{role}-column" for role in ROLES}


class Source(StrEnum):
    """How a role's column was chosen."""

    GIVEN = "given"  # by a flag, the environment or the settings file
    RECIPE = "recipe"
    GUESSED = "guessed"


@dataclass(frozen=True)
class MappedCatalog:
    """A catalog file read, and the column mapping to validate its rows with."""

    table: Table
    #: the mapping in effect, with the delimiter and encoding the file was read with: written
    #: out (`Recipe.to_toml`) it reads the same file the same way again
    recipe: Recipe
    sources: dict[str, Source]

    def describe(self) -> list[str]:
        """Return what was read and the mapping, one line each: `title <- name (guessed)`, the
        title as its text columns joined (`name + brand`)."""
        lines = [self.table.describe()]
        for role in ROLES:
            column = getattr(self.recipe, role)
            shown = " + ".join(self.recipe.title_columns()) if role == "title" else column
            how = f" ({self.sources[role]})" if column and role in self.sources else ""
            lines.append(f"  {role:<5} <- {shown or '-'}{how}")
        payload = payload_columns(self.table.columns, self.recipe)
        lines.append(f"  payload: {', '.join(payload) or '-'}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable account of the file and the mapping."""
        return {
            "format": str(self.table.format),
            "delimiter": self.table.delimiter,
            "encoding": self.table.encoding,
            "detected": sorted(self.table.detected),
            **{role: getattr(self.recipe, role) for role in ROLES},
            "text_columns": self.recipe.text_columns,
            "sources": {role: str(source) for role, source in self.sources.items()},
            "payload": payload_columns(self.table.columns, self.recipe),
        }


def normalise(name: str) -> str:
    """Return a column name as GUESSES spell it: camelCase split, lower case, every run of
    characters other than letters and digits one "_" (`Image Src`, `imageSrc` -> image_src)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    return re.sub(r"[^0-9a-z]+", "_", spaced.lower()).strip("_")


def map_catalog(path: Path, choices: IngestSettings, recipe: Recipe | None = None) -> MappedCatalog:
    """Read the catalog file at `path` and settle which column is which.

    `choices` (flags, environment, settings file) name columns and a CSV's delimiter and
    encoding; `recipe` supplies what they leave open. Without a recipe, the delimiter and the
    encoding are detected and the columns guessed (`resolve_columns`).
    Raises CatalogError when the file cannot be read, a named column is not in it, or a column
    cannot be guessed.
    """
    table = read_table(
        path,
        delimiter=choices.delimiter or (recipe.delimiter if recipe else None),
        encoding=choices.encoding or (recipe.encoding if recipe else None),
    )
    mapping, sources = resolve_columns(table.columns, choices, recipe, where=str(path))
    read_as = {"delimiter": table.delimiter or ",", "encoding": table.encoding or "utf-8"}
    return MappedCatalog(table, mapping.model_copy(update=read_as), sources)


def resolve_columns(
    header: Sequence[str],
    choices: IngestSettings,
    recipe: Recipe | None = None,
    *,
    where: str = "the catalog",
) -> tuple[Recipe, dict[str, Source]]:
    """Return the column mapping for a file with `header` and how each role's column was chosen.

    A column named in `choices` wins; then `recipe`'s; without a recipe the rest is guessed
    from GUESSES. `--text-columns` without a title column makes the first text column the
    title's. `where` names the file in errors.
    Raises CatalogError when a named column is not in the header, or, when guessing, a role has
    two candidates, or there is no id column, or neither a title nor an image column.
    """
    named = _named_columns(header, choices, where)
    text_columns = list(choices.text_columns)
    if text_columns and "title" not in named:
        named["title"] = text_columns[0]
    sources = {role: Source.GIVEN for role in named}
    if recipe is not None:
        picked = {role: named.get(role, getattr(recipe, role)) for role in ROLES}
        sources.update({role: Source.RECIPE for role in ROLES if role not in named})
        description = recipe.description
        text_columns = text_columns or list(recipe.text_columns)
    else:
        picked = _guess_the_rest(header, named, text_columns, where)
        sources.update(
            {role: Source.GUESSED for role in ROLES if role not in named and picked[role]}
        )
        description = f"Columns of {Path(where).name}, as `prodsearch ingest` mapped them."
    mapping = Recipe(description=description, text_columns=text_columns, **picked)
    return mapping, sources


def _named_columns(header: Sequence[str], choices: IngestSettings, where: str) -> dict[str, Any]:
    """Role -> the column `choices` name for it (None: no such column), checked against the
    header."""
    named: dict[str, Any] = {}
    for role in ROLES:
        column = getattr(choices, f"{role}_column")
        if column is not None:
            named[role] = column or None
            _check_present(column, header, FLAGS[role], where)
    if "id" in named and named["id"] is None:
        raise CatalogError(f"{FLAGS['id']} cannot be empty: every product needs an id")
    for column in choices.text_columns:
        _check_present(column, header, "--text-columns", where)
    return named


def _check_present(column: str, header: Sequence[str], flag: str, where: str) -> None:
    if not column or column in header:
        return
    same = [c for c in header if normalise(c) == normalise(column)]
    close = same or difflib.get_close_matches(column, list(header), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise CatalogError(
        f"{flag} {column!r}: no such column in {where}{hint} The header has {list(header)[:20]}"
    )


def _guess_the_rest(
    header: Sequence[str], named: dict[str, Any], text_columns: list[str], where: str
) -> dict[str, Any]:
    """Role -> column for every role: the named ones, the others guessed (None: no candidate)."""
    taken = {c for c in named.values() if c} | set(text_columns)
    picked = dict(named)
    for role in ROLES:
        if role in picked:
            continue
        found = [c for c in header if c not in taken and normalise(c) in GUESSES[role]]
        if len(found) > 1:
            raise CatalogError(_ambiguous(role, found, where))
        picked[role] = found[0] if found else None
        taken.update(found)
    if picked["id"] is None:
        raise CatalogError(
            f"{where}: no id column: none of {list(header)[:20]} is a usual id name "
            f"({', '.join(GUESSES['id'])}); name it with {FLAGS['id']}{_recipe_hint(header)}."
            f"{delimiter_hint(list(header))}"
        )
    if picked["title"] is None and picked["image"] is None:
        raise CatalogError(
            f"{where}: no title or image column: none of {list(header)[:20]} is a usual title "
            f"name ({', '.join(GUESSES['title'])}) or image name; name one with "
            f"{FLAGS['title']} (or {FLAGS['image']}, --text-columns){_recipe_hint(header)}."
        )
    return picked


def _ambiguous(role: str, found: list[str], where: str) -> str:
    names = ", ".join(repr(c) for c in found[:-1]) + f" and {found[-1]!r}"
    also = f", or use them all with --text-columns {','.join(found)}" if role == "title" else ""
    return (
        f"{where}: {len(found)} {role}-like columns, {names}: say which with {FLAGS[role]} "
        f"NAME{also} (or {role}_column in the settings file's ingest table)"
    )


def _recipe_hint(header: Sequence[str]) -> str:
    fitting = [n for n in builtin_recipes() if load_recipe(n).mapped_columns() <= set(header)]
    if not fitting:
        return ""
    return f"; the columns fit the built-in recipe {fitting[0]!r}: --recipe {fitting[0]}"
