"""training.prepare: tabular cleaning, the join, photo cleaning, leak-free splits.

Small fixtures are built by the tests themselves; the last test runs against the
real shared data when it is present (and is skipped with a reason otherwise).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.support.photos import decode, real_photos
from training.prepare import cli, near_duplicates, photos, pipeline, splits, tables
from training.prepare.report import format_summary
from common.files import sha256_file
from common.prices import parse_price, price_flag
from common.prepared_data import IMAGE_COLUMNS, LISTING_COLUMNS, CategoryLabels, DataNotFoundError
from common.prepared_data.frames import load_prepared
from training.dataset import SHARED_DATA_DIR, data_dir_default

HEADER = ",id,product_name,category,product_description,price,location\n"


def listing_line(
    index: int,
    pid: str,
    title: str,
    category: str,
    description: str,
    price: str,
    town: str = "Leeds, West Yorkshire",
) -> str:
    """One raw Products.csv line in the course format: quoted only when it holds a
    comma, so a bare \r can sit unquoted, as in the real file."""
    name = f"{title} | in {town} | Gumtree"
    cells = [str(index), pid, name, category, description, price, town]
    return ",".join(f'"{c}"' if "," in c else c for c in cells) + "\n"


def jpeg(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **params)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ prices, titles


@pytest.mark.parametrize(
    "raw, value, currency",
    [
        ("£5.00", 5.0, "GBP"),
        ("£1,900.00", 1900.0, "GBP"),
        ("£10,000,000.00", 10_000_000.0, "GBP"),
        ("1,234", 1234.0, "GBP"),  # bare number: the default currency
        ("$25", 25.0, "USD"),
        ("€3.50", 3.5, "EUR"),
        ("25 GBP", 25.0, "GBP"),
        (" £0.00 ", 0.0, "GBP"),
        ("-£5", -5.0, "GBP"),
        ("Free", None, ""),
        ("£", None, ""),
        ("", None, ""),
        ("1,90", None, ""),  # a comma that is not a thousands separator
        ("£1,900.00 ono", None, ""),
    ],
)
def test_parse_price(raw: str, value: float | None, currency: str) -> None:
    parsed = parse_price(raw)
    assert (parsed.value, parsed.currency) == (value, currency)


@pytest.mark.parametrize(
    "value, flag",
    [
        (5.0, ""),
        (0.0, "zero"),
        (None, "unparseable"),
        (float("nan"), "unparseable"),
        (100_000.0, ""),
        (100_000.01, "absurd"),
        (-5.0, "absurd"),
    ],
)
def test_price_flag(value: float | None, flag: str) -> None:
    assert price_flag(value, absurd_price=100_000) == flag


def test_split_title_and_main_category() -> None:
    assert tables.split_title("Sofa | in Leeds, West Yorkshire | Gumtree") == (
        "Sofa",
        "Leeds, West Yorkshire",
    )
    assert tables.split_title("Desk | chair | in Bath | Gumtree") == ("Desk | chair", "Bath")
    assert tables.split_title("No suffix here") == ("No suffix here", None)
    assert tables.main_category_of("Home & Garden / Garden & Patio / Sheds") == "Home & Garden"
    assert tables.main_category_of("Other Goods") == "Other Goods"


# ------------------------------------------------------------------ reading and cleaning


def write_products(path: Path, lines: list[str]) -> None:
    path.write_bytes((HEADER + "".join(lines)).encode("utf-8"))


def test_row_broken_by_carriage_return_is_read_as_one_row(tmp_path: Path) -> None:
    path = tmp_path / "Products.csv"
    write_products(
        path,
        [
            listing_line(
                0, "p0", "Logs", "Home & Garden / Other", "Seasoned\rDumpy bags\rFree delivery", "£80.00"
            ),
            listing_line(
                1, "p1", "Table", "Home & Garden / Other", "Quoted, with comma\rand a CR", "£1,900.00"
            ),
            listing_line(2, "p2", "Lamp", "Home & Garden / Other", "plain", "£5.00"),
        ],
    )
    broken = pd.read_csv(path)  # the course's reader: \r ends a row
    assert len(broken) > 3 and broken.isna().any().any()
    raw, errors = tables.read_table(path, ["id", "price"])
    assert len(raw) == 3 and errors == []
    listings, report = tables.clean_listings(raw)
    assert report["dropped"] == []
    assert listings.loc[0, "description"] == "Seasoned\nDumpy bags\nFree delivery"
    assert listings["price"].tolist() == [80.0, 1900.0, 5.0]


def test_crlf_file_and_overlong_line_are_handled_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "Products.csv"
    body = HEADER + listing_line(0, "p0", "Lamp", "Appliances / Lamps", "ok", "£5.00")
    body += "1,p1,Extra | in Bath | Gumtree,Appliances,d,£1.00,Bath,UNEXPECTED\n"
    path.write_bytes(body.replace("\n", "\r\n").encode())
    raw, errors = tables.read_table(path, ["id", "location"])
    assert list(raw.columns)[-1] == "location" and raw.loc[0, "location"] == "Leeds, West Yorkshire"
    assert len(raw) == 1 and len(errors) == 1 and "expected 7 fields" in errors[0]


def test_clean_listings_drops_only_incomplete_rows_and_flags_prices(tmp_path: Path) -> None:
    path = tmp_path / "Products.csv"
    write_products(
        path,
        [
            listing_line(0, "p0", "Lamp", "Appliances / Lamps", "ok", "£5.00"),
            listing_line(1, "p1", "No category", "", "ok", "£5.00"),
            listing_line(2, "p2", "Free bed", "Home & Garden / Beds", "ok", "Free"),
            listing_line(3, "p3", "Bike", "Sports, Leisure & Travel / Bicycles", "ok", "£10,000,000.00"),
            listing_line(4, "p4", "Chair", "Home & Garden / Chairs", "", "£0.00"),
            listing_line(5, "p0", "Lamp again", "Appliances / Lamps", "dup", "£6.00"),
        ],
    )
    raw, _ = tables.read_table(path, ["id"])
    listings, report = tables.clean_listings(raw, absurd_price=100_000)
    assert list(listings.columns) == list(LISTING_COLUMNS)
    assert listings["product_id"].tolist() == ["p0", "p2", "p3", "p4"]
    reasons = {d["reason"]: (d["count"], d["examples"]) for d in report["dropped"]}
    assert reasons == {"missing category": (1, ["p1"]), "duplicate product_id (first kept)": (1, ["p0"])}
    by_id = listings.set_index("product_id")
    assert np.isnan(by_id.at["p2", "price"]) and by_id.at["p2", "price_flag"] == "unparseable"
    assert by_id.at["p2", "currency"] == ""
    assert by_id.at["p3", "price_flag"] == "absurd" and by_id.at["p4", "price_flag"] == "zero"
    assert by_id.at["p0", "title"] == "Lamp" and by_id.at["p0", "location"] == "Leeds, West Yorkshire"
    assert by_id.at["p3", "main_category"] == "Sports, Leisure & Travel"
    assert by_id.at["p3", "category"] == "Sports, Leisure & Travel / Bicycles"
    prices = report["prices"]
    assert (prices["unparseable"], prices["zero"], prices["absurd"]) == (1, 1, 1)
    assert prices["unparseable_examples"] == ["p2: 'Free'"]


def test_category_labels_round_trip(tmp_path: Path) -> None:
    labels = CategoryLabels.from_names(["b", "a", "c", "a"])
    labels.save(tmp_path / "labels.json")
    assert json.loads((tmp_path / "labels.json").read_text()) == {"version": 1, "categories": ["a", "b", "c"]}
    loaded = CategoryLabels.load(tmp_path / "labels.json")
    assert loaded.encode("c") == 2 and loaded.decode(0) == "a"
    with pytest.raises(KeyError):
        loaded.encode("zzz")


# ------------------------------------------------------------------ splits


def synthetic_images(n_listings: int = 200, seed: int = 0) -> pd.DataFrame:
    """Listings with 1-2 photos in 3 categories; a chain of re-posts shares photos."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_listings):
        for k in range(int(rng.integers(1, 3))):
            rows.append(
                {
                    "image_id": f"i{i}_{k}",
                    "product_id": f"p{i:03d}",
                    "main_category": "abc"[i % 3],
                    "sha256": f"h{i}_{k}",
                }
            )
    frame = pd.DataFrame(rows)
    # p000 ~ p001 share a photo, p001 ~ p002 share another: one unit of 3 listings
    frame.loc[frame["image_id"] == "i1_0", "sha256"] = "h0_0"
    frame.loc[frame["image_id"] == "i2_0", "sha256"] = "shared"
    frame.loc[frame["image_id"] == "i1_1", "sha256"] = "shared"
    if not (frame["image_id"] == "i1_1").any():
        frame.loc[len(frame)] = {
            "image_id": "i1_1",
            "product_id": "p001",
            "main_category": "b",
            "sha256": "shared",
        }
    return frame


def test_splits_group_reposts_stratify_and_are_reproducible() -> None:
    images = synthetic_images()
    images["split"] = splits.assign_splits(images, seed=7)
    splits.assert_no_leak(images)
    assert images.loc[images["product_id"].isin(["p000", "p001", "p002"]), "split"].nunique() == 1
    for _, group in images.groupby("main_category"):
        share = group["split"].value_counts(normalize=True)
        assert abs(share["train"] - 0.70) < 0.05 and abs(share["valid"] - 0.15) < 0.05
    assert splits.assign_splits(images, seed=7).equals(images["split"])
    assert not splits.assign_splits(images, seed=8).equals(images["split"])


def test_leak_check_catches_listing_and_photo_overlap() -> None:
    leaky = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "product_id": ["p1", "p1", "p2", "p3"],
            "sha256": ["x", "y", "z", "z"],
            "split": ["train", "test", "train", "valid"],
        }
    )
    assert splits.split_leaks(leaky) == {"listings_in_several_splits": 1, "photos_in_several_splits": 1}
    with pytest.raises(AssertionError, match="split leak"):
        splits.assert_no_leak(leaky)
    near = leaky.assign(
        sha256=["x", "y", "z", "w"],
        product_id=["p1", "p1", "p2", "p3"],
        photo_group=["x", "y", "z", "z"],
        split=["train", "train", "train", "valid"],
    )
    assert splits.split_leaks(near) == {
        "listings_in_several_splits": 0,
        "photos_in_several_splits": 0,
        "near_duplicate_groups_in_several_splits": 1,
    }
    with pytest.raises(AssertionError, match="near_duplicate_groups_in_several_splits"):
        splits.assert_no_leak(near)


# ------------------------------------------------------------------ near-duplicates


def product_shot(seed: int, size: int = 512) -> Image.Image:
    """A plain "product on a white background" photo: dark boxes at random places, the kind
    of generic shot whose thumbnails look alike and must not be chained together."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), 245, dtype=np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 3, 2)
        pixels[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 120, 3)
    return Image.fromarray(pixels)


def fingerprints(folder: Path, images: list[Image.Image], quality: int = 95) -> np.ndarray:
    """The photos saved as JPEGs in `folder` (new), fingerprinted from the files."""
    folder.mkdir()
    thumbs = []
    for k, img in enumerate(images):
        path = folder / f"f{k}.jpg"
        img.save(path, "JPEG", quality=quality)
        thumbs.append(np.frombuffer(photos.photo_fingerprint(path), dtype=np.uint8).reshape(32, 32))
    return np.stack(thumbs)


def test_near_duplicate_photos_survive_resizing_and_reencoding_but_generic_shots_do_not_chain(
    tmp_path: Path,
) -> None:
    originals = [decode(b) for b in real_photos(4)]
    # Each real photo at its own size and again as the data's 320 px quality-75 copy.
    resized = [img.resize((320, 320), Image.Resampling.LANCZOS) for img in originals]
    thumbs = np.concatenate(
        [fingerprints(tmp_path / "a", originals), fingerprints(tmp_path / "b", resized, quality=75)]
    )
    pairs = {tuple(p) for p in near_duplicates.near_duplicate_photo_pairs(thumbs).tolist()}
    assert pairs == {(k, k + 4) for k in range(4)}

    # Twelve different white-background shots, a flat white photo twice and a darkened copy of
    # one shot: nothing pairs up (flat photos have no structure to compare, and brightness is
    # part of what a copy must keep).
    shots = [product_shot(seed) for seed in range(12)]
    white = Image.new("RGB", (512, 512), (250, 250, 250))
    darker = Image.fromarray((np.asarray(shots[0]) * 0.6).astype(np.uint8))
    generic = fingerprints(tmp_path / "c", shots + [white, white, darker])
    assert near_duplicates.near_duplicate_photo_pairs(generic).tolist() == []
    # The same shots re-encoded at 320 px pair with their originals only.
    small = fingerprints(
        tmp_path / "d", [s.resize((320, 320), Image.Resampling.LANCZOS) for s in shots], quality=75
    )
    both = {
        tuple(p)
        for p in near_duplicates.near_duplicate_photo_pairs(np.concatenate([generic[:12], small])).tolist()
    }
    assert both == {(k, k + 12) for k in range(12)}
    assert near_duplicates.near_duplicate_photo_pairs(generic[:1]).shape == (0, 2)


def test_near_duplicate_texts_are_reposts_not_a_shops_shared_signature() -> None:
    signature = (
        "Specialists in graded and refurbished appliances, every item tested and guaranteed "
        "for twelve months, delivery across the city, open seven days, call the shop today."
    )
    texts = [
        "Bosch washing machine 8kg, white, A+++ rated, hardly used, collection from Leeds. " + signature,
        "Bosch washing machine 8kg white, A+++ rated, hardly used, collection from Leeds! " + signature,
        "Hotpoint fridge freezer, silver, frost free, 70cm wide. " + signature,
        "Children's bike with stabilisers, red, age 4-6, good condition.",
        "",
        "",
    ]
    assert near_duplicates.near_duplicate_text_pairs(texts).tolist() == [[0, 1]]
    assert near_duplicates.near_duplicate_text_pairs(texts, min_cosine=0.5).tolist() == [
        [0, 1],
        [0, 2],
        [1, 2],
    ]
    listings = pd.DataFrame(
        {"product_id": ["a", "b", "c", "d", "e", "f"], "title": texts, "description": [""] * 6}
    )
    assert near_duplicates.near_duplicate_text_links(listings) == [("a", "b")]


def test_splits_keep_near_duplicate_photos_and_reposted_texts_together() -> None:
    images = synthetic_images(300)
    images["photo_group"] = images["sha256"]
    # p010's photo re-encoded in p200 (another sha256, one near-duplicate group); p020 re-posted as p210.
    images.loc[images["image_id"] == "i200_0", "photo_group"] = "h10_0"
    links = [("p020", "p210"), ("p020", "missing")]
    apart = sum(
        splits.assign_splits(images.drop(columns="photo_group"), seed=seed)
        .groupby(images["product_id"])
        .first()
        .loc[["p010", "p200"]]
        .nunique()
        > 1
        for seed in range(10)
    )
    assert apart > 0  # grouped by sha256 alone, the two listings often land in different splits
    for seed in range(10):
        split = splits.assign_splits(images, seed=seed, links=links)
        of = split.groupby(images["product_id"]).first()
        assert of["p010"] == of["p200"] and of["p020"] == of["p210"]
        splits.assert_no_leak(images.assign(split=split))
    units = splits.split_units(images, links)
    assert units[images["product_id"] == "p200"].iloc[0] == "p010"
    assert units[images["product_id"] == "p210"].iloc[0] == "p020"


# ------------------------------------------------------------------ end to end


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    """A data folder with every kind of awkward photo the issue lists."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    categories = ["Appliances / Fridges", "Home & Garden / Sheds", "Other Goods / Misc"]
    lines = [
        listing_line(i, f"p{i:02d}", f"Item {i}", categories[i % 3], "d", f"£{i},000.00") for i in range(12)
    ]
    lines.append(listing_line(12, "p12", "No photo row", categories[0], "d", "£1.00"))
    lines.append(listing_line(13, "p13", "Missing category", "", "d", "£1.00"))
    write_products(data / "Products.csv", lines)

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    portrait_exif = Image.Exif()
    portrait_exif[0x0112] = 6  # stored landscape, shown portrait
    top_left = Image.new("RGB", (512, 512))
    top_left.paste(Image.new("RGB", (512, 256), (255, 255, 255)), (0, 0))
    files = {
        "i00a.jpg": jpeg(Image.new("RGB", (1024, 512), (200, 30, 30))),
        "i00b_resized.jpg": jpeg(top_left),  # course-style 512x512, letterboxed top-left
        "i01a.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg",  # corrupt
        "i01b.jpg": jpeg(noise)[:3000],  # truncated
        "i02a.png": png(Image.new("RGBA", (64, 32), (0, 255, 0, 128))),
        "i03a.jpg": jpeg(Image.new("CMYK", (50, 80), (0, 255, 255, 0))),
        "i04a.jpg": jpeg(Image.new("RGB", (80, 40), (0, 0, 255)), exif=portrait_exif.tobytes()),
        "i05a.jpg": jpeg(noise),
        "i06a.jpg": jpeg(noise),  # byte-identical to i05a: p05 and p06 must share a split
        "stray.txt": b"not a photo name",
        "i99a.jpg": jpeg(noise.rotate(90)),  # a file without an Images.csv row
    }
    for name, data_bytes in files.items():
        (data / "images" / name).write_bytes(data_bytes)
    for i in range(8, 12):  # plain photos for the remaining listings
        (data / "images" / f"i{i:02d}a.jpg").write_bytes(
            jpeg(Image.new("RGB", (60 + i, 40), (i * 20, 90, 90)))
        )
    top_left_320 = Image.new("RGB", (320, 320))
    top_left_320.paste(Image.new("RGB", (320, 160), (255, 255, 255)), (0, 0))
    (data / "images" / "i07a_resized.jpg").write_bytes(jpeg(top_left_320))  # the data's 320 px re-encodings

    image_rows = [(f"i{i:02d}a", f"p{i:02d}") for i in range(12)]
    image_rows += [("i00b", "p00"), ("i01b", "p01"), ("i07b", "p07"), ("i13a", "p13"), ("iXXa", "nobody")]
    pd.DataFrame(image_rows, columns=["id", "product_id"]).to_csv(data / "Images.csv")
    return data


