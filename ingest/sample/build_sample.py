"""Rebuild the demo catalog from the Grocery Store Dataset (MIT, see LICENSE-grocery-store.txt).

    python ingest/sample/build_sample.py ../shared/data/grocery_store

For each of the 31 packaged products (one branded SKU each): its catalogue ("iconic") image with
its name as title and the dataset's product description as a payload column, and one in-store
photo from the dataset's `train` split as a second,
photo-only listing of the same product. Three `test` photos of other packs go to `queries/`:
they are not in the catalog, and the README matches them against it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
QUERY_CLASSES = ("Tropicana-Apple-Juice", "Oatly-Oat-Milk", "Arla-Standard-Milk")


def main(source: Path) -> None:
    """Write catalog.csv, images/ and queries/ next to this script."""
    frame = pd.read_csv(source / "images.csv")
    packages = frame[frame["category"] == "Packages"]
    for folder in ("images", "queries"):
        shutil.rmtree(HERE / folder, ignore_errors=True)
        (HERE / folder).mkdir()
    rows = []
    for class_name, group in packages.groupby("class_name", sort=True):
        iconic = group[group["is_iconic"] == 1].iloc[0]
        photo = group[group["split"] == "train"].sort_values("id").iloc[0]
        name = class_name.replace("-", " ")
        description = iconic["title"].strip()
        for record, title, kind in ((iconic, name, "catalogue"), (photo, "", "store photo")):
            target = Path("images") / f"{class_name}-{record['id']}.jpg"
            shutil.copyfile(source / record["image"], HERE / target)
            rows.append(
                {
                    "id": f"gs-{record['id']}",
                    "title": title,
                    "image": str(target),
                    "description": description if title else "",
                    "product": class_name,
                    "brand": class_name.split("-")[0],
                    "kind": kind,
                    "label_group": int(record["label_group"]),
                }
            )
        if class_name in QUERY_CLASSES:
            query = group[group["split"] == "test"].sort_values("id").iloc[0]
            shutil.copyfile(source / query["image"], HERE / "queries" / f"{class_name}.jpg")
    pd.DataFrame(rows).to_csv(HERE / "catalog.csv", index=False)
    print(f"wrote {len(rows)} rows to {HERE / 'catalog.csv'}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
