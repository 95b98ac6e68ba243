"""Bytes in, a validated upright RGB image out, or a refusal saying why; and how a model wants its input
(`Preprocess`). Pillow and numpy only: the HTTP face uses its refusals and settings without loading torch.

Validation happens before decoding: the format is checked against an allow-list and the pixel count read from
the header is checked against a limit, so a decompression bomb is refused without allocating its pixels.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Formats we decode. Pillow opens phone cameras' MPO files (a JPEG with extra frames) as JPEG."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image we decode: 50 MP is a full-resolution photo from today's largest common phone sensors
(8160x6120); beyond that the decoded RGB buffer alone would pass 150 MB per request."""

# Recognised by their first bytes so that a user who sends one hears "unsupported format" (415), not
# "not an image" (400). They are never handed to a decoder.
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF", 0, "PDF"),
    (b"%!PS", 0, "PostScript"),
    (b"8BPS", 0, "Photoshop (PSD)"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
    (b"qoif", 0, "QOI"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}

_ALLOWED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our `max_pixels` check, made on every image before decoding, replaces Pillow's process-wide bomb guard, which
# would otherwise refuse first with a message that hides the image's size.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """Base of every refusal: `code` is stable and machine-readable, the message is for people."""

    code = "invalid_image"


class EmptyImage(ImageError):
    code = "empty_image"


class InvalidImage(ImageError):
    code = "invalid_image"


class UnsupportedFormat(ImageError):
    code = "unsupported_format"


class ImageTooLarge(ImageError):
    code = "image_too_large"


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: resize the shorter side to `resize_size`, centre-crop `crop_size`.

    `mean` and `std` are on the 0-255 scale and are applied by the model itself (see `bcnn.models.Normalize`).
    """

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def to_dict(self) -> dict[str, object]:
        return {"crop_size": self.crop_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Preprocess:
        return cls(crop_size=int(d["crop_size"]), resize_size=int(d["resize_size"]),  # type: ignore[arg-type]
                   mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type,union-attr]
                   std=tuple(float(v) for v in d["std"]))  # type: ignore[arg-type,union-attr]


def default_preprocess(backbone: str) -> Preprocess:
    """The paper's 448x448 input for VGG-16 (ImageNet mean/std); 224 and TF scaling for the Lite0 backbone."""
    if backbone == "vgg16":
        return Preprocess(crop_size=448, resize_size=448, mean=(123.675, 116.28, 103.53),
                          std=(58.395, 57.12, 57.375))
    return Preprocess()


def _sniff_unsupported(data: bytes) -> str | None:
    for magic, offset, name in _KNOWN_UNSUPPORTED:
        if data[offset:offset + len(magic)] == magic:
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[data[8:12]]
    head = data[:1024].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None) -> Image.Image:
    """Decode `data` into an upright RGB image, or raise an `ImageError` subclass.

    `draft_size` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) while keeping both sides at least that
    large: a 12 MP photo bound for a 256-pixel input decodes about 20 times faster.
    """
    if not data:
        raise EmptyImage("The upload is empty: no image data was received.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about damaged metadata; the checks below decide
        return _decode(data, max_pixels, draft_size)


def _decode(data: bytes, max_pixels: int, draft_size: int | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        unsupported = _sniff_unsupported(data)
        if unsupported:
            raise UnsupportedFormat(
                f"{unsupported} files are not supported; send a photo as {_ALLOWED_NAMES}.") from None
        raise InvalidImage(f"The data is not an image we can read; send a photo as {_ALLOWED_NAMES}.") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error):
        raise InvalidImage("The image header is damaged; the file could not be read.") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage("The image has no pixels.")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} pixels ({width * height:,}); the limit is {max_pixels:,} pixels.")
    try:
        if draft_size and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # first frame only: GIF, WebP, TIFF and MPO frames after it are never decoded
        fmt = image.format or "unknown"
        rgb = _to_rgb(_upright(image))
        rgb.info.update(source_size=(width, height), source_format=fmt)
        return rgb
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError, struct.error):
        raise InvalidImage("The image data is truncated or corrupt.") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        # In place: a photo already upright (most) is not copied, as it would be otherwise.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a damaged EXIF block should not cost the user their answer; keep the stored orientation
        pass
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale to 8 bits by scaling, not clipping (Pillow's convert would clip at 255)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        scaled = (values - lo) / (hi - lo or 1.0) * 255.0
    else:
        scaled = values / 257.0 if values.max() > 255 else values
    return Image.fromarray(np.nan_to_num(scaled).clip(0, 255).astype(np.uint8), mode="L")


