"""Image loading: every kind of bad image is an ImageError with a reason; good ones come out RGB."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from prodsearch.errors import ImageError
from prodsearch.images import load_image


def _jpeg(size=(64, 48), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "blue").save(buffer, "JPEG" if mode != "RGBA" else "PNG")
    return buffer.getvalue()


def test_paths_bytes_and_pil_images_load_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg())
    for source in (path, str(path), _jpeg(), Image.new("L", (5, 5))):
        assert load_image(source).mode == "RGB"
    assert load_image(_jpeg(mode="RGBA")).mode == "RGB"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognised image"),
        (_jpeg()[:200], "corrupt or truncated"),
    ],
)
def test_bad_images_raise_image_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_missing_file_and_pixel_limit(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_jpeg((400, 300)), max_pixels=100_000)


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    # A 20000 x 20000 PNG header: refused from its size alone.
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")
    with pytest.raises(ImageError, match="pixels"):
        load_image(buffer.getvalue())
