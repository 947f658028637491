"""The image benchmark: Grocery Store test photos against their catalogue (iconic) images."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from prodsearch.encoders import EncoderSet
from prodsearch.eval.metrics import map_at_r, top1_accuracy


def grocery_image_metrics(grocery_dir: Path, encoders: EncoderSet) -> dict[str, dict[str, float]]:
    """Image-modality quality on Grocery Store `test` photos: top-1 accuracy of the nearest
    catalogue (iconic) image and mAP@R among the test photos, for Packages and all 81 groups."""
    from prodsearch.images import load_image

    frame = pd.read_csv(grocery_dir / "images.csv")
    frame = frame[frame["split"].isin(["test", "iconic"])].reset_index(drop=True)
    images = [load_image(grocery_dir / path) for path in frame["image"]]
    embeddings = encoders["image"].encode_images(images)  # type: ignore[attr-defined]
    out = {}
    for name, subset in (
        ("Packages", frame["category"] == "Packages"),
        ("all 81 groups", frame.index >= 0),
    ):
        test = (subset & (frame["split"] == "test")).to_numpy()
        iconic = (subset & (frame["split"] == "iconic")).to_numpy()
        labels = frame["label_group"].to_numpy()
        out[name] = {
            "test_photos": int(test.sum()),
            "map_at_r": round(map_at_r(embeddings[test], labels[test]), 4),
            "top1_to_catalogue": round(
                top1_accuracy(embeddings[test], labels[test], embeddings[iconic], labels[iconic]), 4
            ),
        }
    return out
