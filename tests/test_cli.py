"""The command line, run as a user runs it: real subprocesses, exit codes, JSON on stdout."""

from __future__ import annotations

import csv
import json
import os
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
    # the shipped pair model reads text, chars and phash; photos add an image vector, so the
    # fusion decides (and says why); asked for explicitly, the pair model refuses
    assert summary["decided_by"] == "fusion" and "fitted on modalities" in result.stderr
    forced = run("dedup", "--store", store, "--out", str(out), "--decider", "pair-model")
    assert forced.returncode == 1 and "fitted on modalities" in forced.stderr
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
    # blending replaced the dense vectors (text, image) the dedup scores come from; the chars
    # and phash vectors it searched with are the stored ones, whose scores explain shows
    row = next(r for r in rows if r["chars"] or r["phash"])
    command = ("explain", row["id"], row["match"], "--store", store, "--json")
    explained = json.loads(run(*command).stdout)
    recorded = json.loads(run(*command, "--pairs", str(audit)).stdout)["dedup"]
    assert recorded["probability"] is None  # the fusion decided
    assert set(recorded["matched_by"]) <= set(recorded["scores"])
    unblended = {"chars", "phash"} & set(recorded["scores"])
    assert unblended
    for modality in unblended:
        assert explained["scores"][modality] == pytest.approx(
            recorded["scores"][modality], abs=1e-3
        )
    stranger = next(p for p, _ in pairs if p != pid and p not in others)
    unmatched = run("explain", pid, stranger, "--store", store, "--pairs", str(audit), "--json")
    assert json.loads(unmatched.stdout)["dedup"] is None
    not_audit = run("explain", pid, stranger, "--store", store, "--pairs", str(out))
    assert not_audit.returncode == 1 and "not a dedup audit trail" in not_audit.stderr
    missing = run("explain", pid, "no-such-id", "--store", store)
    assert missing.returncode == 1 and "not in collection" in missing.stderr
