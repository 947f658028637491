"""Reading product images safely: size limits, clear errors, RGB out."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from prodsearch.errors import ImageError

ImageSource = str | Path | bytes | Image.Image


def load_image(source: ImageSource, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode `source` (a path, encoded bytes or a PIL image) into an RGB PIL image.

    Raises ImageError when the file is missing, not an image, truncated or corrupt, or larger
    than `max_pixels` (checked from the header, before decoding).
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return source.convert("RGB")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image file: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError("image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size, max_pixels)
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from exc


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (PRODSEARCH_MAX_IMAGE_PIXELS)"
        )
