from __future__ import annotations

import pytest
from PIL import Image

from bench.labelled_set import Style, render_text
from verifier.typography import ocr_engine


@pytest.fixture(scope="session", autouse=True)
def ocr_loaded() -> None:
    """Build the process's OCR engine once, before the first test times anything."""
    ocr_engine()


def poster(text: str | None, **style: object) -> Image.Image:
    """A 1024² image showing ``text`` in Pillow's bundled font (present on every machine)."""
    defaults: dict[str, object] = {"font": None, "font_px": 72, "background": "noise",
                                   "rotation_deg": 2.0, "blur_px": 0.8, "seed": 11}
    return render_text(text, Style(**{**defaults, **style}))  # type: ignore[arg-type]
