"""Image and caption decoding: exact pixels for transparency, a classified error for each bad input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clipkit.data.decode import SampleError, decode_caption, decode_image, parse_idx


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_declaring_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (no pixel data needed to trip the check)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))


def kind_of(fn, *args, **kw) -> str:
    with pytest.raises(SampleError) as err:
        fn(*args, **kw)
    return err.value.kind


# ---------------------------------------------------------------------------- transparency


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[1, 0] = (0, 0, 255, 255)  # opaque blue stays blue
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 1].tolist())
    assert out[1, 0].tolist() == [0, 0, 255]


def test_la_and_palette_transparency_are_composited_on_white():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")  # transparent, opaque black
    assert np.asarray(decode_image(encode(la)))[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette entry 0 (black) is transparent
    assert np.asarray(decode_image(encode(pal, transparency=0)))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_grayscale_and_cmyk_jpeg_become_rgb():
    assert decode_image(encode(Image.new("L", (4, 4), 7))).mode == "RGB"
    assert decode_image(encode(Image.new("CMYK", (4, 4)), "JPEG")).mode == "RGB"
    assert decode_image(encode(Image.new("RGB", (4, 4)), "WEBP")).size == (4, 4)


def test_jpeg_draft_downscales_but_never_below_the_target():
    big = encode(Image.new("RGB", (1024, 768), (10, 200, 30)), "JPEG")
    assert decode_image(big).size == (1024, 768)
    # min(1024 // 224, 768 // 224) = 3 -> PIL picks scale 1/2: both sides stay >= 224.
    assert decode_image(big, draft_size=224).size == (512, 384)
    assert decode_image(big, draft_size=100).size == (256, 192)  # 1/4, still >= 100
    png = encode(Image.new("RGB", (1024, 768)))
    assert decode_image(png, draft_size=224).size == (1024, 768)  # draft is JPEG-only


# ---------------------------------------------------------------------------- bad images


def test_each_bad_image_gets_its_kind():
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)))
    assert kind_of(decode_image, None) == "missing_image"
    assert kind_of(decode_image, b"") == "empty_image"
    assert kind_of(decode_image, b"this is not an image at all") == "decode_error"
    assert kind_of(decode_image, good[: len(good) // 2]) == "decode_error"  # truncated
    jpeg = encode(Image.new("RGB", (64, 64)), "JPEG")
    assert kind_of(decode_image, jpeg[:200]) == "decode_error"


def test_decompression_bombs_are_refused_before_decoding():
    # Over twice PIL's MAX_IMAGE_PIXELS: PIL raises DecompressionBombError at open.
    assert kind_of(decode_image, png_declaring_size(100_000, 100_000)) == "image_too_large"
    # Between 1x and 2x: PIL only warns; we refuse it too.
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    assert kind_of(decode_image, png_declaring_size(limit // 10_000 + 1, 10_000)) == "image_too_large"
    # An explicit lower limit.
    img = encode(Image.new("RGB", (100, 100)))
    assert kind_of(decode_image, img, max_pixels=5_000) == "image_too_large"
    assert decode_image(img, max_pixels=10_000).size == (100, 100)


# ---------------------------------------------------------------------------- captions


def test_captions():
    assert decode_caption(b" grinning face \n") == "grinning face"
    assert decode_caption("\ufeffcafé".encode()) == "café"  # BOM dropped, UTF-8 kept
    assert kind_of(decode_caption, None) == "missing_caption"
    assert kind_of(decode_caption, b"") == "empty_caption"
    assert kind_of(decode_caption, b" \t\n ") == "empty_caption"
    assert kind_of(decode_caption, "café".encode("latin-1")) == "bad_caption_encoding"
    assert kind_of(decode_caption, b"\xff\xfeabc") == "bad_caption_encoding"


def test_idx_and_error_pickling():
    import pickle

    assert parse_idx(b"42\n") == 42 and parse_idx(None) == -1
    assert kind_of(parse_idx, b"forty") == "bad_idx"
    err = pickle.loads(pickle.dumps(SampleError("decode_error", "bad bytes")))
    assert (err.kind, err.detail, str(err)) == ("decode_error", "bad bytes", "decode_error: bad bytes")
