"""ArcFace training of the byte-level char-CNN from scratch on Shopee `train` titles.

    .venv/bin/python -m finetune.chars [--config finetune/configs/chars.toml] [--out FILE]
                                       [--device cpu|cuda] [--limit-groups N] [--epochs N]

Writes the weights (float16, ~0.8 MB) to FILE and a manifest beside it; the best epoch by val F1
is kept; test is never read.
"""

from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler

from finetune.common import (
    DATA,
    WarmupArcFace,
    best_threshold_f1,
    cap_groups,
    file_sha256,
    run_recipe,
    seed_everything,
    shopee_split,
    write_manifest,
)
from finetune.text import augment
from prodsearch.encoders.charcnn import DIM, SHIPPED_WEIGHTS, build_network, byte_ids

CONFIG = Path(__file__).resolve().parent / "configs" / "chars.toml"
_SEPARATOR = re.compile(r"(?<=\w)[-_/. ](?=\w)")


def code_noise(title: str, rng: random.Random) -> str:
    """The text augmentations plus product-code spellings: `XB-450` -> `XB450` / `XB 450`."""
    title = augment(title, rng)
    if rng.random() < 0.3:
        title = _SEPARATOR.sub(lambda _: rng.choice(["", " ", "-"]), title)
    return title


@torch.no_grad()
def encode_all(network: Any, titles: list[str], device: str) -> np.ndarray:
    """Embed titles in eval mode."""
    network.eval()
    ids = torch.from_numpy(byte_ids(titles))
    return np.concatenate(
        [network(ids[i : i + 512].to(device)).cpu().numpy() for i in range(0, len(ids), 512)]
    )


def train(
    config: dict[str, Any],
    out: Path,
    data: Path = DATA,
    device: str = "cpu",
    limit_groups: int | None = None,
) -> dict[str, Any]:
    """Train the char-CNN; return the manifest fields (also written beside `out`)."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    seed_everything(config["seed"])
    torch.set_num_threads(config.get("threads", 2))
    rng = random.Random(config["seed"])
    train_split = shopee_split(data, "train", limit_groups, config["seed"])
    val_split = shopee_split(
        data, "val", limit_groups and max(20, limit_groups // 2), config["seed"]
    )
    keep = cap_groups(train_split.labels, config["max_group_rows"], config["seed"])
    titles = [train_split.titles[i] for i in keep]
    labels = train_split.labels[keep]
    n_classes = int(labels.max()) + 1

    network = build_network().to(device)
    steps_per_epoch = len(titles) // config["batch_size"]
    loss_fn = WarmupArcFace(
        n_classes,
        DIM,
        config["margin_start"],
        config["margin_end"],
        int(steps_per_epoch * config["margin_warmup_epochs"]),
        config["scale"],
    ).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": network.parameters(), "lr": config["lr"]},
            {"params": loss_fn.parameters(), "lr": config["head_lr"]},
        ],
        weight_decay=config["weight_decay"],
    )
    total = steps_per_epoch * config["epochs"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.05, 1 - s / max(1, total))
    )
    sampler = MPerClassSampler(
        labels,
        config["m_per_class"],
        config["batch_size"],
        length_before_new_iter=steps_per_epoch * config["batch_size"],
    )
    history: list[dict[str, Any]] = []
    best = -1.0
    # The learning rate decays over `epochs`; `train_epochs` may stop the run earlier (CPU budget).
    for epoch in range(1, min(config["epochs"], config.get("train_epochs", config["epochs"])) + 1):
        network.train()
        indices = list(iter(sampler))
        losses = []
        epoch_start = time.perf_counter()
        for step in range(steps_per_epoch):
            batch = indices[step * config["batch_size"] : (step + 1) * config["batch_size"]]
            ids = torch.from_numpy(byte_ids([code_noise(titles[i], rng) for i in batch])).to(device)
            loss_fn.step_margin()
            loss = loss_fn(network(ids), torch.from_numpy(labels[batch]).to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val_f1, threshold = best_threshold_f1(
            encode_all(network, val_split.titles, device), val_split.labels
        )
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(float(np.mean(losses)), 4),
                "first_batches_loss": round(float(np.mean(losses[:10])), 4),
                "last_batches_loss": round(float(np.mean(losses[-10:])), 4),
                "val_f1": round(val_f1, 4),
                "val_threshold": round(threshold, 3),
                "seconds": round(time.perf_counter() - epoch_start, 1),
            }
        )
        print(f"epoch {epoch}: {history[-1]}", file=sys.stderr)
        if val_f1 > best:
            best = val_f1
            out.parent.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().half().contiguous() for k, v in network.state_dict().items()},
                str(out),
            )
    fields = {
        "recipe": "finetune/chars.py",
        "base": "none: trained from scratch",
        "data": {
            "train_csv_and_split_sha256": file_sha256(
                data / "shopee" / "train.csv", data / "shopee" / "split.csv"
            ),
            "train_rows": len(titles),
            "train_groups": n_classes,
            "val_rows": len(val_split.titles),
            "limit_groups": limit_groups,
        },
        "config": config,
        "device": device,
        "history": history,
        "best_val_f1": round(best, 4),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    write_manifest(out.with_suffix(".manifest.json"), **fields)
    return fields


def main() -> None:
    run_recipe(__doc__, CONFIG, SHIPPED_WEIGHTS, "--limit-groups", train)


if __name__ == "__main__":
    main()
