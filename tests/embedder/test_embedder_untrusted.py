"""Untrusted uploads: every bad image is INVALID_ARGUMENT naming its index and the server goes
on serving; odd-but-valid images (CMYK, alpha, palette, 16-bit, grey, EXIF-rotated) are
converted correctly."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from marketplace.embedder.v1 import embedder_pb2
from tests.embedder.helpers import MAX_IMAGE_BYTES, cosine
from tests.support.photos import decode, encode
from tests.support.rpc import rpc_error

pytestmark = pytest.mark.timeout(120)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def grey_png(width: int, height: int, *, rows: int | None = None) -> bytes:
    """A black 8-bit grey PNG built by hand: ``rows`` rows of pixel data (all by default), so
    a huge picture costs a few kB: a decompression bomb, or with rows=0 a header-only lie."""
    rows = height if rows is None else rows
    raw = (b"\0" * (width + 1)) * rows  # filter byte + pixels per row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 9))
        + _png_chunk(b"IEND", b"")
    )


def bad_images(photo: bytes) -> dict[str, tuple[bytes, str]]:
    """Name -> (bytes, words the error must contain)."""
    return {
        "zero-byte": (b"", "empty"),
        "not an image": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n", "not a recognised image"),
        "refused format (EPS)": (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "not a recognised image",
        ),
        "JPEG magic then garbage": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "image"),
        "truncated JPEG": (photo[: len(photo) // 2], "truncated"),
        "over the byte limit": (photo + b"\0" * (MAX_IMAGE_BYTES + 1 - len(photo)), "over the limit"),
        "over the pixel limit (real bomb: 9 Mpx in kB)": (grey_png(3000, 3000), "over the limit"),
        "decompression bomb header (2.5 Gpx)": (grey_png(50000, 50000, rows=0), "decompression bomb"),
        "extreme aspect ratio": (grey_png(3000, 2), "elongated"),
    }


CASES = list(bad_images(b"\xff\xd8" * 10))


@pytest.mark.parametrize("case", CASES)
def test_bad_image_is_invalid_argument_naming_its_index_and_service_keeps_serving(stub, embed, photos, case):
    bad, words = bad_images(photos[0])[case]
    error = rpc_error(stub.Embed, embedder_pb2.EmbedRequest(images=[photos[1], bad]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "images[1]" in error.details() and "images[0]" not in error.details()
    assert words in error.details()
    assert embed([photos[0]]).shape == (1, 1280)  # the next request is served


def test_every_bad_index_is_named_in_classify_too(stub, photos):
    request = embedder_pb2.ClassifyRequest(images=[b"", photos[0], b"junk"])
    error = rpc_error(stub.Classify, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 of 3 images unusable" in error.details()
    assert "images[0]" in error.details() and "images[2]" in error.details()
    assert "images[1]" not in error.details()


def test_odd_modes_and_exif_orientation_are_converted_correctly(embed, photos):
    picture = decode(photos[0])
    grey = picture.convert("L")
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # I;16, same values
    rgba = picture.convert("RGBA")  # fully opaque
    palette = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    rotated = picture.transpose(Image.Transpose.ROTATE_90)  # as a sideways phone
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display upright
    variants = {
        "rgb": encode(picture, "PNG"),
        "cmyk": encode(picture.convert("CMYK"), "JPEG", quality=95),
        "rgba": encode(rgba, "PNG"),
        "palette": encode(palette, "PNG"),
        "grey8": encode(grey, "PNG"),
        "grey16": encode(grey16, "PNG"),
        "exif-rotated": encode(rotated, "JPEG", quality=95, exif=exif.tobytes()),
        "rotated-no-exif": encode(rotated, "JPEG", quality=95),
    }
    assert Image.open(io.BytesIO(variants["grey16"])).mode.startswith("I")
    assert Image.open(io.BytesIO(variants["cmyk"])).mode == "CMYK"
    got = dict(zip(variants, embed(list(variants.values()))))

    np.testing.assert_allclose(np.linalg.norm(np.stack(list(got.values())), axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(got["rgba"], got["rgb"], atol=1e-5)  # opaque alpha dropped
    np.testing.assert_allclose(got["grey16"], got["grey8"], atol=1e-5)  # 65535 -> 255
    assert cosine(got["cmyk"], got["rgb"]) > 0.95
    assert cosine(got["palette"], got["rgb"]) > 0.9  # 256 colours: near, not equal
    upright = cosine(got["exif-rotated"], got["rgb"])
    assert upright > 0.95
    assert upright > cosine(got["rotated-no-exif"], got["rgb"]) + 0.1  # sideways is far
