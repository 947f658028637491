"""Encoder benchmark: torch vs ONNX Runtime fp32 vs ONNX int8, speed and agreement, one run.

    .venv/bin/python benchmarks/bench_encoders.py [--data ../shared/data] [--titles 1000]

Prints a markdown table on stdout (progress on stderr): titles/s or images/s at batch 1 and 32
(tokenization or the (x - 127) / 128 scaling included; JPEG decoding and cropping excluded, they
run on the ingest reader thread) and the cosine of each variant's vectors to torch's (mean / min)
on real data: random Shopee titles, Grocery Store test photos. Encoders: the shipped ones (the
fine-tuned artefacts when present in src/prodsearch/assets); the char-CNN, when no weights are
shipped, is a seeded untrained network (speed is the same; its cosines say less).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from prodsearch.encoders import CharCNNEncoder, EncoderSet, InferenceOptions
from prodsearch.encoders.charcnn import build_network, shipped_weights
from prodsearch.encoders.image import crop
from prodsearch.encoders.runtime import NeuralEncoder, available_cores
from prodsearch.images import load_image

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "torch": InferenceOptions(backend="torch"),
    "ONNX fp32": InferenceOptions(precision="fp32"),
    "ONNX int8": InferenceOptions(precision="int8"),
}


def rate(value: float) -> str:
    """A throughput, with a decimal when small."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def best_of(call: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: FLOPs per item (MODELS.md, FlopCounterMode): MiniLM at the median title (19 tokens), Lite0 at 224
TITLE_GFLOP = 0.404
IMAGE_GFLOP = 0.768


def fp32_gemm_gflops() -> float:
    """This machine's fp32 matrix-multiply rate (1024 x 1024, numpy's BLAS, all cores), GFLOP/s:
    the yardstick for what an encoder could reach here."""
    a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    return 2 * 1024**3 / best_of(lambda: a @ a, 20) / 1e9


def charcnn_weights(workdir: Path) -> tuple[Path, str]:
    """The shipped char-CNN weights, or a seeded untrained network's (and a label saying so)."""
    shipped = shipped_weights()
    if shipped is not None:
        return shipped, "char-CNN (shipped)"
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = workdir / "charcnn-untrained.safetensors"
    save_file(build_network().state_dict(), str(path))
    return path, "char-CNN (untrained: none shipped)"


def encoders_for(options: InferenceOptions, weights: Path) -> dict[str, NeuralEncoder]:
    """The shipped text and image encoders and a char-CNN, run as `options` says."""
    shipped = EncoderSet.default(inference=options)
    return {
        "text": shipped["text"],  # type: ignore[dict-item]
        "charcnn": CharCNNEncoder(weights, inference=options),
        "image": shipped["image"],  # type: ignore[dict-item]
    }


def run(encoder: NeuralEncoder, modality: str, items: list, batch: int) -> np.ndarray:
    """Encode `items` in batches of `batch` (the encoder's own batching, sorted for text)."""
    encoder.batch_size = batch  # type: ignore[attr-defined]
    if modality == "image":
        return encoder.encode_crops(items)  # type: ignore[attr-defined]
    return encoder.encode_titles(items)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--titles", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    log = Console(stderr=True)
    import torch

    torch.set_num_threads(available_cores())
    workdir = Path(tempfile.mkdtemp(prefix="prodsearch-bench-enc-"))
    load_before = os.getloadavg()[0]

    titles = (
        pd.read_csv(args.data / "shopee" / "train.csv")["title"]
        .sample(args.titles, random_state=0)
        .tolist()
    )
    frame = pd.read_csv(args.data / "grocery_store" / "images.csv")
    paths = frame.loc[frame["split"] == "test", "image"].sample(args.images, random_state=0)
    crops = [crop(load_image(args.data / "grocery_store" / p)) for p in paths]
    inputs = {"text": titles, "charcnn": titles, "image": crops}
    singles = {"text": titles[:200], "charcnn": titles[:200], "image": crops[:64]}

    weights, charcnn_label = charcnn_weights(workdir)
    labels = {"text": "", "charcnn": charcnn_label, "image": ""}
    reference: dict[str, np.ndarray] = {}
    rows = []
    for variant, options in VARIANTS.items():
        for modality, encoder in encoders_for(options, weights).items():
            labels[modality] = labels[modality] or encoder.identity().name
            log.print(f"{modality}: {variant}")
            items = inputs[modality]
            vectors = run(encoder, modality, items, 32)  # warm-up; builds the ONNX file once
            one = singles[modality]
            b1 = len(one) / best_of(
                lambda e=encoder, m=modality, o=one: [run(e, m, [x], 1) for x in o], 1
            )
            b32 = len(items) / best_of(
                lambda e=encoder, m=modality, i=items: run(e, m, i, 32), args.repeat
            )
            reference.setdefault(modality, vectors)
            cosines = np.sum(vectors * reference[modality], axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference[modality], axis=1)
            )
            onnx = (
                f"{encoder.onnx_file().name} ({encoder.onnx_file().stat().st_size / 1e6:.1f} MB)"
                if options.backend == "onnx"
                else "-"
            )
            rows.append(
                [
                    labels[modality],
                    variant,
                    rate(b1),
                    rate(b32),
                    f"{cosines.mean():.4f} / {cosines.min():.4f}",
                    onnx,
                ]
            )

    peak = fp32_gemm_gflops()
    rows.sort(key=lambda r: [labels["text"], labels["charcnn"], labels["image"]].index(r[0]))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(
        f"## Encoders: {len(titles):,} Shopee titles, {len(crops)} Grocery Store test photos "
        f"({available_cores()} cores, ORT and torch threads = cores; "
        f"AVX-512 VNNI: {'yes' if 'avx512_vnni' in flags else 'no'}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)\n"
    )
    header = ["encoder", "variant", "items/s b=1", "items/s b=32", "cos vs torch mean / min"]
    print("| " + " | ".join([*header, "ONNX file"]) + " |")
    print("|" + "---|" * (len(header) + 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nThis machine's fp32 GEMM rate: {peak:,.0f} GFLOP/s, so at 100 % of it about "
        f"{peak / TITLE_GFLOP:,.0f} titles/s (19 tokens) or {peak / IMAGE_GFLOP:,.0f} images/s in "
        "fp32 (MODELS.md measured 530 GFLOP/s on its AVX-512 VNNI machine)."
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
