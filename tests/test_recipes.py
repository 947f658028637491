"""Recipes: built-ins by name, custom ones by path, clear errors otherwise."""

from __future__ import annotations

import pytest

from prodsearch.errors import ConfigError
from prodsearch.recipes import Recipe, builtin_recipes, load_recipe


def test_builtins_and_custom_files(tmp_path) -> None:
    assert {"generic", "shopee", "shopee-images"} <= set(builtin_recipes())
    assert load_recipe("shopee").id == "posting_id"
    custom = tmp_path / "mine.toml"
    custom.write_text('id = "sku"\ntitle = "name"\nimage = "photo"\ndelimiter = ";"\n')
    recipe = load_recipe(str(custom))
    assert (recipe.id, recipe.title, recipe.image, recipe.delimiter) == (
        "sku",
        "name",
        "photo",
        ";",
    )
    assert recipe.mapped_columns() == {"sku", "name", "photo"}


def test_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="built-in recipes"):
        load_recipe("nope")
    broken = tmp_path / "b.toml"
    broken.write_text("title = 3\n")
    with pytest.raises(ConfigError, match="invalid"):
        load_recipe(str(broken))


def test_a_recipe_written_as_toml_reads_back_the_same(tmp_path) -> None:
    written = Recipe(
        description="mine",
        id="sku",
        title=None,
        image="Image Src",
        text_columns=["name", "brand"],
        delimiter=";",
        encoding="cp1252",
    )
    path = tmp_path / "mine.toml"
    path.write_text(written.to_toml(), encoding="utf-8")
    assert load_recipe(str(path)) == written
    assert 'title = ""' in written.to_toml()  # no title column, said so: the default is "title"
    assert load_recipe("generic").to_toml().count("\n") == 7
