"""What the review page shows of a pair: the title words the other title lacks."""

from __future__ import annotations

from prodsearch.review.views import product_view, title_tokens


def test_differing_title_words_are_marked() -> None:
    tokens = title_tokens("Bosch drill XB-450 (500W) black", "BOSCH Drill XB-451 500w, black")
    assert [t["text"] for t in tokens if t["differs"]] == ["XB-450"]
    assert "".join(t["text"] for t in tokens) == "Bosch drill XB-450 (500W) black"


def test_a_product_shows_its_photo_url_and_fields_not_its_bookkeeping() -> None:
    payload = {
        "title": "Oatly oat drink 1L",
        "image_path": "/data/oatly.jpg",
        "content_hash": "abc",
        "product_id": "a-101",
        "price": 2.49,
    }
    view = product_view("a-101", payload, "Oatly oat drink 1 litre")
    assert view["image"] == "/images/a-101" and view["fields"] == {"price": 2.49}
    assert [t["text"] for t in view["tokens"] if t["differs"]] == ["1L"]
    assert product_view("b", {"title": "x"})["image"] is None
