"""Catalog recipes: which CSV columns hold the product id, title, image and perceptual hash.

Built-in recipes are the TOML files in the repository's `ingest/recipes/` (shipped inside the
wheel as `prodsearch/recipes/`); `--recipe` also accepts a path to a TOML file of the same shape.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ValidationError

from prodsearch.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent
# A wheel carries the recipes inside the package; a source checkout keeps them in ingest/recipes.
_RECIPE_DIRS = (_PACKAGE_DIR / "recipes", _PACKAGE_DIR.parents[1] / "ingest" / "recipes")


class Recipe(BaseModel):
    """Column mapping of one catalog format. Columns not named here become payload."""

    description: str = ""
    id: str
    title: str | None = "title"
    image: str | None = None
    phash: str | None = None
    delimiter: str = ","

    def mapped_columns(self) -> set[str]:
        """Return the CSV columns this recipe consumes (the rest is payload)."""
        return {c for c in (self.id, self.title, self.image, self.phash) if c}


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
