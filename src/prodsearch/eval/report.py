"""The evaluation's results: one row per method, the tuned settings, and their files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from rich.table import Table

from prodsearch.eval.metrics import Scores
from prodsearch.matching.pair_model import PairModel


@dataclass
class MethodResult:
    """One method's configuration and scores."""

    method: str
    config: dict[str, Any]
    val: Scores
    test: Scores
    #: val F1 predicted by the tuning simulation (None where not simulated); it should equal
    #: val.f1
    simulated_val_f1: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "method": self.method,
            "config": self.config,
            "val": self.val.as_dict(),
            "test": self.test.as_dict(),
            "simulated_val_f1": self.simulated_val_f1,
        }


@dataclass
class EvalResult:
    """The evaluation table and the tuned settings."""

    methods: list[MethodResult]
    tuned: dict[str, Any]
    sizes: dict[str, int]
    seconds: float
    #: the pair model fitted on val (None without post-processing)
    pair_model: PairModel | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "sizes": self.sizes,
            "seconds": round(self.seconds, 1),
            "methods": [m.as_dict() for m in self.methods],
            "tuned_settings": self.tuned,
        }

    def write_settings(self, path: Path) -> None:
        """Write the tuned thresholds and fusion as a prodsearch settings TOML file, and the pair
        model beside it (`<name>.pair_model.json`, which the file points to)."""
        tuned = self.tuned
        if self.pair_model is not None:
            model_path = path.with_name(path.stem + ".pair_model.json")
            self.pair_model.save(model_path)
            pair = {**tuned["dedup"]["pair_model"], "model": str(model_path.resolve())}
            tuned = {**tuned, "dedup": {**tuned["dedup"], "pair_model": pair}}
        path.write_text(tomli_w.dumps(_without_none(tuned)), encoding="utf-8")


def _without_none(table: dict[str, Any]) -> dict[str, Any]:
    """`table` without its None values (TOML has none: an absent key reads as the default)."""
    return {
        key: _without_none(value) if isinstance(value, dict) else value
        for key, value in table.items()
        if value is not None
    }


def format_table(result: EvalResult) -> Table:
    """Return the results as a rich table."""
    table = Table(title=f"F1 on test (tuned on val); catalog sizes {result.sizes}")
    for column in ("method", "val F1", "test P", "test R", "test F1", "config"):
        table.add_column(column)
    for m in result.methods:
        table.add_row(
            m.method,
            f"{m.val.f1:.4f}",
            f"{m.test.precision:.4f}",
            f"{m.test.recall:.4f}",
            f"{m.test.f1:.4f}",
            ", ".join(f"{k}={v}" for k, v in m.config.items()),
        )
    return table
