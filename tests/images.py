"""Images made on the spot for tests: valid odd ones and hostile ones. Nothing is downloaded."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def jpeg(width: int = 64, height: int = 48) -> bytes:
    return encode(gradient(width, height), "JPEG", quality=90)


def noise_jpeg(side: int) -> bytes:
    """Noise compresses badly: a 2000x2000 JPEG is about 6 MB, larger than Ray's default 4 MiB message."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=98)


def truncated_jpeg() -> bytes:
    data = jpeg(256, 256)
    return data[: len(data) // 2]


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header is rewritten to claim width x height pixels (a decompression bomb)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def many_frame_gif(frames: int = 3000) -> bytes:
    images = [Image.new("P", (8, 8), i % 200) for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=10)


def png16(value: int = 32768) -> bytes:
    return encode(Image.fromarray(np.full((16, 16), value, dtype=np.uint16)), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def palette_png_transparent() -> bytes:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    return encode(image, "PNG", transparency=1)  # every pixel transparent


def exif_rotated_jpeg() -> bytes:
    """A 64x32 JPEG whose EXIF says 'rotate 90 degrees': upright it is 32x64."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(gradient(64, 32), "JPEG", exif=exif.tobytes())


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML = b"<!doctype html><html><body><img src=x></body></html>"
TEXT = b"this is not a photo of a heron\n"


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("bird.jpg", jpeg())
    return buf.getvalue()


def multipart(files: int) -> tuple[bytes, str]:
    boundary = "heronheronheron"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + jpeg(32, 32) + b"\r\n" for i in range(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


VALID_ODD = {  # uploads the service answers, each of a kind that decoders get wrong
    "gif-3000-frames": (many_frame_gif(3000), "image/gif"),
    "png-16-bit": (png16(), "image/png"),
    "cmyk-jpeg": (cmyk_jpeg(), "image/jpeg"),
    "palette-png-transparent": (palette_png_transparent(), "image/png"),
    "exif-rotated-jpeg": (exif_rotated_jpeg(), "image/jpeg"),
    "webp": (encode(gradient(), "WEBP"), "image/webp"),
    "tiff": (encode(gradient(), "TIFF"), "image/tiff"),
    "bmp": (encode(gradient(), "BMP"), "image/bmp"),
}

CONTENT_TYPES_NAMED = ("multipart/form-data", "image/*", "application/octet-stream")
"""What an error message may name with a slash in it: the content types the API takes."""


def names_a_path(message: str) -> bool:
    """Whether an error message holds a slash other than in a content type the API takes: a file path leaked."""
    for content_type in CONTENT_TYPES_NAMED:
        message = message.replace(content_type, "")
    return "/" in message


HOSTILE = {  # uploads refused, with their status
    "empty": (b"", "image/jpeg", 400),
    "text": (TEXT, "image/jpeg", 400),
    "html": (HTML, "image/jpeg", 400),
    "truncated-jpeg": (truncated_jpeg(), "image/jpeg", 400),
    "png-50000x50000": (png_declaring(50_000, 50_000), "image/png", 413),
    "svg": (SVG, "image/svg+xml", 415),
    "pdf": (PDF, "application/octet-stream", 415),
    "zip": (zip_bytes(), "application/octet-stream", 400),
    "wrong-content-type": (jpeg(), "application/json", 415),
    "ten-files": (*multipart(10), 400),
    "multipart-without-file": (*multipart(0), 400),
}
