"""Each fine-tuning recipe runs end to end on a tiny slice: a real small training run whose loss
falls and whose artefact loads; the shipped artefacts load with their documented dimensions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune.common import load_config
from prodsearch.encoders import CharCNNEncoder, EncoderSet, ImageEncoder, TextEncoder

from .conftest import DATA, needs_shopee

FIXED_MARGIN = {"margin_start": 0.3, "margin_end": 0.3}  # a constant loss function: comparable


def _falls(history: list[dict]) -> bool:
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    return losses[-1] < losses[0]


@needs_shopee
def test_text_recipe(tmp_path: Path) -> None:
    from finetune import text

    config = load_config(
        text.CONFIG,
        {"epochs": 3, "batch_size": 16, "lora_rank": 4, "max_tokens": 24, **FIXED_MARGIN},
    )
    assert config["method"] == "lora"  # the recipe of the shipped adapter
    fields = text.train(config, tmp_path / "adapter", DATA, limit_groups=24)
    assert _falls(fields["history"])
    assert (tmp_path / "adapter" / "manifest.json").is_file()
    tuned = TextEncoder(adapter=tmp_path / "adapter")
    titles = ["Kipas angin portable XB-450", "Sepatu sneakers wanita"]
    vectors = tuned.encode_titles(titles)
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tuned.encode_titles(titles), vectors, atol=1e-6)
    assert not np.allclose(vectors, TextEncoder().encode_titles(titles), atol=1e-3)
    assert tuned.identity().name.endswith("arcface-lora")


@needs_shopee
def test_text_recipe_full_rank_ships_an_svd_adapter(tmp_path: Path) -> None:
    from finetune import text

    config = load_config(
        text.CONFIG.with_name("text_full.toml"),
        {"epochs": 3, "train_epochs": 3, "batch_size": 16, "max_tokens": 24, "export_rank": 4},
    )
    config.update(FIXED_MARGIN)
    assert config["method"] == "full"
    fields = text.train(config, tmp_path / "adapter", DATA, limit_groups=24)
    assert _falls(fields["history"])
    assert (tmp_path / "adapter" / "full_weights.safetensors").is_file()
    assert fields["export_rank"] == 4 and 0.0 < fields["exported_val_f1"] <= 1.0
    tuned = TextEncoder(adapter=tmp_path / "adapter")
    titles = ["Kipas angin portable XB-450", "Sepatu sneakers wanita"]
    vectors = tuned.encode_titles(titles)
    assert vectors.shape == (2, 384)
    assert not np.allclose(vectors, TextEncoder().encode_titles(titles), atol=1e-3)


REVIEW_CATALOG = """id,title
k1,Kipas angin portable XB-450 hitam
k2,KIPAS ANGIN PORTABLE XB450 HITAM
k3,kipas angin portabel xb 450 warna hitam
p1,Kipas angin portable XB-450 putih
s1,Sepatu sneakers wanita putih
"""
REVIEW_LABELS = """id_a,id_b,same
k1,k2,same
k2,k3,yes
k1,p1,different
s1,k3,no
"""


def test_review_answers_become_groups_and_hard_negatives(tmp_path: Path) -> None:
    from finetune.text import labelled_titles
    from prodsearch.errors import CatalogError

    (tmp_path / "catalog.csv").write_text(REVIEW_CATALOG)
    (tmp_path / "labels.csv").write_text(REVIEW_LABELS)
    answered = labelled_titles(tmp_path / "labels.csv", tmp_path / "catalog.csv")
    assert len(answered.titles) == 3 and set(answered.groups.tolist()) == {0}  # k1-k2-k3 chain
    assert ("Kipas angin portable XB-450 hitam", "Kipas angin portable XB-450 putih") in (
        answered.negatives
    )
    assert len(answered.negatives) == 2
    (tmp_path / "bad.csv").write_text("id_a,id_b,same\nk1,zz9,same\n")
    with pytest.raises(CatalogError, match="zz9"):
        labelled_titles(tmp_path / "bad.csv", tmp_path / "catalog.csv")


def _pair_record(title: str) -> str:
    return f"COL title VAL {title} COL price VAL 9.99 "


def test_pair_files_become_groups_and_hard_negatives(tmp_path: Path) -> None:
    from finetune.text import pair_file_titles

    x, y, z, w = "TL-SF1008D switch", "TP-Link TL-SF1008D 8 port", "tplink sf1008d", "TL-SF1016D"
    sets = {"shop_a": [(x, y, 1), (y, z, 1), (x, w, 0)], "shop_b": [(x, y, 1), (y, w, 0)]}
    for name, pairs in sets.items():
        (tmp_path / name).mkdir()
        lines = [f"{_pair_record(a)}\t{_pair_record(b)}\t{same}" for a, b, same in pairs]
        (tmp_path / name / "train.txt").write_text("\n".join(lines) + "\n")
    every = pair_file_titles(tmp_path)
    # shop_a's positives chain x-y-z into one group; shop_b's x-y is a group of its own (the
    # same records in another file are other products)
    assert sorted(np.bincount(every.groups).tolist()) == [2, 3]
    assert sorted(every.titles) == sorted([x, y, z, x, y])
    assert (x, w) in every.negatives and (y, w) in every.negatives and len(every.negatives) == 2
    one = pair_file_titles(tmp_path / "shop_b" / "train.txt")
    assert sorted(one.titles) == sorted([x, y]) and one.negatives == [(y, w)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no pair file"):
        pair_file_titles(tmp_path / "empty")


@needs_shopee
def test_text_recipe_learns_from_review_answers(tmp_path: Path) -> None:
    from finetune import text

    (tmp_path / "catalog.csv").write_text(REVIEW_CATALOG)
    (tmp_path / "labels.csv").write_text(REVIEW_LABELS)
    (tmp_path / "pairs" / "shop").mkdir(parents=True)
    (tmp_path / "pairs" / "shop" / "train.txt").write_text(
        f"{_pair_record('Sepatu sneakers wanita putih')}\t{_pair_record('sepatu sneaker putih')}\t1"
    )
    config = load_config(
        text.CONFIG,
        {"epochs": 2, "batch_size": 16, "lora_rank": 4, "max_tokens": 24, **FIXED_MARGIN},
    )
    config["label_negative_weight"] = 5.0
    fields = text.train(
        config,
        tmp_path / "adapter",
        DATA,
        limit_groups=24,
        labels=tmp_path / "labels.csv",
        catalog=tmp_path / "catalog.csv",
        pairs=tmp_path / "pairs",
    )
    # the answers' chain of 3 and the pair file's group of 2
    assert fields["data"]["labelled_titles"] == 5 and fields["data"]["rejected_pairs"] == 2
    pair = ["Kipas angin portable XB-450 hitam", "Kipas angin portable XB-450 putih"]
    before = TextEncoder().encode_titles(pair)
    after = TextEncoder(adapter=tmp_path / "adapter").encode_titles(pair)
    # the rejected pair is pushed apart
    assert float(after[0] @ after[1]) < float(before[0] @ before[1]) - 0.02


def test_svd_adapter_reproduces_tuned_weights_at_full_rank_and_truncates_below() -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from finetune.text import svd_adapter, trainable_linear_weights
    from prodsearch.encoders.text import minilm_path

    bert = SentenceTransformer(str(minilm_path()), device="cpu")[0].auto_model
    weights = trainable_linear_weights(bert, ["query", "dense"])
    assert "encoder.layer.0.attention.self.query.weight" in weights
    assert not any(name.startswith("pooler") or ".key." in name for name in weights)
    name = "encoder.layer.0.attention.self.query.weight"
    generator = torch.Generator().manual_seed(0)
    change = torch.randn(weights[name].shape, generator=generator) * 0.01
    tuned = {name: weights[name].detach() + change}

    def merged(rank: int) -> torch.Tensor:
        adapter = svd_adapter(bert, tuned, rank, ["query"]).merge_and_unload()
        return dict(adapter.named_parameters())[name].detach()

    torch.testing.assert_close(merged(384), tuned[name], atol=1e-5, rtol=0)
    low_rank_error = (merged(8) - tuned[name]).norm()
    assert 0 < low_rank_error < change.norm()
    # the base model itself is left untouched
    torch.testing.assert_close(weights[name].detach(), tuned[name] - change)


@needs_shopee
def test_chars_recipe(tmp_path: Path) -> None:
    from finetune import chars

    config = load_config(chars.CONFIG, {"epochs": 4, "batch_size": 32, **FIXED_MARGIN})
    fields = chars.train(config, tmp_path / "charcnn.safetensors", DATA, limit_groups=40)
    assert _falls(fields["history"])
    encoder = CharCNNEncoder(tmp_path / "charcnn.safetensors")
    vectors = encoder.encode_titles(["XB-450 kipas", "xb450 kipas"])
    assert vectors.shape == (2, 256)
    np.testing.assert_allclose(encoder.encode_titles(["XB-450 kipas", "xb450 kipas"]), vectors)


def test_image_recipe(tmp_path: Path) -> None:
    from finetune import image

    if not (DATA / "grocery_store" / "images.csv").is_file():
        pytest.skip("grocery_store data not found")
    config = load_config(image.CONFIG, {"epochs": 3, "views": 2, "batch_size": 16, **FIXED_MARGIN})
    fields = image.train(config, tmp_path / "head.safetensors", DATA, limit_photos=48)
    assert _falls(fields["history"])
    encoder = ImageEncoder(head=tmp_path / "head.safetensors")
    from PIL import Image

    photos = [Image.new("RGB", (256, 256), c) for c in ("red", "navy")]
    vectors = encoder.encode_images(photos)
    assert vectors.shape == (2, 512)
    np.testing.assert_allclose(encoder.encode_images(photos), vectors, atol=1e-5)


def test_shipped_encoders_load_with_documented_dimensions() -> None:
    shipped = EncoderSet.default()
    dims = {name: encoder.dim for name, encoder in shipped.encoders.items()}
    assert dims["text"] == 384 and dims["chars"] is None and dims["phash"] == 64
    assert dims["image"] == 512 and "charcnn" not in dims
    pretrained = EncoderSet.pretrained()
    assert set(pretrained.encoders) == {"text", "chars", "image", "phash"}
    assert pretrained["image"].dim == 1280
