"""Build the chars encoder's reference document-frequency table from Shopee `train` titles.

    python -m finetune.chars_reference \
        ../shared/data/shopee/train.csv ../shared/data/shopee/split.csv

Only `train` rows are read (val and test stay unseen). The table holds hashed n-gram counts, not
titles, and is written to src/prodsearch/assets/chars_reference_df.npz.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from prodsearch.catalog import clean_title
from prodsearch.encoders.chars import REFERENCE_DF, write_reference_df


def main(train_csv: Path, split_csv: Path) -> None:
    """Write the reference table from the `train` split of `train_csv`."""
    frame = pd.read_csv(train_csv).merge(pd.read_csv(split_csv), on="posting_id")
    titles = [clean_title(t) for t in frame.loc[frame["split"] == "train", "title"]]
    write_reference_df(titles)
    print(f"wrote {REFERENCE_DF} from {len(titles):,} train titles", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
