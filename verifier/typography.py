"""Typography check: OCR an image and match the requested phrases against what it reads.

Matching rule (the README quotes it): both texts are NFKC-normalised and everything but
letters, digits and ``|`` is dropped, so whitespace and punctuation never count. Letters
compare without case. Confusable characters compare equal in pairs: ``O``, ``o`` and ``0``;
and ``I`` (capital i), ``l`` (small L), ``1`` and ``|``. The pairs are not transitive
through case: small ``i`` and capital ``L`` stay distinct from ``l`` and ``I``
respectively. A phrase's score is ``1 - edits / len(phrase)``, where ``edits`` is the
edit distance from the phrase to the best-matching stretch of the OCR text, taken over
every run of up to ``MAX_JOINED_REGIONS`` consecutive regions in reading order (OCR often
splits a phrase at word gaps or line breaks). Text around the phrase costs nothing.

Matching is quadratic in the texts' lengths, so one image's matching has a budget of
``MATCH_BUDGET_CELLS`` edit-distance cells (about half a second on one core): a candidate
that does not fit in what is left is not scored, so a phrase far longer than any poster
scores what it reached (0 when it is the first) and fails the check instead of holding
the verifier — every other job's verdict waits behind at most one budget.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image
from rapidocr import RapidOCR
from rapidocr.utils.output import RapidOCROutput

from controlplane.verification import Typography

# The detector sees the image with its long side at most this many pixels; recognition
# still reads crops from the full-resolution image. On 1024² images, one core
# (bench/verifier_accuracy.py): full size missed 2 of 40 phrases at p95 510 ms; 736, 640
# and 512 found all (p95 248, 188, 139 ms); 384 lost 20 px text. 640 keeps a margin for
# small text (20 px type is 12.5 px to the detector) at under 40% of the full-size cost.
DETECTOR_LONG_SIDE_PX = 640
MAX_JOINED_REGIONS = 4
MATCH_BUDGET_CELLS = 2_000_000
#: threads per onnxruntime session (None: onnxruntime's default, one per core); set once at
#: process start from ``Settings.ocr_threads`` by :func:`set_ocr_threads`
_ocr_threads: int | None = None

_CONFUSABLE_PAIRS = frozenset(
    frozenset(pair)
    for pair in ("O0", "o0", "Il", "I1", "l1", "I|", "l|", "1|")
)


@dataclass(frozen=True)
class Region:
    """One OCR text region: its text, recogniser confidence and bounding box in pixels."""

    text: str
    confidence: float
    top_px: float
    bottom_px: float
    left_px: float


def set_ocr_threads(threads: int | None) -> None:
    """Use ``threads`` per onnxruntime session in the OCR engines built from now on (None:
    one per core). A process calls this once at start, before the first check."""
    global _ocr_threads
    if threads is not None and threads < 1:
        raise ValueError(f"OCR threads must be a positive integer, got {threads!r}")
    if threads != _ocr_threads:
        _ocr_threads = threads
        ocr_engine.cache_clear()


def ocr_params(det_long_side_px: int, threads: int | None) -> dict[str, object]:
    """RapidOCR's parameters for a detector size and a thread count (None: its default)."""
    params: dict[str, object] = {
        "Global.log_level": "error",
        "Global.use_cls": False,
        "Det.limit_type": "max",
        "Det.limit_side_len": det_long_side_px,
    }
    if threads is not None:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
    return params


@cache
def ocr_engine(det_long_side_px: int = DETECTOR_LONG_SIDE_PX) -> RapidOCR:
    """The process's OCR engine for a detector size (built once, models from the wheel)."""
    return RapidOCR(params=ocr_params(det_long_side_px, _ocr_threads))


def read_regions(
    image: Image.Image, *, det_long_side_px: int = DETECTOR_LONG_SIDE_PX
) -> list[Region]:
    """OCR ``image`` and return its text regions in reading order."""
    pixels = np.asarray(image.convert("RGB"))[:, :, ::-1]  # rapidocr takes BGR arrays
    result = ocr_engine(det_long_side_px)(np.ascontiguousarray(pixels))
    # Anything but a full result (e.g. boxes with nothing recognised) means no text read.
    if (not isinstance(result, RapidOCROutput) or result.txts is None
            or result.scores is None or result.boxes is None):
        return []
    regions = [
        Region(text=text, confidence=float(score), top_px=float(box[:, 1].min()),
               bottom_px=float(box[:, 1].max()), left_px=float(box[:, 0].min()))
        for text, score, box in zip(result.txts, result.scores, result.boxes, strict=True)
    ]
    return reading_order(regions)


