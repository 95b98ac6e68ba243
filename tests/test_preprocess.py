from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcnn.images import EmptyImage, ImageError, ImageTooLarge, InvalidImage, Preprocess, UnsupportedFormat, decode_image
from bcnn.preprocess import load_image, preprocess_image, resize_and_crop
from tests import images

PRE = Preprocess()


def test_valid_jpeg_becomes_uint8_chw_at_the_model_size() -> None:
    tensor = preprocess_image(images.jpeg(640, 480), PRE)
    assert tensor.dtype == torch.uint8
    assert tensor.shape == (3, 224, 224)
    loaded = load_image(images.jpeg(640, 480), PRE)  # the same pixels, channels last in one contiguous block
    assert loaded.pixels.shape == (224, 224, 3) and loaded.pixels.flags["C_CONTIGUOUS"]
    assert torch.equal(loaded.chw, tensor) and torch.stack([tensor, tensor]).is_contiguous()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_allowed_format_decodes(fmt: str) -> None:
    assert preprocess_image(images.encode(images.gradient(), fmt), PRE).shape == (3, 224, 224)


@pytest.mark.parametrize(("data", "error"), [
    (b"", EmptyImage),
    (images.TEXT, InvalidImage),
    (images.HTML, InvalidImage),
    (images.truncated_jpeg(), InvalidImage),
    (images.zip_bytes(), InvalidImage),
    (images.SVG, UnsupportedFormat),
    (images.PDF, UnsupportedFormat),
    (images.png_declaring(50_000, 50_000), ImageTooLarge),
], ids=["empty", "text", "html", "truncated-jpeg", "zip", "svg", "pdf", "50000x50000-png"])
def test_refusals_are_typed_with_a_readable_message(data: bytes, error: type[ImageError]) -> None:
    with pytest.raises(error) as caught:
        preprocess_image(data, PRE)
    message = str(caught.value)
    assert message and "Traceback" not in message and "/" not in message


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="50000x50000"):
        decode_image(images.png_declaring(50_000, 50_000), max_pixels=40_000_000)
    with pytest.raises(ImageTooLarge, match="limit"):
        decode_image(images.jpeg(200, 200), max_pixels=39_999)
    assert time.perf_counter() - start < 1.0


def test_animation_takes_the_first_frame_only() -> None:
    data = images.many_frame_gif(3000)
    start = time.perf_counter()
    image = decode_image(data)
    assert time.perf_counter() - start < 0.5
    assert image.mode == "RGB" and image.size == (8, 8)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    image = decode_image(images.png16(32768))
    assert np.asarray(image)[0, 0].tolist() == [127, 127, 127]


def test_cmyk_jpeg_comes_out_in_rgb() -> None:
    r, g, b = np.asarray(decode_image(images.cmyk_jpeg()))[16, 16].tolist()
    assert r > 200 and g < 60 and b < 60


def test_transparent_palette_png_is_composited_over_white() -> None:
    assert np.asarray(decode_image(images.palette_png_transparent()))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    assert decode_image(images.exif_rotated_jpeg()).size == (32, 64)


def test_grayscale_and_la_become_rgb() -> None:
    for mode in ("L", "LA", "1", "P"):
        assert decode_image(images.encode(images.gradient().convert(mode), "PNG")).mode == "RGB"


def test_draft_decoding_keeps_the_crop_within_a_few_levels_of_full_decoding() -> None:
    data = images.jpeg(2048, 1536)
    fast = load_image(data, PRE).pixels.astype(np.float32)
    full = resize_and_crop(np.asarray(decode_image(data)), PRE).astype(np.float32)
    assert np.abs(fast - full).mean() < 3.0


@pytest.mark.parametrize(("size", "pre"), [((640, 480), PRE), ((300, 200), Preprocess(448, 448)),
                                         ((1269, 1154), Preprocess(448, 448))], ids=["down", "up", "down-448"])
def test_resize_is_pillows_bilinear_filter_on_the_centre_crop(size: tuple[int, int], pre: Preprocess) -> None:
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise)  # noise: any difference of filter or geometry shows
    ours = resize_and_crop(np.asarray(image), pre).astype(np.int16)
    width, height = image.size
    box = round(pre.crop_size * min(width, height) / pre.resize_size)
    left, top = (width - min(width, box)) // 2, (height - min(height, box)) // 2
    crop = image.crop((left, top, left + min(width, box), top + min(height, box)))
    pillow = crop.resize((pre.crop_size, pre.crop_size), Image.Resampling.BILINEAR)
    assert ours.shape == (pre.crop_size, pre.crop_size, 3)
    assert np.abs(ours - np.asarray(pillow, dtype=np.int16)).max() <= 1


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_give_a_tensor_or_a_typed_error(data: bytes) -> None:
    _check_outcome(data)


_SEEDS = [images.jpeg(), images.encode(images.gradient(), "PNG"), images.encode(images.gradient(), "GIF"),
          images.encode(images.gradient(), "WEBP"), images.encode(images.gradient(), "TIFF"),
          images.encode(images.gradient(), "BMP")]


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       st.integers(0, 10_000))
def test_fuzz_mutated_images_give_a_tensor_or_a_typed_error(seed: bytes, flips: list[tuple[int, int]],
                                                            cut: int) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    _check_outcome(bytes(data[: max(1, len(data) - cut)]))


def _check_outcome(data: bytes) -> None:
    start = time.perf_counter()
    try:
        tensor = preprocess_image(data, PRE, max_pixels=4_000_000)
    except ImageError:
        pass
    else:
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, 224, 224)
    assert time.perf_counter() - start < 2.0
