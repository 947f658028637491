"""Ingest: idempotent, resumable after a kill, bad rows reported without losing what is stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prodsearch.catalog import catalog_from_table, read_catalog
from prodsearch.columns import map_catalog
from prodsearch.encoders import EncoderSet, TextEncoder
from prodsearch.errors import EncoderMismatchError, StoreLockedError
from prodsearch.index import Index
from prodsearch.ingest import check_images, ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import IngestSettings, Settings
from prodsearch.store import point_id

from .conftest import DATA, needs_data, needs_shopee, shopee_groups
from .generated import labelled_catalog

GENERIC = load_recipe("generic")


def _all_product_ids(index: Index) -> list[str]:
    ids, offset = [], None
    while True:
        page, offset = index.store.scroll(index.collection, offset, 500)
        ids += [p.payload["product_id"] for p in page]
        if offset is None:
            return ids


def test_reingest_is_idempotent_and_updates_changed_rows(tmp_path, encoders, catalog_csv) -> None:
    recipe = GENERIC
    with Index(str(tmp_path / "s"), "p", Settings(), encoders) as index:
        first = ingest_catalog(index, read_catalog(catalog_csv, recipe))
        n = first.upserted
        assert n == index.count() and first.unchanged == 0
        again = ingest_catalog(index, read_catalog(catalog_csv, recipe))
        assert (again.upserted, again.unchanged) == (0, n)
        frame = pd.read_csv(catalog_csv)
        frame.loc[0, "title"] = "A completely new title"
        frame.to_csv(catalog_csv, index=False)
        changed = ingest_catalog(index, read_catalog(catalog_csv, recipe))
        assert (changed.upserted, changed.unchanged) == (1, n - 1)
        assert index.get(frame.loc[0, "id"])["title"] == "A completely new title"
        assert sorted(_all_product_ids(index)) == sorted(frame["id"])


def test_bad_images_are_reported_and_nothing_stored_is_lost(tmp_path, encoders) -> None:
    for name, colour in (("a.jpg", "red"), ("b.jpg", "green")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / name)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "text.jpg").write_text("hello")
    good = tmp_path / "good.csv"
    good.write_text("id,title,image\np1,Red box,a.jpg\np2,Green box,b.jpg\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,title,image\np3,Broken,corrupt.jpg\np4,Text file,text.jpg\np5,Fine,b.jpg\n")
    report = tmp_path / "rejects.csv"
    with Index(str(tmp_path / "s"), "p", Settings(), encoders) as index:
        ingest_catalog(index, read_catalog(good, GENERIC))
        result = ingest_catalog(index, read_catalog(bad, GENERIC), report_path=report)
        assert result.upserted == 1 and result.skipped == 2
        assert sorted(_all_product_ids(index)) == ["p1", "p2", "p5"]
    rejected = pd.read_csv(report)
    assert rejected["row"].tolist() == [2, 3]
    assert rejected["product_id"].tolist() == ["p3", "p4"]
    assert all(rejected["field"] == "image")
    assert "corrupt" in rejected["reason"][0] and "not a recognised image" in rejected["reason"][1]


def test_images_gone_or_unreadable_when_ingest_reads_them_are_reported(tmp_path, encoders) -> None:
    """Images checked when the catalog was read but unreadable when the reader thread reads
    them (deleted meanwhile, replaced by a folder) are rejected with the reason; the rest goes
    on, pipelined or not."""
    for name in ("a.jpg", "gone.jpg", "folder.jpg"):
        Image.new("RGB", (64, 64), "red").save(tmp_path / name)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("id,title,image\np1,Red box,a.jpg\np2,Gone,gone.jpg\np3,Folder,folder.jpg\n")
    rows = read_catalog(catalog, GENERIC)
    assert not rows.rejections
    (tmp_path / "gone.jpg").unlink()
    (tmp_path / "folder.jpg").unlink()
    (tmp_path / "folder.jpg").mkdir()
    for pipelined in (True, False):
        with Index(str(tmp_path / f"s{pipelined}"), "p", Settings(), encoders) as index:
            result = ingest_catalog(index, rows, pipelined=pipelined)
            assert result.upserted == 1 and _all_product_ids(index) == ["p1"]
        reasons = {r.product_id: (r.row, r.field, r.reason) for r in result.rejections}
        assert reasons == {
            "p2": (3, "image", "cannot read image: No such file or directory"),
            "p3": (4, "image", "cannot read image: Is a directory"),
        }


def test_an_error_in_the_reader_thread_stops_the_ingest_with_it(
    tmp_path, encoders, catalog_csv
) -> None:
    """The reader thread checks each batch against the store: when that fails (here the store
    is held by another writer) the ingest raises the reader's own error, the thread is gone,
    and nothing was written; once the writer lets go the same ingest completes."""
    store = str(tmp_path / "s")
    rows = read_catalog(catalog_csv, GENERIC)
    holder = Index(store, "p", Settings(), encoders)
    holder.ensure_collection()  # creates the collection and keeps its shard open
    try:
        with Index(store, "p", Settings(), encoders) as index:
            with pytest.raises(StoreLockedError, match="is open in another process") as raised:
                ingest_catalog(index, rows, batch_size=16)
            frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
            assert "_read_batch" in frames, "raised by the reader thread, re-raised here"
            assert not any(t.name == "prodsearch-ingest-reader" for t in threading.enumerate())
        assert holder.count() == 0
    finally:
        holder.close()
    with Index(store, "p", Settings(), encoders) as index:
        assert ingest_catalog(index, rows, batch_size=16).upserted == len(rows.rows)


def test_ingest_into_a_collection_of_other_encoders_is_refused(
    tmp_path, encoders, catalog_csv
) -> None:
    store = str(tmp_path / "s")
    other = EncoderSet({**encoders.encoders, "text": TextEncoder(max_tokens=32)})
    with Index(store, "p", Settings(), other) as written:
        written.ensure_collection()
    with (
        Index(store, "p", Settings(), encoders) as index,
        pytest.raises(EncoderMismatchError, match="'max_tokens': 32"),
    ):
        ingest_catalog(index, read_catalog(catalog_csv, GENERIC))
    with Index(store, "p", Settings(), other) as written:
        assert written.count() == 0


def _stored(index: Index) -> dict[str, tuple[dict, dict]]:
    """Every stored point: product id -> (payload, vectors)."""
    out, offset = {}, None
    while True:
        page, offset = index.store.scroll(index.collection, offset, 500, True)
        out.update({p.payload["product_id"]: (p.payload, p.vectors) for p in page})
        if offset is None:
            return out


@needs_shopee
@needs_data(DATA / "grocery_store" / "images.csv")
def test_pipelined_ingest_stores_what_a_sequential_one_stores(tmp_path, encoders) -> None:
    photos = pd.read_csv(DATA / "grocery_store" / "images.csv").iloc[::250]
    shopee = shopee_groups(8)
    catalog = tmp_path / "mixed.csv"
    pd.concat(
        [
            pd.DataFrame({"id": "gs-" + photos["id"].astype(str), "image": photos["image"]}),
            pd.DataFrame(
                {
                    "id": shopee["posting_id"],
                    "title": shopee["title"],
                    "image_phash": shopee["image_phash"],
                }
            ),
            pd.DataFrame({"id": ["gone"], "title": ["No photo"], "image": ["images/gone.jpg"]}),
        ]
    ).sample(frac=1, random_state=0).to_csv(catalog, index=False)
    rows = read_catalog(catalog, GENERIC, images_dir=DATA / "grocery_store")
    stored, reports = [], []
    for pipelined in (False, True):
        with Index(str(tmp_path / f"s{pipelined}"), "p", Settings(), encoders) as index:
            reports.append(ingest_catalog(index, rows, batch_size=8, pipelined=pipelined))
            stored.append(_stored(index))
    sequential, pipelined = stored
    assert reports[0].upserted == reports[1].upserted == len(sequential) > 30
    assert reports[0].rejections == reports[1].rejections and reports[0].skipped == 1
    assert sequential.keys() == pipelined.keys()
    assert sum("image" in vectors for _, vectors in sequential.values()) == len(photos)
    for product_id, (payload, vectors) in sequential.items():
        assert pipelined[product_id][0] == payload
        assert vectors.keys() == pipelined[product_id][1].keys()
        for name, vector in vectors.items():
            other = pipelined[product_id][1][name]
            if hasattr(vector, "indices"):
                np.testing.assert_array_equal(vector.indices, other.indices)
                vector, other = vector.values, other.values
            np.testing.assert_allclose(other, vector, atol=1e-5, err_msg=name)


def cli_process(*args: str, env: dict[str, str], own_group: bool = False) -> subprocess.Popen:
    """The CLI as a child process with piped output (`own_group`: in a session of its own, so
    that the processes it starts, such as a local Ray's, are in its process group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "prodsearch.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=own_group,
    )


