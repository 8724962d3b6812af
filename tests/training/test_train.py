"""training.train / features / evaluate / export on a tiny synthetic prepared set (seconds), plus
one forward pass of the real pretrained backbone on a real photo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.artifact import (
    CARD_FILE,
    CONFUSION_MATRIX_FILE,
    EMBEDDED_IMAGES_FILE,
    EMBEDDINGS_DIR,
    IMAGE_EMBEDDINGS_FILE,
    IMAGE_EMBEDDINGS_JSON_FILE,
    IMAGE_IDS_FILE,
    LABELS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    TRAINING_CURVES_FILE,
    TRAIN_CONFIG_FILE,
    WEIGHTS_FILE,
)
from common import backbones
from common.backbones import SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, Backbone, Preprocessing, get_backbone
from common.model import load_artifact
from tests.training.tiny_data import CATEGORIES, make_tiny_prepared
from training import train as T
from training.config import TrainConfig, load_config, preset
from training.dataset import load_training_photos
from training.evaluate import classification_metrics, listing_votes, precision_at_k, same_listing_recall
from training.features import FeatureExtractor, FrozenPrefix, TrainableSuffix, backbone_blocks, cut_for

#: Pretrained Lite0 weights at a 64 px input: the real code paths at a twelfth of the cost.
TINY = "tiny_lite0"
TINY_PROBE = dict(name="tiny-probe", mode="probe", backbone=TINY, epochs=30, batch_size=8, lr=0.01, seed=3)
TINY_FINETUNE = dict(
    name="tiny-ft",
    mode="finetune",
    backbone=TINY,
    unfrozen_blocks=2,
    aug_views=1,
    epochs=4,
    batch_size=6,
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    init_head_from_probe=True,
    label_smoothing=0.0,
    seed=3,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def tiny_backbone():
    lite0 = backbones.REGISTRY["efficientnet_lite0"]
    tiny = Backbone(
        TINY,
        lite0.embedding_dim,
        Preprocessing(72, 64, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD),
        lite0.build,
        lite0.build_imagenet,
    )
    backbones.REGISTRY[TINY] = tiny
    yield tiny
    del backbones.REGISTRY[TINY]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_prepared(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def photos(tiny):
    return load_training_photos(tiny)


# ------------------------------------------------------------------ the pretrained backbone


def test_pretrained_lite0_calls_the_coffee_photo_espresso():
    """Proves weights *and* preprocessing: a wrong normalisation or a shuffled weight file does not
    give ImageNet class 967 (espresso) for scikit-image's coffee photo."""
    skimage_data = pytest.importorskip("skimage.data")
    backbone = get_backbone("efficientnet_lite0")
    model = backbone.build_imagenet().eval()
    photo = Image.fromarray(skimage_data.coffee())
    with torch.inference_mode():
        logits = model(backbone.preprocessing.transform()(photo)[None])
    assert int(logits.argmax()) == 967
    assert float(logits.softmax(1)[0, 967]) > 0.3


# ------------------------------------------------------------------ backbone split and cache


def test_frozen_prefix_then_trainable_suffix_equals_the_whole_backbone():
    features = get_backbone("efficientnet_lite0").build(False).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        whole = features(x)
        for unfrozen in (0, 3, 16):
            cut = cut_for(features, unfrozen)
            split = TrainableSuffix(features, cut)(FrozenPrefix(features, cut)(x))
            torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    assert len(backbone_blocks(features)) == 16
    with pytest.raises(ValueError):
        cut_for(features, 17)


def test_suffix_shares_parameters_with_the_backbone():
    features = get_backbone("efficientnet_lite0").build(False)
    suffix = TrainableSuffix(features, cut_for(features, 2))
    ids = {id(p) for p in features.parameters()}
    assert all(id(p) in ids for p in suffix.parameters())


