"""Settings: defaults, a TOML file and the environment, in that order of precedence."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prodsearch.settings import SETTINGS_FILE_ENV, Settings


def test_environment_overrides_file_overrides_defaults(tmp_path, monkeypatch) -> None:
    default = Settings()
    path = tmp_path / "s.toml"
    path.write_text(
        'fusion = "dbsf"\nk = 7\n[thresholds]\ntext = 0.9\nchars = 0.4\nimage = 0.7\nphash = 0.8\n'
    )
    monkeypatch.setenv(SETTINGS_FILE_ENV, str(path))
    from_file = Settings()
    assert (from_file.fusion, from_file.k, from_file.thresholds.text) == ("dbsf", 7, 0.9)
    monkeypatch.setenv("PRODSEARCH_K", "3")
    monkeypatch.setenv("PRODSEARCH_FORMULA__MIN_FUSED_SCORE", "0.5")
    from_env = Settings()
    assert from_env.k == 3 and from_env.formula.min_fused_score == 0.5
    assert Settings(k=12).k == 12
    assert default.fusion == "rrf"


def test_partial_nested_overrides_keep_the_other_defaults(monkeypatch) -> None:
    default = Settings()
    monkeypatch.setenv("PRODSEARCH_THRESHOLDS__TEXT", "0.91")
    monkeypatch.setenv("PRODSEARCH_FORMULA__WEIGHTS__PHASH", "2.5")
    changed = Settings()
    assert changed.thresholds.text == 0.91 and changed.thresholds.chars == default.thresholds.chars
    assert changed.formula.weights.phash == 2.5
    assert changed.formula.weights.chars == default.formula.weights.chars


def test_invalid_settings_are_rejected(monkeypatch) -> None:
    monkeypatch.setenv("PRODSEARCH_FUSION", "average")
    with pytest.raises(ValidationError):
        Settings()


def test_ingest_column_choices_from_a_file_and_the_environment(tmp_path, monkeypatch) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[ingest]\ntitle_column = "name"\ntext_columns = ["name", "brand"]\n')
    monkeypatch.setenv(SETTINGS_FILE_ENV, str(path))
    from_file = Settings().ingest
    assert (from_file.title_column, from_file.text_columns) == ("name", ["name", "brand"])
    assert from_file.id_column is None and from_file.delimiter is None
    monkeypatch.setenv("PRODSEARCH_INGEST__TEXT_COLUMNS", "name, colour")
    monkeypatch.setenv("PRODSEARCH_INGEST__DELIMITER", ";")
    from_env = Settings().ingest
    assert (from_env.text_columns, from_env.delimiter) == (["name", "colour"], ";")
    monkeypatch.setenv("PRODSEARCH_INGEST__TEXT_COLUMNS", '["a", "b"]')
    assert Settings().ingest.text_columns == ["a", "b"]
