"""The command line, run as a user runs it: real subprocesses, exit codes, JSON on stdout."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, SAMPLE


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prodsearch.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


def test_help_does_not_load_models() -> None:
    code = (
        "import sys, prodsearch.cli, prodsearch; prodsearch.Index; "
        "print('torch' in sys.modules, 'qdrant_edge' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]
    assert "ingest" in run("--help").stdout


def test_ingest_match_info_on_the_sample_catalog(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ingested = run("ingest", str(SAMPLE / "catalog.csv"), "--store", store, "--json")
    assert ingested.returncode == 0, ingested.stderr
    summary = json.loads(ingested.stdout)
    assert summary["upserted"] == 62 and summary["skipped"] == 0
    assert summary["products_in_collection"] == 62
    matched = run("match", "--store", store, "--title", "tropicanna aple juice", "--json")
    assert matched.returncode == 0, matched.stderr
    document = json.loads(matched.stdout)
    assert document["matches"][0]["payload"]["product"] == "Tropicana-Apple-Juice"
    assert "text" in document["matches"][0]["matched_by"]
    photo = str(SAMPLE / "queries" / "Arla-Standard-Milk.jpg")
    by_image = run(
        "match",
        "--store",
        store,
        "--image",
        photo,
        "--threshold",
        "image=0.5",
        "--filter",
        "kind=store photo",
        "--json",
    )
    matches = json.loads(by_image.stdout)["matches"]
    assert matches and all(m["payload"]["kind"] == "store photo" for m in matches)
    info = json.loads(run("info", "--store", store, "--json").stdout)
    assert info["products"] == 62 and set(info["encoders"]) == {"text", "chars", "image", "phash"}


def test_exit_codes_and_error_messages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,title\n,no id\nx,\n")
    result = run("ingest", str(bad), "--store", str(tmp_path / "s"))
    assert result.returncode == 1
    assert "no product could be ingested" in result.stderr
    rejects = (tmp_path / "bad.rejects.csv").read_text()
    assert "2,,id,missing product id" in rejects and "3,x,title,empty title and no image" in rejects

    partly = tmp_path / "partly.csv"
    partly.write_text("id,title\na,Kopi susu 1L\na,Duplicate\n")
    result = run("ingest", str(partly), "--store", str(tmp_path / "s"), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["skipped"] == 1

    missing = run("match", "--store", str(tmp_path / "empty"), "--title", "x")
    assert (
        missing.returncode == 1
        and "not found" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    no_input = run("match", "--store", str(tmp_path / "s"))
    assert no_input.returncode == 1 and "needs a title" in no_input.stderr
    unknown = run("ingest", str(partly), "--recipe", "nope", "--store", str(tmp_path / "s"))
    assert unknown.returncode == 1 and "built-in recipes" in unknown.stderr


def test_recipes_are_listed() -> None:
    out = run("recipes").stdout
    assert "shopee" in out and "generic" in out


@pytest.mark.slow
def test_readme_demo_command_runs(tmp_path: Path) -> None:
    """The README's first command, as a user runs it (set-up is already done by then)."""
    result = subprocess.run(
        ["scripts/demo.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PRODSEARCH_STORE": str(tmp_path / "demo-store")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Tropicana Apple Juice" in result.stdout
    assert '"matches"' in result.stdout


def test_dedup_and_explain_commands(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    out = tmp_path / "matches.csv"
    result = run(
        "dedup",
        str(SAMPLE / "catalog.csv"),
        "--store",
        store,
        "--out",
        str(out),
        "--same",
        "brand",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["products"] == 62 and "candidates" in summary["seconds"]
    # the pair model decides any catalog, photos and photo-only listings included
    assert summary["decided_by"] == "pair model"
    fusion = run("dedup", "--store", store, "--out", str(tmp_path / "f.csv"), "--decider", "fusion")
    assert fusion.returncode == 0 and "fusion" in fusion.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "id,matches,cluster,min2" and len(lines) == 63
    assert not (tmp_path / "matches.csv.checkpoint.jsonl").exists()
    pairs = [line.split(",")[:2] for line in lines[1:]]
    pid, others = next((p, m.split(" ")[1:]) for p, m in pairs if len(m.split(" ")) > 1)
    explained = json.loads(run("explain", pid, others[0], "--store", store, "--json").stdout)
    assert explained["product_a"] == pid and explained["scores"]
    # the audit trail: a row per match, which explain --pairs reads back for the pair
    audit = tmp_path / "matches.pairs.csv"
    assert summary["pairs"] == str(audit)
    rows = list(csv.DictReader(audit.open()))
    assert len(rows) == sum(len(m.split(" ")) - 1 for _, m in pairs)
    # the scores the run recorded are the engine's, as explain shows them for the pair
    row = next(r for r in rows if r["chars"] or r["phash"])
    command = ("explain", row["id"], row["match"], "--store", store, "--json")
    explained = json.loads(run(*command).stdout)
    recorded = json.loads(run(*command, "--pairs", str(audit)).stdout)["dedup"]
    assert 0 < recorded["probability"] <= 1 and recorded["rule"] in {"pair model", "min-2"}
    assert set(recorded["matched_by"]) <= set(recorded["scores"])
    for modality, score in recorded["scores"].items():
        assert explained["scores"][modality] == pytest.approx(score, abs=1e-3)
    stranger = next(p for p, _ in pairs if p != pid and p not in others)
    unmatched = run("explain", pid, stranger, "--store", store, "--pairs", str(audit), "--json")
    assert json.loads(unmatched.stdout)["dedup"] is None
    not_audit = run("explain", pid, stranger, "--store", store, "--pairs", str(out))
    assert not_audit.returncode == 1 and "not a dedup audit trail" in not_audit.stderr
    missing = run("explain", pid, "no-such-id", "--store", store)
    assert missing.returncode == 1 and "not in collection" in missing.stderr


def _clean_env() -> dict[str, str]:
    """The environment without PRODSEARCH_* settings: commands run on their defaults in cwd."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PRODSEARCH_")}


def _in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prodsearch.cli", *args],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=folder,
        timeout=600,
    )


EXPORT = (
    "id;name;description;price;Dataset\n"
    "1;Oatly Oat Drink 1 L;Oat drink, chilled;2.49;shop-a\n"
    "2;OATLY oat drink 1l;Havredryck;2.45;shop-b\n"
    "3;;no name;1.00;shop-b\n"
)


def test_dry_run_prints_mapping_counts_and_bad_rows_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "export.csv").write_text(EXPORT, encoding="utf-8")
    result = _in(tmp_path, "ingest", "export.csv", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "delimiter ';' (detected)" in result.stderr
    assert "title <- name (guessed)" in result.stderr
    assert "row 4 (name): empty title and no image" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.csv"]
    document = json.loads(_in(tmp_path, "ingest", "export.csv", "--dry-run", "--json").stdout)
    assert (document["rows_read"], document["valid"], document["skipped"]) == (3, 2, 1)
    assert document["columns"]["title"] == "name" and document["columns"]["delimiter"] == ";"
    assert document["rejections"] == [
        {"row": 4, "product_id": "3", "field": "name", "reason": "empty title and no image"}
    ]
    (tmp_path / "bad.csv").write_text("sku,name\n,x\n")
    none_valid = _in(tmp_path, "ingest", "bad.csv", "--dry-run")
    assert none_valid.returncode == 1 and "no product could be ingested" in none_valid.stderr
    assert (
        not (tmp_path / "prodsearch-data").exists() and not (tmp_path / "bad.rejects.csv").exists()
    )


def test_ambiguous_and_unguessable_headers_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "two.csv").write_text("id,name,title\n1,a,b\n")
    refused = _in(tmp_path, "ingest", "two.csv")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "'name' and 'title'" in refused.stderr and "--title-column" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.csv"]
    settled = _in(tmp_path, "ingest", "two.csv", "--text-columns", "name,title", "--dry-run")
    assert settled.returncode == 0 and "title <- name + title (given)" in settled.stderr
    (tmp_path / "codes.csv").write_text("code,label\n1,a\n")
    no_id = _in(tmp_path, "ingest", "codes.csv", "--dry-run")
    assert no_id.returncode == 1 and "no id column" in no_id.stderr
    named = _in(
        tmp_path,
        "ingest",
        "codes.csv",
        "--id-column",
        "code",
        "--title-column",
        "label",
        "--dry-run",
    )
    assert named.returncode == 0 and "id    <- code (given)" in named.stderr
    typo = _in(tmp_path, "ingest", "codes.csv", "--id-column", "Code", "--dry-run")
    assert typo.returncode == 1 and "did you mean 'code'?" in typo.stderr


def test_settings_file_columns_and_recipes_from(tmp_path: Path) -> None:
    (tmp_path / "two.csv").write_text("id|name|title|price\n1|Oat drink|x|2\n")
    (tmp_path / "prodsearch.toml").write_text('[ingest]\ntitle_column = "name"\n')
    from_settings = _in(tmp_path, "ingest", "two.csv", "--dry-run")
    assert from_settings.returncode == 1  # `title` is then payload: a reserved key
    assert "clash" in from_settings.stderr and "--text-columns" in from_settings.stderr
    written = _in(tmp_path, "recipes", "--from", "two.csv", "--text-columns", "name,title")
    assert written.returncode == 0, written.stderr
    assert 'title = "name"' in written.stdout and 'delimiter = "|"' in written.stdout
    saved = _in(
        tmp_path, "recipes", "--from", "two.csv", "--title-column", "title", "--out", "t.toml"
    )
    assert saved.returncode == 0 and "recipe written to t.toml" in saved.stderr
    (tmp_path / "prodsearch.toml").unlink()
    reread = _in(tmp_path, "ingest", "two.csv", "--recipe", "t.toml", "--dry-run")
    assert reread.returncode == 0, reread.stderr
    assert "title <- title (recipe)" in reread.stderr and "delimiter '|';" in reread.stderr
    misuse = _in(tmp_path, "recipes", "--title-column", "name")
    assert misuse.returncode == 1 and "only with --from" in misuse.stderr
    assert "(no --recipe)" in _in(tmp_path, "recipes").stdout


def _readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- own-catalog:start -->", "<!-- own-catalog:end -->"
    assert start in text and end in text, "README.md lost its own-catalog markers"
    return text[text.index(start) : text.index(end)]


def _fenced(section: str, language: str) -> list[str]:
    """The contents of the section's ```language blocks, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)


def test_readme_own_catalog_commands_run(tmp_path: Path) -> None:
    """The README's "Your own catalog": its export saved as export.csv, its commands run in
    order as a user types them, its printed mapping and guessing table as the code has them."""
    from prodsearch.columns import GUESSES

    section = _readme_section()
    (export,) = _fenced(section, "csv")
    (commands,) = _fenced(section, "bash")
    (printed,) = _fenced(section, "text")
    (settings,) = _fenced(section, "toml")
    (tmp_path / "export.csv").write_text(export, encoding="utf-8")
    outputs = []
    for line in commands.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "prodsearch", line
        result = _in(tmp_path, *words[1:])
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
        outputs.append(result)
    dry_run = outputs[0].stderr.splitlines()
    assert all(line in dry_run for line in printed.splitlines())
    assert "oatly" in outputs[2].stdout.lower()
    matches = {
        row["id"]: row["matches"].split()
        for row in csv.DictReader((tmp_path / "matches.csv").open())
    }
    assert len(matches) == len(export.splitlines()) - 1 and "b-201" in matches["a-101"]
    assert re.search(r"unchanged\W+12\b", outputs[-1].stderr), outputs[-1].stderr
    for role, names in GUESSES.items():  # the README's table lists the guesses the code makes
        (row,) = [line for line in section.splitlines() if line.startswith(f"| {role} |")]
        assert row.split("|")[2].strip().split(", ") == list(names), role
    (tmp_path / "prodsearch.toml").write_text(settings, encoding="utf-8")
    from_settings = _in(tmp_path, "ingest", "export.csv", "--dry-run")
    assert "title <- name (given)" in from_settings.stderr
