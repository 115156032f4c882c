"""Build-time image processing: validate, resize, re-encode; every rejection is a ``SampleError``.

Resize modes, all downscale-only (an image is never enlarged), ``max_side`` = S:

    keep_ratio   longest side <= S, aspect kept                       (800x600 -> S=400: 400x300)
    center_crop  shorter side -> S, then the central S x S square     (800x600 -> 400x400)
    border       keep_ratio, then padded to S x S with a border colour (800x600 -> 400x400)
    none         pixels as they are (original bytes kept when already in the output format)

JPEGs are decoded with a DCT-domain draft that keeps both sides >= the target, and the
resize box maps the reduced image exactly onto the original extent (see ``fast_transform``),
so drafting changes speed, not geometry. The resize filter is Lanczos.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from clipkit.data.decode import SampleError, draft_jpeg, load_rgb, open_image

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "none")
FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}


@dataclass(frozen=True)
class ImageOptions:
    resize_mode: str = "keep_ratio"  # one of RESIZE_MODES
    max_side: int = 512  # S in the module docstring
    min_side: int = 0  # images whose shorter side is below this are rejected as too_small
    image_format: str = "jpg"  # jpg | webp | png
    quality: int = 95  # jpg / webp quality (png is lossless)
    max_pixels: int | None = None  # header-declared pixels above this: image_too_large
    border_color: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if self.image_format not in FORMATS:
            raise ValueError(f"image format must be one of {', '.join(FORMATS)}, got {self.image_format!r}")
        if self.max_side < 1 or not 1 <= self.quality <= 100 or self.min_side < 0:
            raise ValueError("need max_side >= 1, 1 <= quality <= 100, min_side >= 0")


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes  # encoded in ImageOptions.image_format
    ext: str  # tar member extension: jpg | webp | png
    width: int
    height: int
    original_width: int
    original_height: int
    sha1: str  # of the final pixels (mode, size, RGB bytes): exact-duplicate detection


def target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """Size after the resize step (before center crop / border), downscale only."""
    if opts.resize_mode == "none":
        return width, height
    side = min(width, height) if opts.resize_mode == "center_crop" else max(width, height)
    scale = min(1.0, opts.max_side / side)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _finish_geometry(img: Image.Image, opts: ImageOptions) -> Image.Image:
    if opts.resize_mode == "center_crop":
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        return img.crop((left, top, left + side, top + side))
    if opts.resize_mode == "border":
        side = max(opts.max_side, *img.size)
        canvas = Image.new("RGB", (side, side), opts.border_color)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return canvas
    return img


def _encode(img: Image.Image, opts: ImageOptions) -> bytes:
    buf = io.BytesIO()
    fmt = FORMATS[opts.image_format]
    kwargs = {"quality": opts.quality} if fmt in ("JPEG", "WEBP") else {"compress_level": 6}
    try:
        img.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError) as e:  # e.g. WebP's 16383 px limit
        raise SampleError("encode_error", f"cannot write {opts.image_format}: {e}") from None
    return buf.getvalue()


def process_image(data: bytes | None, opts: ImageOptions) -> ProcessedImage:
    """Validate (full decode), resize and encode one image; raises ``SampleError`` when unusable.

    Kinds: missing_image, empty_image, decode_error, image_too_large, too_small, encode_error.
    """
    img = open_image(data, opts.max_pixels)  # header only: size checked before decoding
    width, height = img.size
    if min(width, height) < opts.min_side:
        raise SampleError("too_small", f"{width}x{height} is below the minimum side {opts.min_side}")
    source_format = img.format
    tw, th = target_size(width, height, opts)
    scale = draft_jpeg(img, tw, th) if (tw, th) != (width, height) else 1
    converted = img.mode not in ("RGB", "L") or "transparency" in img.info  # alpha, CMYK, palette ...
    img = load_rgb(img)  # full decode: truncated or corrupt data fails here
    if (tw, th) != (width, height):
        box = (0, 0, width / scale, height / scale)  # exact extent of the (reduced) image
        img = img.resize((tw, th), Image.Resampling.LANCZOS, box=box)
    img = _finish_geometry(img, opts)
    keep_bytes = opts.resize_mode == "none" and not converted and source_format == FORMATS[opts.image_format]
    encoded = data if keep_bytes else _encode(img, opts)
    digest = hashlib.sha1(f"{img.mode}{img.size}".encode())
    digest.update(img.tobytes())
    assert encoded is not None
    return ProcessedImage(
        encoded, opts.image_format, img.width, img.height, width, height, digest.hexdigest()
    )