class CountingExtractor(FeatureExtractor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.computed = 0

    def _compute(self, paths, keys, *args, **kwargs):
        self.computed += len(paths)
        return super()._compute(paths, keys, *args, **kwargs)


def test_feature_cache_computes_each_photo_once_and_notices_changed_bytes(photos, tmp_path):
    backbone = get_backbone(TINY)
    files, keys = photos.files[:4], photos.keys[:4]
    first = CountingExtractor(backbone, cache_dir=tmp_path, progress=False)
    a = first.get(files, keys, "center", ("pooled", "cut15"))
    assert first.computed == 4 and a["pooled"].shape == (4, 1280) and a["cut15"].dtype == np.float16
    again = CountingExtractor(backbone, cache_dir=tmp_path, progress=False)
    b = again.get(files, keys, "center", ("pooled", "cut15"))
    assert again.computed == 0
    np.testing.assert_array_equal(a["pooled"], b["pooled"])
    changed = keys[:3] + ["another-photo-content"]
    again.get(files, changed, "center", ("pooled",))
    assert again.computed == 1
    # augmented views are reproducible, and differ from the centre view
    aug1 = again.get(files[:2], keys[:2], "aug0", ("pooled",))["pooled"]
    aug2 = CountingExtractor(backbone, cache_dir=None, progress=False).get(
        files[:2], keys[:2], "aug0", ("pooled",)
    )["pooled"]
    np.testing.assert_allclose(aug1, aug2, rtol=1e-4, atol=1e-5)
    assert not np.allclose(aug1, a["pooled"][:2], atol=1e-3)


# ------------------------------------------------------------------ training


def test_probe_head_loss_goes_down_and_learns(photos, cache):
    result = T.fit(TrainConfig(**TINY_PROBE), photos, cache_dir=cache, progress=False)
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    test = photos.mask("test")
    accuracy = (result.logits[test].argmax(1) == photos.labels[test]).mean()
    assert accuracy >= 0.8
    norms = np.linalg.norm(result.embeddings, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_finetune_last_blocks_loss_goes_down_and_changes_only_those_blocks(photos, cache):
    config = TrainConfig(**TINY_FINETUNE)
    before = get_backbone(config.backbone).build(True).state_dict()
    result = T.fit(config, photos, cache_dir=cache, progress=False)
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    assert losses[-1] < losses[0]
    after = result.model.features.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert all(k.startswith(("blocks.6.", "blocks.5.3.", "conv_head", "bn2")) for k in changed), changed
    # the final outputs come from a fresh pass of the trained model, not the cache
    test = photos.mask("test")
    assert (result.logits[test].argmax(1) == photos.labels[test]).mean() >= 0.8


# ------------------------------------------------------------------ export and reload


def test_export_then_load_gives_identical_predictions_and_reruns_are_cached(tiny, cache, tmp_path):
    out = tmp_path / "artefact"
    config = TrainConfig(**TINY_PROBE)
    card = T.run(config, tiny, out, cache_dir=cache, progress=False)
    assert card["up_to_date"] is False
    for name in (
        CARD_FILE,
        WEIGHTS_FILE,
        LABELS_FILE,
        METRICS_FILE,
        TRAIN_CONFIG_FILE,
        PREDICTIONS_FILE,
        CONFUSION_MATRIX_FILE,
        TRAINING_CURVES_FILE,
        f"{EMBEDDINGS_DIR}/{IMAGE_EMBEDDINGS_FILE}",
        f"{EMBEDDINGS_DIR}/{IMAGE_IDS_FILE}",
        f"{EMBEDDINGS_DIR}/{IMAGE_EMBEDDINGS_JSON_FILE}",
        f"{EMBEDDINGS_DIR}/{EMBEDDED_IMAGES_FILE}",
    ):
        assert (out / name).is_file(), name
    card = json.loads((out / CARD_FILE).read_text())
    for key in (
        "backbone",
        "input_size",
        "preprocessing",
        "embedding_dim",
        "metrics",
        "data_fingerprint",
        "created",
        "train_config",
        "model_version",
    ):
        assert key in card, key
    assert card["categories"] == list(CATEGORIES)
    load_file(str(out / WEIGHTS_FILE))  # plain tensors, no pickle

    artifact = load_artifact(out)
    ids = json.loads((out / EMBEDDINGS_DIR / IMAGE_IDS_FILE).read_text())
    stored = np.load(out / EMBEDDINGS_DIR / IMAGE_EMBEDDINGS_FILE)
    baseline_format = json.loads((out / EMBEDDINGS_DIR / IMAGE_EMBEDDINGS_JSON_FILE).read_text())
    assert list(baseline_format) == ids and stored.shape == (len(ids), card["embedding_dim"])
    np.testing.assert_allclose(np.asarray(baseline_format[ids[0]]), stored[0], rtol=1e-5, atol=1e-6)

    transform = artifact.preprocessing.transform()
    batch = torch.stack([transform(Image.open(tiny / "images" / f"{i}.jpg").convert("RGB")) for i in ids])
    with torch.inference_mode():
        embeddings, logits = artifact.model.embed_and_classify(batch)
    np.testing.assert_allclose(embeddings.numpy(), stored, atol=2e-4)
    predictions = __import__("pandas").read_csv(out / PREDICTIONS_FILE)
    assert [CATEGORIES[i] for i in logits.argmax(1).tolist()] == predictions["predicted"].tolist()

    again = T.run(config, tiny, out, cache_dir=cache, progress=False)
    assert again["up_to_date"] is True and again["model_version"] == card["model_version"]
    changed = T.run(config.with_overrides(epochs=5), tiny, out, cache_dir=cache, progress=False)
    assert changed["up_to_date"] is False


def test_cli_probe_writes_an_artefact(tiny, cache, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        T.main(
            [
                "--data",
                str(tiny),
                "--out",
                str(out),
                "--cache",
                str(cache),
                "--no-progress",
                "--set",
                "epochs=5",
            ]
        )
        == 0
    )
    assert "artefact:" in capsys.readouterr().out
    assert json.loads((out / CARD_FILE).read_text())["train_config"]["epochs"] == 5


# ------------------------------------------------------------------ configs


def test_presets_and_config_files(tmp_path):
    original = preset("original")
    assert (original.optimizer, original.lr, original.momentum, original.epochs) == ("sgd", 0.001, 0.8, 3)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "probe", "epochs": 7}))
    assert load_config(path).epochs == 7 and load_config(path).mode == "probe"
    path.write_text(json.dumps({"epoch": 7}))
    with pytest.raises(ValueError, match="unknown"):
        load_config(path)
    with pytest.raises(ValueError):
        TrainConfig(mode="nonsense")


