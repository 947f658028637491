"""`prodsearch calibrate`: labels in, the catalog's calibration merged into the settings file,
which `Settings()` reads and `dedup` applies (and refuses on another pair model); bad labels
refused naming the row, the settings file left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prodsearch.errors import ConfigError
from prodsearch.index import Index
from prodsearch.matching.calibrate import calibrated
from prodsearch.matching.dedup import run_dedup
from prodsearch.matching.pair_model import SHIPPED_PAIR_MODEL, PairModel
from prodsearch.settings import SETTINGS_FILE_ENV, Settings

from .conftest import REPO
from .reviewed import ingest_phash_catalog
from .test_cli import run


def write_labels(path: Path, frame) -> None:
    """Same: each product's first two listings; different: neighbouring products, whose photos
    look alike (so both kinds are among the candidate pairs)."""
    first = frame.groupby("group")["id"].apply(list)
    lines = ["id_a,id_b,same"]
    for group, ids in first.items():
        lines.append(f"{ids[0]},{ids[1]},1")
        if group % 2:
            lines.append(f"{ids[0]},{first[group - 1][0]},0")
    path.write_text("\n".join(lines) + "\n")


def test_calibrate_writes_settings_that_dedup_applies(tmp_path, encoders, monkeypatch) -> None:
    store = str(tmp_path / "store")
    with Index(store, "products", Settings(store=store), encoders) as index:
        frame = ingest_phash_catalog(index, tmp_path)
    write_labels(tmp_path / "labels.csv", frame)
    settings_file = tmp_path / "prodsearch.toml"
    settings_file.write_text("[thresholds]\ntext = 0.55\n\n[dedup]\nmax_cluster_size = 20\n")
    calibrate = ["calibrate", "--labels", str(tmp_path / "labels.csv"), "--store", store]
    done = run(*calibrate, "--write-settings", str(settings_file), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["labels_read"] == 45 and 30 < summary["labels"] <= 45
    assert summary["predicted"]["matched_pairs"] > 0

    monkeypatch.setenv(SETTINGS_FILE_ENV, str(settings_file))
    settings = Settings(store=store)
    pair = settings.dedup.pair_model
    assert settings.thresholds.text == 0.55 and settings.dedup.max_cluster_size == 20
    assert pair.calibration is not None and pair.calibration.labels == summary["labels"]
    assert pair.calibration.positives == summary["positives"] and pair.calibration.fitted_at
    assert pair.min_probability == summary["min_probability"]
    assert "labels = " in settings_file.read_text() and "fitted_at" in settings_file.read_text()

    with Index(store, "products", settings, encoders) as index:
        applied = run_dedup(index)
        plain = Settings(store=store).dedup.model_copy(
            update={"pair_model": pair.model_copy(update={"calibration": None})}
        )
        raw = run_dedup(index, plain, keep_scored=True)
    # 45 labels of both kinds: the catalog's own feature weights were fitted and written
    assert pair.calibration.weights and pair.calibration.regularisation > 0
    assert set(pair.calibration.weights) == set(pair.calibration.centers)
    assert summary["weighted_features"] == len(pair.calibration.weights)
    recomputed = np.zeros(len(raw.table))
    recomputed[raw.scored.rows] = calibrated(raw.scored, pair.calibration)
    # the engine may list tied candidates in another order: compare pair by pair
    frame = raw.table.frame.assign(expected=recomputed)
    both = applied.table.frame.merge(frame, on=["a", "b"], suffixes=("", "_raw"))
    assert len(both) == len(applied.table)
    expected = both["expected"].to_numpy()
    # candidates tied at a product's MODEL_CANDIDATES cut may come in another order, moving
    # neighbourhood features of a few pairs a little: nearly every pair and every decision agree
    close = np.isclose(both["probability"], expected)
    assert close.mean() > 0.97
    min_probability = pair.min_probability
    assert np.array_equal(both["probability"] >= min_probability, expected >= min_probability)
    probability = applied.table.column("probability")
    decided = applied.table.frame["rule"] == "pair model"
    assert decided.sum() > 0
    assert np.array_equal(decided.to_numpy(), probability >= pair.min_probability)

    # the calibration names the model it was fitted on; another model (an upgrade's) refuses it
    # with what to do, and calibrating again still runs and records the new model
    assert pair.calibration.model_digest == PairModel.file_digest()
    other = tmp_path / "other_model.json"
    other.write_text(SHIPPED_PAIR_MODEL.read_text() + "\n")
    text = settings_file.read_text().replace(
        "[dedup.pair_model]", f"[dedup.pair_model]\nmodel = '{other}'"
    )
    settings_file.write_text(text)
    stale = Settings(store=store)
    with (
        Index(store, "products", stale, encoders) as index,
        pytest.raises(ConfigError, match="prodsearch calibrate"),
    ):
        run_dedup(index)
    again = run(*calibrate, "--write-settings", str(settings_file))
    assert again.returncode == 0, again.stderr
    recalibrated = Settings(store=store).dedup.pair_model
    assert recalibrated.model == other
    assert recalibrated.calibration.model_digest == PairModel.file_digest(other)


def test_bad_labels_are_refused_naming_the_row(tmp_path, encoders) -> None:
    store = str(tmp_path / "store")
    with Index(store, "products", Settings(store=store), encoders) as index:
        ingest_phash_catalog(index, tmp_path, n_groups=6)
    settings_file = tmp_path / "prodsearch.toml"
    settings_file.write_text("[thresholds]\ntext = 0.55\n")
    (tmp_path / "labels.csv").write_text("id_a,id_b,same\ng0-0,g0-1,1\ng0-0,g9-9,0\ng1-0,g1-0,1\n")
    refused = run(
        "calibrate",
        "--labels",
        str(tmp_path / "labels.csv"),
        "--store",
        store,
        "--write-settings",
        str(settings_file),
    )
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert "row 3: unknown product id(s) ['g9-9']" in message
    assert "row 4: product 'g1-0' is paired with itself" in message
    assert settings_file.read_text() == "[thresholds]\ntext = 0.55\n"


def test_the_readme_review_commands_take_the_options_it_shows() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("<!-- review:start -->") : text.index("<!-- review:end -->")]
    block = section[section.index("```bash") : section.index("```", section.index("```bash") + 3)]
    commands = [line.split("#")[0].split() for line in block.splitlines()[1:] if line.strip()]
    assert [c[1] for c in commands] == ["ingest", "review", "calibrate"]
    for words in commands:
        shown = run(words[1], "--help", env={"COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        for flag in (w for w in words if w.startswith("--")):
            assert flag in shown.stdout, f"`prodsearch {words[1]}` has no {flag}"