@pytest.mark.slow
def test_resume_after_a_killed_ingest(tmp_path) -> None:
    """A real ingest process killed with SIGKILL mid-run, then re-run: every product once."""
    catalog = tmp_path / "catalog.csv"
    frame = labelled_catalog(130)
    frame.to_csv(catalog, index=False)
    store = tmp_path / "store"
    env = {**os.environ, "PRODSEARCH_BATCH_SIZE": "32"}
    args = ("ingest", str(catalog), "--recipe", "generic", "--store", str(store), "--json")
    process = cli_process(*args, env=env)
    deadline = time.monotonic() + 240
    for line in process.stderr:  # type: ignore[union-attr]
        if line.startswith("ingest: ") and int(line.split()[1].split("/")[0]) >= 96:
            break
        assert time.monotonic() < deadline, "ingest made no progress"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    rerun = cli_process(*args, env=env)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    summary = json.loads(out)
    assert summary["unchanged"] >= 96, (
        "the re-run resumed: products stored before the kill were kept"
    )
    assert summary["upserted"] + summary["unchanged"] == len(frame)
    assert summary["products_in_collection"] == len(frame)
    with Index(str(store), "products") as index:
        ids = _all_product_ids(index)
        assert len(ids) == len(set(ids)) == len(frame)
        assert set(ids) == set(frame["id"])
        stored = index.store.retrieve("products", [point_id(p) for p in frame["id"][:50]], True)
        assert all({"text", "chars", "phash"} <= set(p.vectors) for p in stored)


