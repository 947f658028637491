"""Candidate generation: the batched engine pass, its relative filters, and resuming it from a
checkpoint that covers every input that changes its result."""

from __future__ import annotations

import pandas as pd

from prodsearch.catalog import read_catalog
from prodsearch.index import Index, Product
from prodsearch.ingest import ingest_catalog
from prodsearch.matching.candidates import RelativeFilters, collect_candidates, neighbourhood
from prodsearch.matching.dedup import default_search
from prodsearch.matching.table import PairTable
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings

from .conftest import reconfigured


def pair_set(table: PairTable) -> set[tuple[str, str, float]]:
    return {
        (table.ids[a], table.ids[b], round(f, 4))
        for a, b, f in zip(table.a, table.b, table.fused, strict=True)
    }


def test_candidates_resume_from_a_cut_checkpoint(catalog_index, tmp_path) -> None:
    products = list(catalog_index.scroll())
    search = default_search(catalog_index)
    checkpoint = tmp_path / "candidates.checkpoint.jsonl"
    full = collect_candidates(catalog_index, products, search, checkpoint=checkpoint)
    lines = checkpoint.read_text().splitlines(keepends=True)
    assert len(lines) == len(products) + 1 and len(full) > len(products)
    # a kill mid-write: half the records kept, the next one cut in the middle
    checkpoint.write_text("".join([*lines[: len(lines) // 2], lines[len(lines) // 2][:20]]))
    calls: list[int] = []
    resumed = collect_candidates(
        catalog_index, products, search, progress=calls.append, checkpoint=checkpoint
    )
    assert calls[0] == len(lines) // 2 - 1, "the finished products were not redone"
    assert pair_set(resumed) == pair_set(full)
    # a second kill, in the last record: everything written since the first kill is kept
    lines = checkpoint.read_text().splitlines(keepends=True)
    assert len(lines) == len(products) + 1, "the cut line was cut off before appending"
    checkpoint.write_text("".join([*lines[:-1], lines[-1][:10]]))
    calls = []
    again = collect_candidates(
        catalog_index, products, search, progress=calls.append, checkpoint=checkpoint
    )
    assert calls[0] == len(products) - 1 and pair_set(again) == pair_set(full)


def test_a_checkpoint_of_other_inputs_is_not_reused(catalog_index, tmp_path) -> None:
    """Every input that changes the candidates (a filter, a search setting, the collection's
    content) starts the pass over."""
    products = list(catalog_index.scroll())
    search = default_search(catalog_index)
    checkpoint = tmp_path / "candidates.checkpoint.jsonl"
    within = RelativeFilters(within=(("price", 0.2),))
    collect_candidates(catalog_index, products, search, within, checkpoint=checkpoint)

    def reused(index: Index, filters: RelativeFilters, found: list, with_search=search) -> bool:
        """Whether a pass with these inputs read the checkpoint back (its header unchanged)."""
        header = checkpoint.read_text().splitlines()[0]
        collect_candidates(index, found, with_search, filters, checkpoint=checkpoint)
        return checkpoint.read_text().splitlines()[0] == header

    assert reused(catalog_index, within, products), "same inputs: reused"
    wider = RelativeFilters(within=(("price", 5.0),))
    assert not reused(catalog_index, wider, products), "another --within: started over"
    fresh = collect_candidates(catalog_index, products, search, wider)
    reread = collect_candidates(catalog_index, products, search, wider, checkpoint=checkpoint)
    assert (
        pair_set(reread)
        == pair_set(fresh)
        != pair_set(collect_candidates(catalog_index, products, search, within))
    )
    floors = search.formula.floors.model_copy(update={"text": search.formula.floors.text + 0.1})
    stricter = search.model_copy(
        update={"formula": search.formula.model_copy(update={"floors": floors})}
    )
    assert not reused(catalog_index, wider, products, stricter), "another floor: started over"
    assert not reused(catalog_index, wider, products), "and back: started over again"
    broader = reconfigured(catalog_index, hnsw_ef=300)
    assert not reused(broader, wider, products), "another search breadth: started over"
    # the same count of products, one product's content changed
    first = products[0]
    edited = Product(first.product_id, {**first.payload, "content_hash": "x"}, first.vectors)
    assert not reused(broader, wider, [edited, *products[1:]]), "other content: started over"
    assert reused(broader, wider, [edited, *products[1:]])


def test_relative_filters_run_in_the_engine(catalog_index) -> None:
    products = list(catalog_index.scroll())
    payloads = {p.product_id: p.payload for p in products}
    filters = RelativeFilters(same=("category",), different=("seller",), within=(("price", 0.5),))
    table = collect_candidates(catalog_index, products, default_search(catalog_index), filters)
    assert len(table) > 0
    for a, b in zip(table.a, table.b, strict=True):
        mine, theirs = payloads[table.ids[a]], payloads[table.ids[b]]
        assert theirs["category"] == mine["category"] and theirs["seller"] != mine["seller"]
        assert mine["price"] * 0.5 <= theirs["price"] <= mine["price"] * 1.5


def test_a_limited_neighbourhood_keeps_every_candidate_tied_at_its_cut(tmp_path, encoders) -> None:
    """Asking the engine for each list's best few gives the table those lists hold in full:
    among 30 listings with one title (every score tied) the cut falls by product id, as in the
    whole list, not where the engine stopped."""
    titles = ["Oatly oat drink 1L"] * 30 + [f"Arla milk {n} dl" for n in range(10)]
    rows = [{"id": f"p{i:02d}", "title": t} for i, t in enumerate(titles)]
    path = tmp_path / "ties.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    index = Index(str(tmp_path / "store"), "ties", Settings(), encoders)
    ingest_catalog(index, read_catalog(path, load_recipe("generic")))
    search = default_search(index)
    for pid in ("p17", "p33"):
        (product,) = index.products([pid], with_vectors=True)
        whole = neighbourhood(index, product, search, 3).table.top(5)[0]
        for _ in range(3):
            limited = neighbourhood(index, product, search, 3, limit=5).table.top(5)[0]
            assert pair_set(limited) == pair_set(whole)
    index.close()
