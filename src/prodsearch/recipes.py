"""Catalog recipes: which CSV columns hold the product id, title, image and perceptual hash.

Built-in recipes are the TOML files in the repository's `ingest/recipes/` (shipped inside the
wheel as `prodsearch/recipes/`); `--recipe` also accepts a path to a TOML file of the same shape.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ValidationError, field_validator

from prodsearch.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent
# A wheel carries the recipes inside the package; a source checkout keeps them in ingest/recipes.
_RECIPE_DIRS = (_PACKAGE_DIR / "recipes", _PACKAGE_DIR.parents[1] / "ingest" / "recipes")


class Recipe(BaseModel):
    """Column mapping of one catalog format. Columns not named here become payload; "" names no
    column (TOML has no null)."""

    description: str = ""
    id: str
    title: str | None = "title"
    image: str | None = None
    phash: str | None = None
    #: more columns for the title signal: the texts of `title_columns()`, joined in that order
    text_columns: list[str] = []
    delimiter: str = ","
    #: a CSV or JSON Lines file's text encoding (a UTF-8 byte-order mark is accepted)
    encoding: str = "utf-8"

    @field_validator("title", "image", "phash", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    def mapped_columns(self) -> set[str]:
        """Return the CSV columns this recipe consumes (the rest is payload)."""
        return {c for c in (self.id, self.title, self.image, self.phash) if c}

    def title_columns(self) -> list[str]:
        """Return the columns whose texts, joined with a space, are a product's title: the
        text columns in their order, the title column first unless they name it."""
        if self.title and self.title not in self.text_columns:
            return [self.title, *self.text_columns]
        return list(self.text_columns)

    def to_toml(self) -> str:
        """Return this recipe as a recipe file's TOML (what `load_recipe` reads back)."""
        document = {**self.model_dump(), "title": self.title or ""}  # "title" is the default
        return tomli_w.dumps({k: v for k, v in document.items() if v is not None and v != []})


def recipes_dir() -> Path:
    """Return the directory that holds the built-in recipes."""
    for candidate in _RECIPE_DIRS:
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"built-in recipes not found in {', '.join(map(str, _RECIPE_DIRS))}")


def builtin_recipes() -> list[str]:
    """Return the names of the built-in recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a built-in recipe by name, or a recipe TOML file by path.

    Raises ConfigError when the recipe does not exist or is malformed.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = recipes_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"recipe {name_or_path!r} not found; built-in recipes: {', '.join(builtin_recipes())}, "
            "or pass a path to a .toml file"
        )
    try:
        return Recipe.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"recipe {path} is invalid: {exc}") from exc
