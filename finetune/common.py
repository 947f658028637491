"""What every fine-tuning recipe shares: data, seeding, the ArcFace loss with margin warm-up,
validation F1, and the artefact manifest."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pytorch_metric_learning.losses import ArcFaceLoss

from prodsearch.catalog import clean_title

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; single-threaded determinism is not forced (2 cores)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a TOML config and apply overrides."""
    config = tomllib.loads(path.read_text(encoding="utf-8"))
    config.update(overrides or {})
    return config


def file_sha256(*paths: Path) -> str:
    """SHA-256 over the bytes of several files (the training data's fingerprint)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class TitleSplit:
    """Cleaned titles, integer labels (0..n_groups-1) and phashes of one Shopee split."""

    titles: list[str]
    labels: np.ndarray
    phashes: list[str]


def shopee_split(
    data: Path, split: str, limit_groups: int | None = None, seed: int = 0
) -> TitleSplit:
    """Return one split of the Shopee catalog (optionally only `limit_groups` random groups)."""
    frame = pd.read_csv(data / "shopee" / "train.csv").merge(
        pd.read_csv(data / "shopee" / "split.csv"), on="posting_id"
    )
    frame = frame[frame["split"] == split]
    if limit_groups:
        groups = frame["label_group"].drop_duplicates().sample(limit_groups, random_state=seed)
        frame = frame[frame["label_group"].isin(groups)]
    codes, _ = pd.factorize(frame["label_group"])
    return TitleSplit(
        [clean_title(t) for t in frame["title"]],
        codes.astype(np.int64),
        frame["image_phash"].tolist(),
    )


def cap_groups(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Return the indices kept when each group is capped at `max_rows` (the study: 10)."""
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) > max_rows:
            members = rng.choice(members, max_rows, replace=False)
        keep.extend(members.tolist())
    return np.sort(np.array(keep))


class WarmupArcFace(ArcFaceLoss):
    """pytorch-metric-learning's ArcFaceLoss whose margin grows linearly from `start` to `end`
    radians over `warmup_steps` (a large margin does not converge from the start)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        start: float,
        end: float,
        warmup_steps: int,
        scale: float,
    ) -> None:
        super().__init__(num_classes, embedding_size, margin=math.degrees(start), scale=scale)
        self.start, self.end, self.warmup_steps, self.step_count = (
            start,
            end,
            max(1, warmup_steps),
            0,
        )

    def step_margin(self) -> float:
        """Advance one step and return the margin (radians) now in force."""
        fraction = min(1.0, self.step_count / self.warmup_steps)
        self.margin = self.start + (self.end - self.start) * fraction
        self.step_count += 1
        return self.margin

    def init_weights_from_means(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Start each class weight at its members' mean embedding (normalised)."""
        sums = torch.zeros(self.W.shape[1], embeddings.shape[1])
        sums.index_add_(0, labels, embeddings)
        self.W.data = torch.nn.functional.normalize(sums, dim=1).T.contiguous()


def best_threshold_f1(
    embeddings: np.ndarray,
    labels: np.ndarray,
    thresholds: Sequence[float] = tuple(np.arange(0.3, 0.96, 0.01)),
) -> tuple[float, float]:
    """Return (best mean per-row F1, its cosine threshold) of thresholded kNN on `embeddings`."""
    similarity = embeddings @ embeddings.T
    same = labels[:, None] == labels[None, :]
    n_true = same.sum(1)
    best = (0.0, 0.0)
    for threshold in thresholds:
        predicted = similarity >= threshold
        np.fill_diagonal(predicted, True)
        tp = (predicted & same).sum(1)
        f1 = float(np.mean(2 * tp / (predicted.sum(1) + n_true)))
        best = max(best, (f1, float(threshold)))
    return best


def write_manifest(path: Path, **fields: Any) -> None:
    """Write an artefact's manifest (JSON): base weights, data hash, config, metrics."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(fields, indent=2, default=str) + "\n")


def run_recipe(
    doc: str | None,
    config: Path,
    out: Path,
    limit_flag: str,
    train: Callable[..., Any],
    path_options: Sequence[str] = (),
) -> None:
    """The command line every recipe shares: `--config --out --data --device --epochs` and a
    slice flag (`limit_flag`, e.g. "--limit-groups"), then `train(config, out, data, device,
    limit)`; each of `path_options` (e.g. "--labels") is an optional path passed to `train` as
    the keyword of its name."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=config)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(limit_flag, dest="limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    for option in path_options:
        parser.add_argument(option, type=Path, default=None)
    args = parser.parse_args()
    overrides = {"epochs": args.epochs} if args.epochs else {}
    extra = {
        o.lstrip("-").replace("-", "_"): getattr(args, o.lstrip("-").replace("-", "_"))
        for o in path_options
    }
    train(
        load_config(args.config, overrides),
        args.out,
        args.data,
        args.device,
        args.limit,
        **extra,
    )
