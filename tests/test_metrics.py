"""Retrieval metrics (eval/metrics.py) on vectors whose answers are worked out by hand, and
`prodsearch eval-images` end to end on a few Grocery Store photos (generated ones without the
shared data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter

from prodsearch.encoders import EncoderSet
from prodsearch.eval.metrics import map_at_r, top1_accuracy
from prodsearch.images import load_image

from .conftest import DATA


def _at(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at these angles: cosine similarity falls with the angle."""
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_map_at_r_by_hand() -> None:
    # Class a at -5, 10, 50 degrees; class b at 40, 80, 95 (R = 2 for every item). Each item's
    # two nearest others: a(-5): a, b -> 1/2; a(10): a, b -> 1/2; a(50): b, b -> 0;
    # b(40): a, a -> 0; b(80): b, a -> 1/2; b(95): b, a -> 1/2. Mean: 2/6.
    vectors = _at(-5, 10, 50, 40, 80, 95)
    labels = np.array(["a", "a", "a", "b", "b", "b"])
    assert map_at_r(vectors, labels) == pytest.approx(2 / 6)
    # Class a at 0, 50, 60; b at 20, 200; c alone at 270. a(0): b, a -> precision 1/2 at rank
    # 2, over R = 2 -> 1/4; a(50): a, b -> 1/2; a(60): a, b -> 1/2; b(20) and b(200): an a
    # first -> 0; c has no other of its class: left out (not a zero). Mean over 5: 1.25 / 5.
    vectors = _at(0, 50, 60, 20, 200, 270)
    labels = np.array(["a", "a", "a", "b", "b", "c"])
    assert map_at_r(vectors, labels) == pytest.approx(0.25)
    assert map_at_r(_at(0, 1, 90, 91), np.array([1, 1, 2, 2])) == pytest.approx(1.0)


def test_top1_accuracy_by_hand() -> None:
    catalogue, catalogue_labels = _at(0, 90), np.array(["a", "b"])
    queries, query_labels = _at(10, 80, 50, 30), np.array(["a", "b", "a", "b"])
    # nearest: 10 -> a (right), 80 -> b (right), 50 -> b (wrong), 30 -> a (wrong)
    assert top1_accuracy(queries, query_labels, catalogue, catalogue_labels) == 0.5
    assert top1_accuracy(catalogue, catalogue_labels, catalogue, catalogue_labels) == 1.0


def _grocery_slice(folder: Path) -> pd.DataFrame:
    """A folder shaped like grocery_store (images.csv + images/): 3 Packages products and 2
    fruits, each with its iconic image and 3 test photos; real photos when the shared data is
    there, else generated drawings (a test photo is its product's drawing shifted and blurred)."""
    source = DATA / "grocery_store"
    if (source / "images.csv").is_file():
        frame = pd.read_csv(source / "images.csv")
        groups = [
            *frame.loc[frame["category"] == "Packages", "label_group"].drop_duplicates()[:3],
            *frame.loc[frame["category"] == "Fruit", "label_group"].drop_duplicates()[:2],
        ]
        picked = pd.concat(
            frame[(frame["label_group"] == g) & (frame["split"] == split)].head(n)
            for g in groups
            for split, n in (("iconic", 1), ("test", 3))
        )
        for path in picked["image"]:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / path, folder / path)
        picked = picked[["image", "label_group", "category", "split"]]
    else:
        rows = []
        for group in range(5):
            rng = np.random.default_rng(group)
            drawing = Image.new("RGB", (200, 200), tuple(int(c) for c in rng.integers(0, 255, 3)))
            draw = ImageDraw.Draw(drawing)
            for _ in range(5):
                x, y = (int(v) for v in rng.integers(0, 150, 2))
                colour = tuple(int(c) for c in rng.integers(0, 255, 3))
                draw.ellipse([x, y, x + 50, y + 50], fill=colour)
            category = "Packages" if group < 3 else "Fruit"
            for shot in range(4):
                split = "iconic" if shot == 0 else "test"
                photo = drawing.rotate(8 * shot, translate=(3 * shot, 0), fillcolor="white")
                path = f"images/{split}/g{group}_{shot}.jpg"
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                photo.filter(ImageFilter.GaussianBlur(shot)).save(folder / path)
                rows.append((path, group, category, split))
        picked = pd.DataFrame(rows, columns=["image", "label_group", "category", "split"])
    picked.to_csv(folder / "images.csv", index=False)
    return picked.reset_index(drop=True)


def test_eval_images_command_reports_the_metrics_of_its_photos(
    tmp_path: Path, encoders: EncoderSet
) -> None:
    frame = _grocery_slice(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "prodsearch.cli", "eval-images", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["encoders"] == "finetuned"
    vectors = encoders["image"].encode_images(  # type: ignore[attr-defined]
        [load_image(tmp_path / path) for path in frame["image"]]
    )
    labels = frame["label_group"].to_numpy()
    for name, subset in (("Packages", frame["category"] == "Packages"), ("all 81 groups", None)):
        chosen = np.ones(len(frame), bool) if subset is None else subset.to_numpy()
        test = chosen & (frame["split"] == "test").to_numpy()
        iconic = chosen & (frame["split"] == "iconic").to_numpy()
        expected = {
            "test_photos": int(test.sum()),
            "map_at_r": map_at_r(vectors[test], labels[test]),
            "top1_to_catalogue": top1_accuracy(
                vectors[test], labels[test], vectors[iconic], labels[iconic]
            ),
        }
        assert report[name] == pytest.approx(expected, abs=1e-3), name
    assert report["Packages"]["test_photos"] == 9 and report["all 81 groups"]["test_photos"] == 15
    # photos of a product are nearer each other than chance (1 in 5) puts them
    assert report["all 81 groups"]["top1_to_catalogue"] > 0.4
