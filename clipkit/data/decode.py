"""Turn a sample's raw bytes into an RGB ``PIL.Image`` and a caption string, or a classified error.

Every failure is a ``SampleError(kind, detail)``; the loader counts kinds in skip mode and
reports them, or raises naming the shard and key. Kinds:

    missing_image, empty_image, decode_error, image_too_large,
    missing_caption, empty_caption, bad_caption_encoding
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError


class SampleError(Exception):
    """A sample that cannot be used; ``kind`` is the counter name shown to users."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (SampleError, (self.kind, self.detail))


# ---------------------------------------------------------------------------- images


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Any mode with transparency -> RGB over white; others -> RGB."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")  # P / L / RGB with a tRNS chunk become real alpha here
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


@contextlib.contextmanager
def _classified() -> Iterator[None]:
    """Turn PIL's assorted exceptions on bad bytes into ``SampleError`` kinds."""
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both are "too large".
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("image_too_large", str(e)) from None
    except UnidentifiedImageError:
        raise SampleError("decode_error", "not a recognised image format") from None
    except Exception as e:  # noqa: BLE001
        # PIL's format plugins raise assorted types on malformed bytes (OSError for
        # truncation, SyntaxError, ValueError, struct.error, EOFError, ...): all are bad data.
        raise SampleError("decode_error", f"{type(e).__name__}: {e}") from None


def open_image(data: bytes | None, max_pixels: int | None = None) -> Image.Image:
    """Read only the header: a lazy ``PIL.Image`` whose size is known and checked, no pixels yet.

    The header-declared size is checked against ``max_pixels`` (and PIL's own bomb limit)
    before any pixel is decoded. Follow with ``load_rgb`` (optionally after ``img.draft``).
    """
    if data is None:
        raise SampleError("missing_image", "no image member")
    if len(data) == 0:
        raise SampleError("empty_image", "image member has zero bytes")
    with _classified():
        img = Image.open(io.BytesIO(data))
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise SampleError("image_too_large", f"{w}x{h} is over the limit of {max_pixels} pixels")
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels of an ``open_image`` result; RGB, transparency composited on white."""
    with _classified():
        img.load()
        return _composite_on_white(img)


def draft_jpeg(img: Image.Image, width: int, height: int) -> int:
    """Ask a JPEG for DCT-domain downscaling that keeps both sides >= (width, height).

    Returns the scale (1, 2, 4 or 8) by which the image's coordinates shrink; 1 for other
    formats. Must be called before ``load_rgb``.
    """
    if img.format != "JPEG" or width < 1 or height < 1:
        return 1
    w0 = img.size[0]
    with _classified():
        res = img.draft("RGB", (width, height))
    return 1 if res is None else round(w0 / res[1][2])


def decode_image(
    data: bytes | None, *, draft_size: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode jpg/png/webp bytes to an RGB image; transparency is composited on white.

    ``draft_size``: the shorter side the transform will resize to. JPEGs are then decoded
    at a DCT-domain 1/2, 1/4 or 1/8 scale that still keeps both sides >= ``draft_size``
    (several times faster for large photos). A resize of the whole reduced image maps its
    size, not the source's, onto the output: for odd sizes the last reduced pixel is partial
    and the geometry is off by up to one source pixel; ``fast_transform`` avoids that with a
    resize box.
    ``max_pixels``: refuse images declaring more pixels (default: PIL's own bomb limit).
    """
    img = open_image(data, max_pixels)
    if draft_size:
        draft_jpeg(img, draft_size, draft_size)
    return load_rgb(img)


# ---------------------------------------------------------------------------- captions


def decode_caption(data: bytes | None) -> str:
    """Strict UTF-8 (a leading BOM is dropped), surrounding whitespace stripped."""
    if data is None:
        raise SampleError("missing_caption", "no caption member")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SampleError("bad_caption_encoding", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    text = text.strip()
    if not text:
        raise SampleError("empty_caption", "caption is empty or whitespace")
    return text


def parse_idx(data: bytes | None) -> int:
    """The ``idx`` member as an int, or -1 when the shard has none."""
    if data is None:
        return -1
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError("bad_idx", f"idx member {data[:20]!r} is not an integer") from None
