"""Decode request images (base64 PNG/JPEG) safely: size limits first, then a guarded decode."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from controlplane.errors import FieldError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG"})


def decode_image(field: str, payload: str, *, max_bytes: int, max_pixels: int,
                 mode: str) -> tuple[Image.Image | None, FieldError | None]:
    """Return the decoded image converted to ``mode``, or the error naming ``field``."""
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    if len(payload) * 3 // 4 > max_bytes:
        return None, FieldError(field, f"encoded image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None, FieldError(field, "is not valid base64")
    # no warnings.catch_warnings() here: it is process-wide state and this runs in threads.
    # Far past Pillow's limit open() raises; below it, the size check refuses first.
    try:
        probe = Image.open(io.BytesIO(raw))
        if probe.format not in ALLOWED_FORMATS:
            return None, FieldError(field, f"must be PNG or JPEG, not {probe.format}")
        width, height = probe.size
        if width * height > max_pixels:
            return None, FieldError(
                field, f"declares {width}x{height} pixels; the limit is {max_pixels}")
        probe.load()
    except Image.DecompressionBombError:
        return None, FieldError(
            field, f"is a decompression bomb: it declares far more than {max_pixels} pixels")
    except (OSError, SyntaxError, ValueError):
        return None, FieldError(field, "is not a readable PNG or JPEG image")
    return probe.convert(mode), None
