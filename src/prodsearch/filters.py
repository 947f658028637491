"""Payload filters in one backend-neutral form, executed by the engine."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from prodsearch.errors import ConfigError

Scalar = str | int | float | bool

# A payload key the engine can filter on: letters, digits, '_' and '-' (the engine's own set) or a
# quoted key ("brand name"); '.' between levels, '[]' or '[n]' into arrays.
_KEY_SEGMENT = r'(?:[\w-]+|"[^"]+")(?:\[\d*\])*'
_FILTER_KEY = re.compile(rf"{_KEY_SEGMENT}(?:\.{_KEY_SEGMENT})*")


class Range(BaseModel):
    """A numeric range; unset bounds are open."""

    model_config = ConfigDict(extra="forbid")

    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


class Condition(BaseModel):
    """One payload condition: equal to `value`, one of `any`, or within `range`.

    Only what the engine can run is accepted (it would otherwise fail mid-query): a payload key,
    equality with strings, integers or booleans (a non-integer number needs a range), and lists
    of strings or of integers, not both.
    """

    key: str
    value: Scalar | None = None
    any: list[Scalar] | None = None
    range: Range | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Condition:
        given = [x is not None for x in (self.value, self.any, self.range)]
        if sum(given) != 1:
            raise ValueError(f"condition on {self.key!r} needs exactly one of value, any, range")
        if not _FILTER_KEY.fullmatch(self.key):
            raise ValueError(
                f"invalid filter key {self.key!r}: a payload key (letters, digits, '_' and '-'; "
                "'.' between levels) or one in double quotes"
            )
        values = self.any if self.any is not None else [self.value]
        if any(isinstance(v, float) for v in values):
            raise ValueError(
                f"filter on {self.key!r}: equality with a number that is not an integer; use a "
                f'range, e.g. {{"{self.key}": {{"gte": 2.5, "lte": 2.5}}}}'
            )
        if self.any is not None and len({isinstance(v, str) for v in values}) > 1:
            raise ValueError(f"filter on {self.key!r}: a list of strings or of integers, not both")
        return self


class FilterSpec(BaseModel):
    """All `must` conditions hold and no `must_not` condition holds."""

    must: list[Condition] = []
    must_not: list[Condition] = []

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | None) -> FilterSpec | None:
        """Build a filter from a plain mapping, the form users write:

        `{"category": "Packages"}` equal, `{"brand": ["a", "b"]}` one of,
        `{"price": {"gte": 1, "lt": 5}}` range, `{"seller": {"not": "x"}}` (or a list) excluded.
        Returns None for an empty or missing mapping; raises ConfigError on a malformed one.
        """
        if not spec:
            return None
        must: list[Condition] = []
        must_not: list[Condition] = []
        try:
            for key, rule in spec.items():
                if isinstance(rule, Mapping) and set(rule) == {"not"}:
                    must_not.append(_condition(key, rule["not"]))
                else:
                    must.append(_condition(key, rule))
        except ValueError as exc:
            raise ConfigError(f"invalid filter {dict(spec)!r}: {exc}") from exc
        return cls(must=must, must_not=must_not)

    def keys(self) -> set[str]:
        """Return the payload keys this filter reads."""
        return {c.key for c in (*self.must, *self.must_not)}


def _condition(key: str, rule: Any) -> Condition:
    if isinstance(rule, Mapping):
        return Condition(key=key, range=Range.model_validate(dict(rule)))
    if isinstance(rule, list | tuple | set):
        return Condition(key=key, any=list(rule))
    return Condition(key=key, value=rule)


def parse_cli_filters(items: list[str]) -> FilterSpec | None:
    """Parse CLI `--filter key=value` / `key!=value` items (numbers stay numbers)."""
    spec: dict[str, Any] = {}
    for item in items:
        negate = "!=" in item
        key, sep, raw = item.partition("!=" if negate else "=")
        if not sep or not key:
            raise ConfigError(f"--filter {item!r}: expected key=value or key!=value")
        value: Scalar = _scalar(raw)
        spec[key] = {"not": value} if negate else value
    return FilterSpec.from_mapping(spec)


def _scalar(raw: str) -> Scalar:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw
