"""common.images: untrusted bytes in, upright 8-bit RGB out, or a readable ImageError."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import ImageError, letterbox, open_image, to_rgb

SHARED_RAW_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "marketplace" / "raw_sample"


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (with a valid CRC) claims width x height pixels."""
    data = bytearray(encode(Image.new("L", (4, 4)), "PNG"))
    ihdr_start = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13]))
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def two_tone(width: int, height: int, first=(255, 0, 0), second=(0, 0, 255)) -> Image.Image:
    """Left half `first`, right half `second`."""
    img = Image.new("RGB", (width, height), second)
    img.paste(first, (0, 0, width // 2, height))
    return img


# ------------------------------------------------------------------ rejection


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"hello, this is not a picture", "not a recognised image"),
        (
            b"\xff\xd8\xff\xe0" + b"\x00" * 64,
            "unreadable|corrupt|not a recognised",
        ),  # JPEG magic, garbage body
    ],
)
def test_rejects_non_images(data: bytes, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        open_image(data)


def test_rejects_truncated_jpeg() -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    data = encode(noisy)
    with pytest.raises(ImageError, match="truncated"):
        open_image(data[: len(data) // 2])


def test_rejects_formats_outside_the_allow_list() -> None:
    ppm = encode(Image.new("RGB", (8, 8)), "PPM")
    with pytest.raises(ImageError, match="not a recognised image"):
        open_image(ppm)
    assert open_image(ppm, formats=("PPM",)).size == (8, 8)
    with pytest.raises(ValueError, match="no opener"):
        open_image(ppm, formats=("MPO",))


def test_max_bytes_for_bytes_and_paths(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (64, 64), (9, 9, 9)))
    path = tmp_path / "p.jpg"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        with pytest.raises(ImageError, match="over the limit"):
            open_image(source, max_bytes=len(data) - 1)
        assert open_image(source, max_bytes=len(data)).size == (64, 64)


def test_max_pixels_checked_from_header_before_decoding() -> None:
    # 2000 x 2000 claimed by a 4x4 PNG (under Pillow's own bomb limit): decoding would
    # fail, so a size message proves the check ran on the header first.
    with pytest.raises(ImageError, match="4,000,000 pixels, over the limit of 1,000,000"):
        open_image(png_claiming_size(2_000, 2_000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(png_claiming_size(2_000, 2_000))


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns at ~89 Mpx, errors at 2x
def test_decompression_bomb_is_an_image_error(side: int) -> None:
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(png_claiming_size(side, side))


def test_missing_file_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        open_image(tmp_path / "nope.jpg")
    with pytest.raises(TypeError):
        open_image(12345)  # type: ignore[arg-type]


# ------------------------------------------------------------------ conversion


def test_png_with_alpha_composited_on_black() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 0), (255, 255, 255, 128))  # half-transparent white
    rgba.putpixel((2, 0), (10, 200, 30, 255))  # opaque
    img = open_image(encode(rgba, "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert all(abs(c - 128) <= 1 for c in img.getpixel((1, 0)))
    assert img.getpixel((2, 0)) == (10, 200, 30)


def test_palette_and_la_transparency_on_black() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    img = open_image(encode(pal, "PNG", transparency=0))
    assert img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((1, 0)) == (0, 255, 0)
    la = Image.new("LA", (1, 1), (200, 0))
    assert open_image(encode(la, "PNG")).getpixel((0, 0)) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    img = open_image(encode(cyan))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r < 40 and g > 200 and b > 200


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 300, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    img = open_image(encode(img16, "PNG"))
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32), mode="I"), [0, 128, 255]),
        (Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F"), [0, 128, 255]),
        (Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32), mode="F"), [0, 128, 255]),
        (Image.new("1", (3, 1), 1), [255, 255, 255]),
        (Image.new("L", (3, 1), 77), [77, 77, 77]),
    ],
)
def test_to_rgb_modes(img: Image.Image, expected: list[int]) -> None:
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(3)] == expected


def test_exif_orientation_is_applied() -> None:
    # Stored landscape: red left, blue right.  Orientation 6 = "rotate 90 CW to view",
    # so the viewer sees a portrait photo with red on top.
    stored = two_tone(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    img = open_image(encode(stored, exif=exif.tobytes()))
    assert img.size == (40, 80)
    r, _, b = img.getpixel((20, 10))
    assert r > 200 and b < 60
    r, _, b = img.getpixel((20, 70))
    assert b > 200 and r < 60


@pytest.mark.skipif(
    not SHARED_RAW_SAMPLE.is_dir(), reason=f"real raw photos not present at {SHARED_RAW_SAMPLE}"
)
def test_real_raw_phone_photos_decode() -> None:
    """The shared raw photos include MPO files (phone JPEGs with extra frames)."""
    files = sorted(SHARED_RAW_SAMPLE.glob("*.jpg"))
    assert len(files) == 10
    for path in files:
        img = open_image(path, max_bytes=50 << 20, max_pixels=50_000_000)
        assert img.mode == "RGB" and 800 <= max(img.size) <= 1024


# ------------------------------------------------------------------ letterbox


def test_letterbox_geometry_landscape() -> None:
    """A 1024x512 photo becomes 512x256 pasted at y=128 on black."""
    out = letterbox(Image.new("RGB", (1024, 512), (255, 255, 255)), 512)
    arr = np.asarray(out)
    assert out.size == (512, 512) and out.mode == "RGB"
    assert arr[:128].max() == 0 and arr[384:].max() == 0
    assert arr[128:384].min() >= 250
    assert out.getbbox() == (0, 128, 512, 384)


def test_letterbox_geometry_portrait_and_odd_sizes() -> None:
    assert letterbox(Image.new("RGB", (512, 1024), "white")).getbbox() == (128, 0, 384, 512)
    # 1023 px: integer maths keeps the long side at exactly 512 (float int() gave 511).
    assert letterbox(Image.new("RGB", (1023, 1000), "white")).getbbox() == (0, 6, 512, 506)
    # small photos are scaled up, as in the original resize_image
    assert letterbox(Image.new("RGB", (100, 50), "white")).getbbox() == (0, 128, 512, 384)
    # a 1-pixel-wide sliver still gets one column
    assert letterbox(Image.new("RGB", (1, 10_000), "white")).getbbox() == (255, 0, 256, 512)


def test_letterbox_accepts_any_mode_and_keeps_squares() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    out = letterbox(rgba, 32)
    assert out.mode == "RGB" and out.size == (32, 32) and out.getbbox() is None
    square = Image.new("RGB", (512, 512), (1, 2, 3))
    assert letterbox(square).tobytes() == square.tobytes()