def test_prepare_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = pipeline.prepare(tiny_data, out, workers=2, progress=False, samples_per_category=2)

    listings, images, categories = load_prepared(out, check_files=True)
    assert list(listings.columns) == list(LISTING_COLUMNS) and list(images.columns) == list(IMAGE_COLUMNS)
    assert categories == ["Appliances", "Home & Garden", "Other Goods"]
    assert len(listings) == 13 and "p13" not in set(listings["product_id"])
    assert summary.listings.dropped[0]["reason"] == "missing category"

    join = summary.join
    assert join["image_rows"] == 17 and join["image_rows_without_listing"] == 2  # p13 dropped, "nobody"
    assert join["image_rows_with_file"] == 14 and join["image_rows_without_file"] == 1  # i07b
    assert join["listings_without_image_rows"] == 1 and join["files_without_image_row"] == 1
    assert join["files_ignored_by_name"] == 1

    failed = {f["image_id"] for f in summary.photos.failed_list}
    assert failed == {"i01a", "i01b"}
    assert set(images["image_id"]) == {r for r in [f"i{i:02d}a" for i in range(12)] + ["i00b"]} - failed
    assert all(images["label"] == images["main_category"].map(categories.index))
    assert images["path"].tolist() == [f"images/{i}.jpg" for i in images["image_id"]]

    def photo(image_id: str, side: int) -> np.ndarray:
        """The cleaned photo: a square of the source's longest side, at most 512 (never scaled up)."""
        with Image.open(out / "images" / f"{image_id}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (side, side))
            return np.asarray(img)

    wide = photo("i00a", 512)  # 1024x512 -> 512x256 at y=128
    assert wide[:120].max() < 10 and wide[136:376].min(axis=(0, 1))[0] > 150 and wide[392:].max() < 10
    recentred = photo("i00b", 512)  # content moved from the top to the middle
    assert recentred[:120].max() < 10 and recentred[136:376].min() > 240 and recentred[392:].max() < 10
    small = photo("i07a", 320)  # a 320 px course photo: re-centred too, and kept at 320 px
    assert small[:70].max() < 10 and small[90:230].min() > 240 and small[250:].max() < 10
    alpha = photo("i02a", 64)  # half-transparent green on black, 64x32
    assert abs(int(alpha[32, 32, 1]) - 128) < 6 and alpha[32, 32, 0] < 6 and alpha[4, 32].max() < 10
    cmyk = photo("i03a", 80)  # red in CMYK, portrait 50x80 -> pillarbox
    assert cmyk[40, 40, 0] > 200 and cmyk[40, 40, 2] < 60 and cmyk[40, 3].max() < 10
    rotated = photo("i04a", 80)  # landscape pixels + orientation 6 -> portrait: black left/right
    assert rotated[40, 3].max() < 10 and rotated[40, 40, 2] > 200
    assert photo("i05a", 400).shape == (400, 400, 3)  # 400x300

    split_of = images.set_index("image_id")["split"]
    assert split_of["i05a"] == split_of["i06a"]  # byte-identical photos, two listings
    assert summary.splits.leaks["listings_in_several_splits"] == 0
    assert summary.splits.leaks["photos_in_several_splits"] == 0
    assert summary.duplicates["groups_spanning_listings"] == 1
    assert json.loads((out / "summary.json").read_text())["photos"]["failed"] == 2
    assert (out / "samples.png").stat().st_size > 0
    assert "missing category" in format_summary(summary)

    # A re-run reuses every finished photo and gives the same tables.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    first_images = (out / "images.csv").read_bytes()
    again = pipeline.prepare(tiny_data, out, workers=1, progress=False, samples_per_category=2)
    assert again.photos.skipped_already_done == len(images)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert (out / "images.csv").read_bytes() == first_images


def test_data_dir_default_and_cli_explain_what_is_missing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="Pass DATA=/path or --data"):
        data_dir_default()
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "Products.csv").write_text(HEADER)
    assert cli.main(["--data", str(tmp_path / "partial"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Images.csv" in err and "images/" in err and "--data" in err


# ------------------------------------------------------------------ the real data


@pytest.mark.skipif(
    not (SHARED_DATA_DIR / "Products.csv").is_file(), reason=f"shared data not present at {SHARED_DATA_DIR}"
)
def test_real_shared_data_reads_joins_and_splits_without_leaks() -> None:
    """Tables plus file hashes (no re-encoding), so it runs in a few seconds."""
    raw, errors = tables.read_table(
        SHARED_DATA_DIR / "Products.csv", ["id", "product_name", "category", "price"]
    )
    assert len(raw) == 7156 and errors == []
    listings, report = tables.clean_listings(raw)
    assert len(listings) == 7156 and report["dropped"] == []
    assert report["distinct_category_paths"] == 435
    assert report["prices"]["zero"] == 92 and report["prices"]["unparseable"] == 0
    assert listings["main_category"].value_counts().to_dict() == {
        "Home & Garden": 834,
        "Office Furniture & Equipment": 647,
        "Computers & Software": 619,
        "Music, Films, Books & Games": 618,
        "Health & Beauty": 613,
        "DIY Tools & Materials": 543,
        "Other Goods": 531,
        "Appliances": 521,
        "Video Games & Consoles": 515,
        "Sports, Leisure & Travel": 465,
        "Phones, Mobile Phones & Telecoms": 440,
        "Clothes, Footwear & Accessories": 413,
        "Baby & Kids Stuff": 397,
    }

    image_rows, _ = tables.read_table(SHARED_DATA_DIR / "Images.csv", ["id", "product_id"])
    files, _ = tables.find_image_files(SHARED_DATA_DIR / "images")
    joined, join = tables.join_images(image_rows, listings, files)
    # Expected photo counts come from the data's own manifest (one row per file in images/), so the
    # test follows the shared folder as it grows instead of pinning one release of it.
    manifest = pd.read_csv(SHARED_DATA_DIR / "images_manifest.csv", dtype=str)
    assert len(manifest) == len(files)
    assert (join["image_rows"], join["image_rows_joined"], join["image_rows_with_file"]) == (
        12604,
        12604,
        len(manifest),
    )
    assert join["listings_without_image_rows"] == 104
    assert joined["product_id"].nunique() == manifest["product_id"].nunique()
    assert (
        joined["main_category"].value_counts().to_dict() == manifest["main_category"].value_counts().to_dict()
    )

    joined["sha256"] = [sha256_file(p) for p in joined["source"]]
    joined["blob"] = joined["image_id"].map(manifest.set_index("image_id")["git_blob_sha1"])
    assert joined["blob"].notna().all()
    # Our SHA-256 duplicate groups refine the manifest's independent git blob hashes: each
    # byte-identical group is one source photo. A source photo kept once at 512 px and once
    # re-encoded at 320 px has two SHA-256s, so byte hashes alone let it span two splits.
    assert (joined.groupby("sha256")["blob"].nunique() == 1).all()
    assert joined.groupby("sha256").size().max() > 1  # byte-identical re-posts are still found
    by_bytes = joined.assign(split=splits.assign_splits(joined.drop(columns="blob")))
    assert (by_bytes.groupby("blob")["split"].nunique() > 1).sum() > 0  # the leak this test guards

    thumbs = np.stack(
        [np.frombuffer(photos.photo_fingerprint(p), dtype=np.uint8).reshape(32, 32) for p in joined["source"]]
    )
    pairs = near_duplicates.near_duplicate_photo_pairs(thumbs)
    joined["photo_group"] = near_duplicates.photo_groups(joined.drop(columns="blob"), pairs)
    # Every source photo (blob) falls inside one near-duplicate group ...
    assert (joined.groupby("blob")["photo_group"].nunique() == 1).all()
    # ... and the groups do not chain unrelated photos: a group holds at most a few source photos
    # (re-uploads and bursts of one shot), although the hash alone matches many more pairs.
    groups = joined.groupby("photo_group").agg(photos=("image_id", "size"), sources=("blob", "nunique"))
    assert groups["sources"].max() <= 4 and groups["photos"].max() <= 20
    hashes = near_duplicates._as_uint64(near_duplicates.perceptual_hashes(thumbs))
    hash_only = sum(
        int(
            (
                (np.bitwise_count(hashes[i] ^ hashes[i + 1 :]) <= near_duplicates.NEAR_DUPLICATE_HAMMING)
                & (joined["blob"].to_numpy()[i + 1 :] != joined["blob"].iat[i])
            ).sum()
        )
        for i in range(len(joined))
    )
    confirmed_other = int(
        (joined["blob"].to_numpy()[pairs[:, 0]] != joined["blob"].to_numpy()[pairs[:, 1]]).sum()
    )
    assert hash_only > 2 * confirmed_other  # the confirmation step is what stops the chaining

    photographed = listings[listings["product_id"].isin(set(joined["product_id"]))]
    links = near_duplicates.near_duplicate_text_links(photographed)
    assert len(links) > 50
    joined["split"] = splits.assign_splits(joined, links=links)
    splits.assert_no_leak(joined)
    assert (joined.groupby("blob")["split"].nunique() > 1).sum() == 0  # no source photo in two splits
    split_of = joined.groupby("product_id")["split"].first()
    assert all(split_of[a] == split_of[b] for a, b in links)  # re-posted texts on one side
    by_split = {s: set(g["product_id"]) for s, g in joined.groupby("split")}
    assert not (
        by_split["train"] & by_split["valid"]
        or by_split["train"] & by_split["test"]
        or by_split["valid"] & by_split["test"]
    )
    units = splits.split_units(joined, links)
    assert joined.groupby(units)["product_id"].nunique().max() <= 20  # no runaway unit

    assert len(joined) == len(manifest) and joined["product_id"].nunique() == len(photographed)
    share = joined["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.70) < 0.01 and abs(share["valid"] - 0.15) < 0.01
