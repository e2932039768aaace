"""A labelled set for the typography verifier, rendered with Pillow.

Positives show the expected phrase; negatives show a different phrase, the phrase with one
character changed, garbled text, or no text at all. Images vary in font, size, background
(noisy colour, gradient, blotchy colour field), rotation and blur. Used by
``bench/verifier_accuracy.py`` and by ``tests/verifier``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from verifier.typography import same_char, similarity

FONT_ROOT = Path("/usr/share/fonts/truetype")
# Families from fonts-dejavu-core/-extra, fonts-liberation and fonts-freefont-ttf.
FONT_FILES = (
    "dejavu/DejaVuSans.ttf", "dejavu/DejaVuSans-Bold.ttf", "dejavu/DejaVuSerif.ttf",
    "dejavu/DejaVuSerif-Bold.ttf", "dejavu/DejaVuSansMono.ttf",
    "dejavu/DejaVuSansCondensed-Oblique.ttf",
    "liberation/LiberationSans-Regular.ttf", "liberation/LiberationSans-Bold.ttf",
    "liberation/LiberationSerif-Regular.ttf", "liberation/LiberationSerif-Bold.ttf",
    "liberation/LiberationSansNarrow-Regular.ttf", "liberation/LiberationMono-Bold.ttf",
    "freefont/FreeSans.ttf", "freefont/FreeSansBold.ttf", "freefont/FreeSerif.ttf",
    "freefont/FreeSerifBoldItalic.ttf",
)

PHRASES = (
    "SALE 50% OFF", "Fresh Coffee Daily", "OPEN 24 HOURS", "Grand Opening", "Happy Birthday",
    "Welcome Home", "Summer Festival 2025", "NO PARKING", "Best Pizza in Town",
    "Live Music Tonight", "Free Wi-Fi", "Bakery & Cafe", "Hello World", "Thank You",
    "Limited Edition", "Buy 1 Get 1 Free", "Farmers Market", "EXIT", "Ocean View Hotel",
    "Spring Collection", "The Golden Lion", "Vintage Records", "Closed on Sundays",
    "Book Club Meeting", "Night Market", "Space Odyssey", "Pure Mountain Water",
    "Game Over", "Tech Conference 2026", "Handmade Soap", "Green Energy Now", "Jazz Night",
    "Flat White $4", "Room 101", "City Marathon", "Winter Sale", "Fish & Chips",
    "Lemonade Stand", "Keep Calm", "Breaking News", "Museum of Art", "Rocket Launch",
    "Dog Friendly", "Pet Shop", "Quiet Please", "Just Married", "Save the Date",
    "Ice Cream Parlor", "Pharmacy", "Bicycle Repair", "Taxi Rank", "Sushi Bar",
    "Yoga Studio", "Electric Avenue", "Midnight Express", "Coffee & Donuts", "Dream Big",
    "Wild Adventure", "Fast Delivery", "Garden Party",
)
BACKGROUNDS = ("noise", "gradient", "field")
NEGATIVE_KINDS = ("other_phrase", "one_char", "garbled", "missing")


@dataclass(frozen=True)
class Style:
    """How a phrase is drawn; ``font`` None is Pillow's bundled scalable font."""

    font: Path | None = None
    font_px: int = 64
    background: str = "noise"
    rotation_deg: float = 0.0
    blur_px: float = 0.0
    two_lines: bool = False
    size_px: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    expected: str
    shown: str | None
    positive: bool
    kind: str
    style: Style


def available_fonts() -> list[Path | None]:
    """The listed font files present on this machine, plus Pillow's bundled font."""
    fonts: list[Path | None] = [FONT_ROOT / name for name in FONT_FILES
                                if (FONT_ROOT / name).is_file()]
    return [*fonts, None]


def load_font(font: Path | None, font_px: int) -> ImageFont.FreeTypeFont:
    if font is None:
        loaded = ImageFont.load_default(size=font_px)
        if not isinstance(loaded, ImageFont.FreeTypeFont):
            raise RuntimeError("Pillow was built without FreeType; its default font won't scale")
        return loaded
    return ImageFont.truetype(str(font), font_px)


def _noise(rng: np.random.Generator, sigma: float, size_px: int) -> np.ndarray:
    return rng.standard_normal((size_px, size_px, 3), dtype=np.float32) * np.float32(sigma)