def _ingest_guessed(path, store, encoders) -> dict[str, tuple[dict, dict]]:
    """Ingest `path` as `prodsearch ingest` does without a recipe; return what was stored."""
    mapped = map_catalog(path, IngestSettings())
    with Index(str(store), "p", Settings(), encoders) as index:
        ingest_catalog(index, catalog_from_table(mapped.table, mapped.recipe))
        return _stored(index)


def test_a_cp1252_export_ingests_with_its_accents(tmp_path, encoders) -> None:
    export = tmp_path / "export.csv"
    export.write_bytes(
        "id;name;description;price;Dataset\n"
        "1;Crème brûlée 4×100 g;Dessert, chilled;2,50;shop-a\n"
        "2;Café “Noir” – 500 g;Coffee;4,99;shop-b\n".encode("cp1252")
    )
    stored = _ingest_guessed(export, tmp_path / "s", encoders)
    assert stored["1"][0]["title"] == "Crème brûlée 4×100 g"
    assert stored["2"][0]["title"] == "Café “Noir” – 500 g"
    assert stored["1"][0]["description"] == "Dessert, chilled"


def test_csv_parquet_and_json_lines_give_the_same_collection(tmp_path, encoders) -> None:
    export = tmp_path / "export.csv"
    export.write_text(
        "id;name;description;price;Dataset\n"
        "a-1;Oatly Oat Drink 1 L;Oat drink, chilled;2.49;shop-a\n"
        "a-2;Alpro Soya Drink Original 1L;Soy drink;3;shop-a\n"
        "b-1;OATLY oat drink 1l;Havredryck;2.45;shop-b\n"
        "b-2;;no title;1;shop-b\n",
        encoding="utf-8",
    )
    typed = pd.read_csv(export, sep=";")  # the same export saved by pandas, as a user converts it
    typed.to_parquet(tmp_path / "export.parquet")
    typed.to_json(tmp_path / "export.jsonl", orient="records", lines=True, force_ascii=False)
    stored = {
        name: _ingest_guessed(tmp_path / name, tmp_path / name.replace(".", "-"), encoders)
        for name in ("export.csv", "export.parquet", "export.jsonl")
    }
    from_csv = stored["export.csv"]
    assert sorted(from_csv) == ["a-1", "a-2", "b-1"]
    assert from_csv["a-2"][0]["price"] == 3 and from_csv["a-1"][0]["price"] == 2.49
    for name, points in stored.items():
        assert points.keys() == from_csv.keys(), name
        for product_id, (payload, vectors) in points.items():
            assert payload == from_csv[product_id][0], (name, product_id)  # content hash too
            for vector_name, vector in vectors.items():
                other = from_csv[product_id][1][vector_name]
                if hasattr(vector, "indices"):
                    np.testing.assert_array_equal(vector.indices, other.indices)
                    vector, other = vector.values, other.values
                np.testing.assert_allclose(vector, other, atol=1e-6, err_msg=vector_name)


def test_check_images_reports_what_ingest_would_and_writes_nothing(tmp_path) -> None:
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    catalog = tmp_path / "c.csv"
    catalog.write_text("id,title,image\np1,Red,ok.jpg\np2,Broken,corrupt.jpg\n,No id,\n")
    checked = check_images(read_catalog(catalog, GENERIC), max_pixels=1_000_000)
    assert [r.product_id for r in checked.rows] == ["p1"]
    assert [(r.row, r.field) for r in checked.rejections] == [(4, "id"), (3, "image")]
    assert "corrupt" in checked.rejections[1].reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "corrupt.jpg", "ok.jpg"]
