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