# ------------------------------------------------------------------ metrics


def test_listing_votes_and_classification_metrics():
    probs = np.array([[0.6, 0.4], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([1, 1, 1, 0])
    listings = ["a", "a", "b", "c"]
    voted, voted_labels, ids = listing_votes(probs, labels, listings)
    assert ids == ["a", "b", "c"] and voted_labels.tolist() == [1, 1, 0]
    np.testing.assert_allclose(voted[0], [0.35, 0.65])
    metrics = classification_metrics(probs, labels, listings, ["x", "y"])
    assert metrics["image_top1"] == 0.75 and metrics["listing_top1"] == 1.0
    assert metrics["confusion_matrix"] == [[1, 0], [1, 2]]
    assert metrics["per_class"]["x"]["precision"] == 0.5 and metrics["per_class"]["y"][
        "recall"
    ] == pytest.approx(2 / 3, abs=1e-3)


def test_retrieval_metrics_on_hand_made_embeddings():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.6]], dtype=float)
    labels = np.array([0, 0, 1, 1, 0])
    listings = np.array(["a", "a", "b", "c", "c"])
    query = np.array([False, False, True, True, True])
    index = ~query
    assert precision_at_k(emb, labels, query, index, k=1) == pytest.approx(1 / 3)
    recall = same_listing_recall(emb, listings, query, ks=(1, 2))
    # photo 3 (listing c): nearest 2 (b), then 4 (c); photo 4: nearest 1, 0, then 3
    assert recall[1] == 0.0 and recall[2] == 0.5


def test_search_grid_and_table():
    from training.search import DEFAULT_BASE, format_table, trials

    configs = trials(TrainConfig.from_dict(DEFAULT_BASE), {"lr": [0.003, 0.01], "unfrozen_blocks": [1, 4]})
    assert [(c.lr, c.unfrozen_blocks) for c in configs] == [(0.003, 1), (0.003, 4), (0.01, 1), (0.01, 4)]
    assert all(c.mode == "finetune" and c.optimizer == "sgd" for c in configs)
    table = format_table(
        [
            {
                "trial": 1,
                "unfrozen_blocks": 4,
                "lr": 0.01,
                "momentum": 0.9,
                "epochs": 6,
                "best_epoch": 5,
                "valid_image_top1": 0.55,
                "valid_listing_top1": 0.58,
                "minutes": 3.0,
            }
        ]
    )
    assert "valid img top-1" in table and "0.550" in table
