"""training.text: the text head, the fusion chosen on validation, the exported files, and the
search-quality benchmark, end to end on a tiny synthetic prepared set with an untrained image
model (a real MiniLM, a few dozen short texts)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.artifact import (
    CARD_FILE,
    EMBEDDINGS_DIR,
    TEXT_FINETUNED_FILE,
    TEXT_EMBEDDINGS_FILE,
    TEXT_FINETUNE_CURVE_FILE,
    TEXT_IDS_FILE,
    TEXT_METRICS_FILE,
)
from common.prepared_data import CategoryLabels
from common.prepared_data.frames import write_prepared
from common.text import TEXT_DIM, TextHead
from training import text as T

CATEGORIES = ["Appliances", "Computers & Software", "Home & Garden"]
WORDS = {
    "Appliances": [
        "washing machine",
        "fridge freezer",
        "microwave oven",
        "tumble dryer",
        "dishwasher",
        "electric kettle",
        "vacuum cleaner",
        "toaster",
    ],
    "Computers & Software": [
        "gaming laptop",
        "desktop pc",
        "computer monitor",
        "keyboard",
        "graphics card",
        "wireless mouse",
        "usb hard drive",
        "printer",
    ],
    "Home & Garden": [
        "garden bench",
        "flower pots",
        "lawn mower",
        "oak wardrobe",
        "bedside table",
        "patio heater",
        "garden shed",
        "dining chairs",
    ],
}


# ------------------------------------------------------------------ unit pieces


def test_fit_logreg_covers_classes_missing_from_training():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = np.array([0, 0, 2, 2])
    weight, bias = T.fit_logreg(x, y, 1.0, num_classes=3)
    assert weight.shape == (3, 2) and bias[1] < -10
    lp = T.logreg_log_probs(x, weight, bias)
    assert (lp.argmax(1) == y).all()
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0)


def test_choose_fusion_learns_to_trust_the_informative_modality():
    rng = np.random.default_rng(0)
    n, c = 150, 3
    y = rng.integers(0, c, n)
    good = np.full((n, c), -3.0)
    good[np.arange(n), y] = 0.0  # text: always right
    good = T._log_softmax(good)
    noise = np.log(rng.dirichlet(np.ones(c), n))  # image: confident noise
    fusion = T.choose_fusion([good, noise], y, c)
    assert fusion["weight"].shape == (c, 2 * c)
    assert T.accuracy(T.apply_fusion(fusion, [good, noise]), y) > 0.95
    assert T.accuracy(T._log_softmax(good + 5 * noise), y) < 0.9  # what naive addition risks
    assert set(fusion["cv"]) >= {"weighted", "stacking_C=1"}


def test_weighted_fusion_params_downweight_a_noisy_source():
    rng = np.random.default_rng(1)
    n, c = 400, 4
    y = rng.integers(0, c, n)
    informative = np.where(np.eye(c)[y] > 0, 0.0, -2.0) + rng.normal(0, 0.5, (n, c))
    noise = rng.normal(0, 3.0, (n, c))
    a = T.weighted_fusion_params([T._log_softmax(informative), T._log_softmax(noise)], y)
    assert a[0] > 0.5 and a[1] < 0.1 * a[0]


def test_near_duplicates_flags_only_close_texts():
    a = np.eye(3, dtype=np.float32)
    b = np.array([[0.999, 0.0447, 0.0], [0.6, 0.8, 0.0]], dtype=np.float32)
    assert T.near_duplicates(b, a).tolist() == [True, False]
    assert T.near_duplicates(b[:0], a).tolist() == []


def test_listing_splits_rejects_a_listing_spanning_splits():
    images = pd.DataFrame({"product_id": ["a", "a", "b"], "split": ["train", "train", "test"]})
    assert T.listing_splits(images).to_dict() == {"a": "train", "b": "test"}
    with pytest.raises(ValueError, match="several splits"):
        T.listing_splits(pd.DataFrame({"product_id": ["a", "a"], "split": ["train", "test"]}))


def test_embedding_cache_reuses_vectors(tmp_path, monkeypatch):
    calls = []

    class FakeEncoder:
        def encode(self, texts):
            calls.append(list(texts))
            out = np.zeros((len(texts), TEXT_DIM), np.float32)
            out[:, 0] = 1.0
            return out

    first = T.embed_texts(["a", "b", "a"], cache_dir=tmp_path, encoder=FakeEncoder())
    assert first.shape == (3, TEXT_DIM) and sorted(calls[0]) == ["a", "b"]
    T.embed_texts(["b", "a"], cache_dir=tmp_path, encoder=FakeEncoder())
    assert len(calls) == 1  # everything came from the cache


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared-data folder in training.prepare's layout, plus an untrained image artefact."""
    from common.backbones import get_backbone
    from common.model import ListingModel, save_artifact

    root = tmp_path_factory.mktemp("text")
    data, artifact = root / "data", root / "artifact"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    listings, images = [], []
    colours = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200)}
    for label, name in enumerate(CATEGORIES):
        for i, word in enumerate(WORDS[name]):
            for copy in range(2):  # 16 listings per category
                pid = f"{label}-{i}-{copy}"
                split = (
                    "train"
                    if copy == 0 and i < 6
                    else ("valid" if copy == 1 and i < 4 else "test" if copy == 1 else "none")
                )
                listings.append(
                    {
                        "product_id": pid,
                        "title": f"{word} for sale",
                        "location": "Leeds",
                        "description": f"Good condition {word}.",
                        "category": f"{name} / Other",
                        "main_category": name,
                        "price": 10.0,
                        "currency": "GBP",
                        "price_flag": "",
                    }
                )
                if split == "none":
                    continue  # a listing without photos: extra text only
                image_id = f"img-{pid}"
                pixels = np.clip(np.array(colours[label]) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(data / "images" / f"{image_id}.jpg")
                images.append(
                    {
                        "image_id": image_id,
                        "product_id": pid,
                        "main_category": name,
                        "label": label,
                        "split": split,
                        "path": f"images/{image_id}.jpg",
                        "sha256": image_id,
                    }
                )
    write_prepared(data, pd.DataFrame(listings), pd.DataFrame(images), CategoryLabels(tuple(CATEGORIES)))
    model = ListingModel(get_backbone("efficientnet_lite0"), len(CATEGORIES), pretrained=False)
    save_artifact(artifact, model, CATEGORIES)
    return data, artifact, root / "cache"


@pytest.fixture(scope="module")
def trained(prepared):
    data, artifact, cache = prepared
    metrics = T.run(data, artifact, artifact, cache_dir=cache)
    return metrics


def test_run_writes_head_metrics_and_text_embeddings(prepared, trained):
    data, artifact, _ = prepared
    metrics = json.loads((artifact / TEXT_METRICS_FILE).read_text())
    assert metrics == json.loads(json.dumps(trained))
    assert metrics["split_listings"] == {"train": 18, "valid": 12, "test": 12, "no_photo": 6}
    assert set(metrics["top1"]) >= {"image", "text", "text+image"}
    assert metrics["text_heads"].keys() == {"train", "train+extra"}
    # the 6 photo-less listings repeat the text of test listings: dropped, never trained on
    assert metrics["extra_text"]["listings_without_photos"] == 6
    assert metrics["extra_text"]["dropped_near_duplicates_of_valid_test"] == 6
    assert metrics["text_heads"]["train+extra"]["train_listings"] == 18
    # the synthetic titles are easy for a sentence model; the untrained image model is noise
    assert metrics["top1"]["text"]["test"] >= 0.75
    assert metrics["top1"]["text+image"]["valid"] >= metrics["top1"]["image"]["valid"]
    vectors = np.load(artifact / EMBEDDINGS_DIR / TEXT_EMBEDDINGS_FILE)
    ids = json.loads((artifact / EMBEDDINGS_DIR / TEXT_IDS_FILE).read_text())
    assert vectors.shape == (48, TEXT_DIM) and vectors.dtype == np.float32 and len(ids) == 48
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    head = TextHead.load(artifact)
    assert head.categories == CATEGORIES and head.has_fusion
    card = json.loads((artifact / CARD_FILE).read_text())
    assert head.card["image_model_version"] == card["model_version"]
    assert not list(artifact.glob("*.pkl")) and not list(artifact.glob("*.pickle"))


def test_search_quality_benchmark_prints_the_result_line(prepared, trained, capsys):
    from benchmarks import search_quality

    data, artifact, cache = prepared
    assert (
        search_quality.main(
            ["--artifact", str(artifact), "--data", str(data), "--cache", str(cache), "--quick"]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    fields = dict(item.split("=") for item in out[-1].split()[1:])
    assert out[-1].startswith("RESULT ") and set(fields) == {"text_top1", "fused_top1", "text_p_at_10"}
    metrics = trained["top1"]
    assert float(fields["text_top1"]) == pytest.approx(metrics["text"]["test"], abs=1e-4)
    assert float(fields["fused_top1"]) == pytest.approx(metrics["text+image"]["test"], abs=1e-4)
    assert float(fields["text_p_at_10"]) > 0.5  # 12 test listings, 15 same-category others each


# ------------------------------------------------------------------ fine-tuned MiniLM


def _word_texts():
    texts, labels = [], []
    for label, name in enumerate(CATEGORIES):
        for word in WORDS[name]:
            texts += [f"{word} for sale", f"selling my {word}, collection only"]
            labels += [label, label]
    return texts, np.array(labels)


def test_finetune_lowers_the_loss_and_is_cached(tmp_path):
    from training.text_finetune import FinetuneConfig, finetune

    texts, labels = _word_texts()
    config = FinetuneConfig(epochs=3, batch_size=8, lr=2e-4, seed=0)
    model, history = finetune(
        texts,
        labels,
        CATEGORIES,
        valid_texts=texts[::2],
        valid_labels=labels[::2],
        config=config,
        cache_dir=tmp_path,
    )
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["valid_top1"] > 0.8
    again, cached_history = finetune(texts, labels, CATEGORIES, config=config, cache_dir=tmp_path)
    assert cached_history == json.loads(json.dumps(history))
    np.testing.assert_allclose(again.log_probs(texts[:6]), model.log_probs(texts[:6]), atol=1e-6)
    assert len(list(tmp_path.glob("text_finetuned_*.safetensors"))) == 1


def test_finetuned_state_of_another_shape_is_refused():
    from common.text import FineTunedTextClassifier, TextHeadError

    model = FineTunedTextClassifier(CATEGORIES)
    state = model.state()
    with pytest.raises(TextHeadError, match="does not fit .* 2 categories"):
        FineTunedTextClassifier(CATEGORIES[:2], state)
    del state["head.bias"]
    with pytest.raises(TextHeadError, match="head.bias|bias"):
        model.load_state(state)


def test_run_with_finetuning_exports_a_third_source(prepared, tmp_path, capsys):
    from benchmarks import search_quality

    data, artifact, cache = prepared
    out = tmp_path / "finetuned"
    shutil.copytree(artifact, out)  # the image model, with its own text head beside it
    metrics = T.run(data, out, out, cache_dir=cache, finetune_epochs=2)
    assert metrics["fusions"]["text"]["inputs"] == ["finetuned", "minilm", "tfidf"]
    assert metrics["fusions"]["text+image"]["inputs"] == ["finetuned", "minilm", "tfidf", "image"]
    assert {
        "text: MiniLM fine-tuned end to end",
        "text, frozen MiniLM + TF-IDF (fused)",
        "text+image, frozen MiniLM + TF-IDF + image (fused)",
    } <= set(metrics["top1"])
    assert [row["epoch"] for row in metrics["finetuned"]["history"]] == [1, 2]
    assert (out / TEXT_FINETUNED_FILE).is_file()
    assert (out / TEXT_FINETUNE_CURVE_FILE).stat().st_size > 1000
    head = TextHead.load(out)
    assert head.finetuned is not None and head.card["finetuned"]["epochs"] == 2
    with pytest.raises(ValueError, match="pass texts"):
        head.predict_text(np.zeros((1, TEXT_DIM)))
    # the files alone (the benchmark loads them) give the numbers training reported
    capsys.readouterr()
    assert (
        search_quality.main(["--artifact", str(out), "--data", str(data), "--cache", str(cache), "--quick"])
        == 0
    )
    fields = dict(item.split("=") for item in capsys.readouterr().out.split("\n")[-2].split()[1:])
    assert float(fields["text_top1"]) == pytest.approx(metrics["top1"]["text"]["test"], abs=1e-4)
    assert float(fields["fused_top1"]) == pytest.approx(metrics["top1"]["text+image"]["test"], abs=1e-4)


# ------------------------------------------------------------------ a new image model


def test_retraining_the_image_model_refits_the_text_heads_or_leaves_them_refused(
    prepared, trained, tmp_path, capsys
):
    """training.train refits the text heads and fusion of an artefact it retrains (they depend on
    the image model); told not to, the stale heads are refused at load with the command to run."""
    from common.text import TextHeadError
    from training import train as image_training
    from training.config import TrainConfig

    data, artifact, cache = prepared
    config = TrainConfig(
        name="tiny-probe",
        mode="probe",
        backbone="efficientnet_lite0",
        epochs=5,
        batch_size=8,
        lr=0.01,
        seed=3,
    )
    for text, out in (("auto", tmp_path / "auto"), ("no", tmp_path / "no")):
        shutil.copytree(artifact, out)
        old_version = TextHead.load(out).card["image_model_version"]
        card = image_training.run(config, data, out, cache_dir=cache, progress=False, text=text)
        assert card["model_version"] != old_version
        if text == "auto":
            head = TextHead.load(out)  # refit: no complaint
            assert head.card["image_model_version"] == card["model_version"]
            assert set(card["text_refit"]) >= {"text", "text+image"}
        else:
            assert "text_refit" not in card
            with pytest.raises(
                TextHeadError, match=f"python -m training.text --data build/data --artifact {out}"
            ):
                TextHead.load(out)
    # The refit artefact has image and text embeddings: SimilarListings quality through the real
    # services (weight chosen on valid), equal to the offline recomputation of the same rankings.
    from benchmarks import search_quality

    report = tmp_path / "similar.json"
    assert (
        search_quality.main(
            [
                "--artifact",
                str(tmp_path / "auto"),
                "--data",
                str(data),
                "--cache",
                str(cache),
                "--quick",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    fields = dict(item.split("=") for item in capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert {"similar_p_at_10", "similar_photos_p_at_10", "similar_text_weight"} <= set(fields)
    similar = json.loads(report.read_text())["similar"]
    assert similar["services"]["queries"] == 12  # every test listing (all have photos)
    assert 0 < similar["services"]["fused"] <= 1 and len(similar["valid_curve"]) == 11
    assert similar["services"]["fused"] == pytest.approx(similar["offline"]["fused"], abs=1e-6)
    assert similar["services"]["photos_only"] == pytest.approx(similar["offline"]["photos_only"], abs=1e-6)
    assert float(fields["similar_text_weight"]) in [round(0.1 * i, 1) for i in range(11)]
