"""The Preprocessor deployment in process (its class, no Ray cluster): a batch of uploads becomes one uint8 array of
the usable ones in upload order, each refused upload its own error by position, with the settings it was given."""

from __future__ import annotations

import asyncio

import numpy as np
import pydantic
import pytest

from bcnn.images import EmptyImage, ImageTooLarge, InvalidImage, Preprocess, UnsupportedFormat
from bcnn.preprocess import load_image
from deployments.preprocessor import Preprocessor
from tests import images

PREPROCESS = Preprocess(crop_size=64, resize_size=72)


def _prepare(replica: Preprocessor, uploads: list[bytes], preprocess: Preprocess = PREPROCESS):  # noqa: ANN202
    ids = tuple(f"r{i}" for i in range(len(uploads)))
    return asyncio.run(replica(uploads, preprocess, ids))


def test_a_bad_upload_is_refused_on_its_own_and_the_others_keep_their_order() -> None:
    replica = Preprocessor.func_or_class()
    first, second = images.jpeg(320, 240), images.encode(images.gradient(100, 300), "PNG")
    batch = _prepare(replica, [images.TEXT, first, images.SVG, b"", second, images.png_declaring(50_000, 50_000)])
    assert batch.request_ids == ("r0", "r1", "r2", "r3", "r4", "r5") and batch.size == 6
    assert {i: type(e) for i, e in batch.rejected.items()} == {
        0: InvalidImage, 2: UnsupportedFormat, 3: EmptyImage, 5: ImageTooLarge}
    assert batch.pixels.shape == (2, 64, 64, 3) and batch.pixels.dtype == np.uint8
    # The one preprocessing path: what the CLI and training get for the same bytes.
    assert np.array_equal(batch.pixels[0], load_image(first, PREPROCESS).pixels)
    assert np.array_equal(batch.pixels[1], load_image(second, PREPROCESS).pixels)
    assert len(batch.preprocess_ms) == 2 and all(ms > 0 for ms in batch.preprocess_ms)


def test_a_batch_with_nothing_usable_is_an_empty_array_of_the_model_size() -> None:
    batch = _prepare(Preprocessor.func_or_class(), [images.TEXT], Preprocess(crop_size=448, resize_size=448))
    assert batch.pixels.shape == (0, 448, 448, 3) and set(batch.rejected) == {0}


def test_the_preprocessing_comes_with_each_batch() -> None:
    """A swap on the classifiers to a model of another size needs nothing of the preprocessors."""
    replica, photo = Preprocessor.func_or_class(), images.jpeg(320, 240)
    assert _prepare(replica, [photo]).pixels.shape == (1, 64, 64, 3)
    assert _prepare(replica, [photo], Preprocess(crop_size=96, resize_size=96)).pixels.shape == (1, 96, 96, 3)


def test_its_pixel_limit_is_a_setting_changed_in_place() -> None:
    replica, photo = Preprocessor.func_or_class(), images.jpeg(320, 240)
    assert not _prepare(replica, [photo]).rejected
    replica.reconfigure({"max_pixels": 320 * 240 - 1})
    assert isinstance(_prepare(replica, [photo]).rejected[0], ImageTooLarge)
    with pytest.raises(pydantic.ValidationError, match="max_pixel"):
        replica.reconfigure({"max_pixel": 10})  # a misspelt setting fails the update instead of being ignored
