"""Filters: the forms users write become engine conditions (executed in test_store)."""

from __future__ import annotations

import pytest

from prodsearch.errors import ConfigError
from prodsearch.filters import FilterSpec, parse_cli_filters


def test_mapping_forms() -> None:
    spec = FilterSpec.from_mapping(
        {
            "category": "Packages",
            "brand": ["Arla", "Oatly"],
            "price": {"gte": 1, "lt": 5},
            "seller": {"not": "x"},
        }
    )
    assert spec is not None
    must = {c.key: c for c in spec.must}
    assert must["category"].value == "Packages"
    assert must["brand"].any == ["Arla", "Oatly"]
    assert must["price"].range.gte == 1 and must["price"].range.lt == 5
    assert spec.must_not[0].key == "seller" and spec.must_not[0].value == "x"
    assert FilterSpec.from_mapping({}) is None


def test_cli_forms_and_errors() -> None:
    spec = parse_cli_filters(["label_group=42", "kind!=store photo"])
    assert spec.must[0].value == 42 and spec.must_not[0].value == "store photo"
    with pytest.raises(ConfigError, match="key=value"):
        parse_cli_filters(["nonsense"])
    with pytest.raises(ConfigError, match="invalid filter"):
        FilterSpec.from_mapping({"price": {"between": 3}})


@pytest.mark.parametrize(
    ("items", "words"),
    [
        (["kind=2.5"], "use a range"),
        (["kind!=0.5"], "use a range"),
        (["brand name=Arla"], "invalid filter key 'brand name'"),
    ],
)
def test_cli_filters_the_engine_cannot_run_are_refused(items: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_cli_filters(items)


def test_library_filters_the_engine_cannot_run_are_refused() -> None:
    with pytest.raises(ConfigError, match="strings or of integers, not both"):
        FilterSpec.from_mapping({"kind": ["catalogue", 1]})
    with pytest.raises(ConfigError, match="use a range"):
        FilterSpec.from_mapping({"kind": [0.5]})
    spec = FilterSpec.from_mapping({'"brand name"': "Arla", "size.ml": 500, "on_sale": True})
    assert spec is not None and {c.key for c in spec.must} == {'"brand name"', "size.ml", "on_sale"}