def reading_order(regions: list[Region]) -> list[Region]:
    """Group regions into lines (vertical overlap of half the shorter box), top to bottom,
    each line left to right. Boxes of slightly rotated text still land on one line."""
    lines: list[list[Region]] = []
    for region in sorted(regions, key=lambda r: (r.top_px + r.bottom_px) / 2):
        line = lines[-1] if lines else None
        if line is not None and _same_line(line[-1], region):
            line.append(region)
        else:
            lines.append([region])
    return [region for line in lines for region in sorted(line, key=lambda r: r.left_px)]


def _same_line(a: Region, b: Region) -> bool:
    overlap_px = min(a.bottom_px, b.bottom_px) - max(a.top_px, b.top_px)
    shorter_px = min(a.bottom_px - a.top_px, b.bottom_px - b.top_px)
    return overlap_px >= 0.5 * shorter_px


def normalise(text: str) -> str:
    """NFKC, then keep letters, digits and ``|`` (whitespace and punctuation never count)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text) if c.isalnum() or c == "|")


def same_char(a: str, b: str) -> bool:
    """Equal ignoring case, or a confusable pair (see the module docstring)."""
    return a == b or a.casefold() == b.casefold() or frozenset((a, b)) in _CONFUSABLE_PAIRS


def similarity(expected: str, found: str) -> float:
    """``1 - edits / len(expected)`` for the best match of ``expected`` inside ``found``,
    both normalised; 1.0 when ``expected`` has nothing left to match."""
    phrase, text = normalise(expected), normalise(found)
    if not phrase:
        return 1.0
    # Semi-global edit distance: skipping text before and after the phrase is free.
    previous = [0] * (len(text) + 1)
    for i, p in enumerate(phrase, start=1):
        current = [i] + [0] * len(text)
        for j, t in enumerate(text, start=1):
            current[j] = min(
                previous[j - 1] + (0 if same_char(p, t) else 1),
                previous[j] + 1,
                current[j - 1] + 1,
            )
        previous = current
    return max(0.0, 1.0 - min(previous) / len(phrase))


class MatchBudget:
    """Edit-distance cells one image's matching may still spend."""

    def __init__(self, cells: int = MATCH_BUDGET_CELLS) -> None:
        self.left = cells

    def spend(self, expected: str, found: str) -> bool:
        """Take the cost of matching ``expected`` in ``found`` if it fits."""
        cost = len(expected) * len(found)
        if cost > self.left:
            return False
        self.left -= cost
        return True


def best_match(expected: str, regions: list[Region], budget: MatchBudget | None = None
               ) -> tuple[str | None, float]:
    """The run of consecutive regions that matches ``expected`` best, and its score; runs
    that do not fit in ``budget`` are not scored."""
    budget = budget or MatchBudget()
    best_text: str | None = None
    best_score = 0.0
    for start in range(len(regions)):
        for stop in range(start + 1, min(start + MAX_JOINED_REGIONS, len(regions)) + 1):
            text = " ".join(region.text for region in regions[start:stop])
            if not budget.spend(expected, text):
                continue
            score = similarity(expected, text)
            # Strictly greater: on a tie the shorter run (fewer unrelated words) is kept.
            if score > best_score:
                best_text, best_score = text, score
    return best_text, best_score


def check_typography(
    image: Image.Image,
    expected: list[str],
    *,
    threshold: float,
    det_long_side_px: int = DETECTOR_LONG_SIDE_PX,
) -> Typography:
    """OCR ``image`` once and score every expected phrase; passes when each reaches
    ``threshold``."""
    if not expected:
        raise ValueError("check_typography needs at least one expected phrase, got []")
    regions = read_regions(image, det_long_side_px=det_long_side_px)
    budget = MatchBudget()
    matches = [best_match(phrase, regions, budget) for phrase in expected]
    scores = [round(score, 4) for _, score in matches]
    score = min(scores)
    return Typography(
        expected=list(expected),
        found=[text for text, _ in matches],
        scores=scores,
        score=score,
        threshold=threshold,
        passed=score >= threshold,
    )