def background(kind: str, size_px: int, rng: np.random.Generator) -> Image.Image:
    """A square background: ``noise`` (flat colour + noise), ``gradient`` or ``field``
    (a blotchy colour field, like a painted backdrop)."""
    if kind == "noise":
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        pixels = colour + _noise(rng, 18, size_px)
    elif kind == "gradient":
        start, stop = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = np.linspace(0, 1, size_px)[:, None, None]
        pixels = np.broadcast_to(start + t * (stop - start), (size_px, size_px, 3))
        pixels = pixels + _noise(rng, 6, size_px)
        if rng.random() < 0.5:
            pixels = pixels.transpose(1, 0, 2)
    elif kind == "field":
        coarse = Image.fromarray(rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8))
        pixels = np.asarray(coarse.resize((size_px, size_px), Image.Resampling.BICUBIC),
                            dtype=np.float32) + _noise(rng, 10, size_px)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _text_colour(base: Image.Image, box: tuple[int, int, int, int],
                 rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour whose luma differs from the background under the text by ≥ 110."""
    under = float(np.asarray(base.crop(box).convert("L")).mean())
    target = rng.uniform(0, max(0.0, under - 110)) if under > 127 else rng.uniform(
        min(255.0, under + 110), 255)
    colour = rng.uniform(0, 255, 3)
    colour += target - (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])
    return tuple(int(c) for c in np.clip(colour, 0, 255))  # type: ignore[return-value]


def render_text(text: str | None, style: Style) -> Image.Image:
    """``text`` drawn on a background as ``style`` says (no text when ``text`` is None)."""
    rng = np.random.default_rng(style.seed)
    image = background(style.background, style.size_px, rng)
    if text is None:
        return image.filter(ImageFilter.GaussianBlur(style.blur_px)) if style.blur_px else image
    lines = text
    if style.two_lines and " " in text:
        words = text.split(" ")
        lines = " ".join(words[: len(words) // 2]) + "\n" + " ".join(words[len(words) // 2:])
    font_px = style.font_px
    margin_px = style.size_px // 16
    while True:
        font = load_font(style.font, font_px)
        left, top, right, bottom = ImageDraw.Draw(image).multiline_textbbox(
            (0, 0), lines, font=font, align="center")
        if right - left <= style.size_px - 2 * margin_px or font_px <= 12:
            break
        font_px = int(font_px * 0.9)
    width_px, height_px = int(right - left), int(bottom - top)
    x = int(rng.uniform(margin_px, max(margin_px + 1, style.size_px - margin_px - width_px)))
    y = int(rng.uniform(margin_px, max(margin_px + 1, style.size_px - margin_px - height_px)))
    colour = _text_colour(image, (x, y, x + width_px, y + height_px), rng)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).multiline_text((x - left, y - top), lines, font=font,
                                         fill=(*colour, 255), align="center")
    if style.rotation_deg:
        layer = layer.rotate(style.rotation_deg, resample=Image.Resampling.BICUBIC,
                             center=(x + width_px / 2, y + height_px / 2))
    image = Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")
    return image.filter(ImageFilter.GaussianBlur(style.blur_px)) if style.blur_px else image


def one_char_changed(text: str, rng: random.Random) -> str:
    """``text`` with one letter or digit replaced by a character the matcher tells apart."""
    positions = [i for i, c in enumerate(text) if c.isalnum()]
    i = rng.choice(positions)
    old = text[i]
    pool = (string.digits if old.isdigit()
            else string.ascii_uppercase if old.isupper() else string.ascii_lowercase)
    new = rng.choice([c for c in pool if not same_char(c, old)])
    return text[:i] + new + text[i + 1:]


def garbled(text: str, rng: random.Random) -> str:
    """Diffusion-style gibberish: about half the letters replaced, word shapes kept."""
    out = []
    for c in text:
        if c.isalpha() and rng.random() < 0.5:
            pool = string.ascii_uppercase if c.isupper() else string.ascii_lowercase
            c = rng.choice([p for p in pool if not same_char(p, c)])
        out.append(c)
    result = "".join(out)
    return result if similarity(text, result) < 0.7 else garbled(text, rng)


def random_style(rng: random.Random, fonts: list[Path | None]) -> Style:
    return Style(
        font=rng.choice(fonts),
        font_px=rng.choice((20, 24, 28, 32, 40, 48, 64, 80, 96, 120)),
        background=rng.choice(BACKGROUNDS),
        rotation_deg=rng.uniform(-4, 4),
        blur_px=rng.choice((0.0, 0.0, 0.8, 1.5, 2.0)),
        two_lines=rng.random() < 0.15,
        seed=rng.randrange(2**31),
    )


def labelled_set(n_positive: int, n_negative: int, *, seed: int = 0) -> Iterator[Sample]:
    """``n_positive`` positives, then ``n_negative`` negatives spread evenly over
    ``NEGATIVE_KINDS``, rendered lazily."""
    rng = random.Random(seed)
    fonts = available_fonts()
    for _ in range(n_positive):
        phrase, style = rng.choice(PHRASES), random_style(rng, fonts)
        yield Sample(render_text(phrase, style), phrase, phrase, True, "positive", style)
    for k in range(n_negative):
        kind = NEGATIVE_KINDS[k % len(NEGATIVE_KINDS)]
        phrase, style = rng.choice(PHRASES), random_style(rng, fonts)
        shown: str | None
        if kind == "other_phrase":
            shown = rng.choice([p for p in PHRASES if similarity(phrase, p) < 0.5])
        elif kind == "one_char":
            shown = one_char_changed(phrase, rng)
        elif kind == "garbled":
            shown = garbled(phrase, rng)
        else:
            shown = None
        yield Sample(render_text(shown, style), phrase, shown, False, kind, style)
