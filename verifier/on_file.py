"""``laneway verify IMAGE``: the verifier's checks on an image file, printed as a verdict."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from controlplane.policy import Verify
from controlplane.verification import Verification, VerificationStatus
from verifier.checks import check_image

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_UNREADABLE = 2


def run(image_path: Path, *, texts: list[str], verify: Verify, as_json: bool) -> int:
    """Check ``image_path`` with the policy's thresholds and print the verdict.

    Quality always runs; typography runs when ``texts`` are given, whatever the route's
    ``verify`` enables. Returns 0 passed, 1 failed, 2 when the file is not a readable image.
    """
    try:
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        print(f"cannot read image {str(image_path)!r}: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    phrases = [text for text in texts if text.strip()]
    enabled = verify.model_copy(update={"typography": bool(phrases), "quality": True})
    verdict = check_image(image, verify=enabled, expected_text=phrases, expected_size=None)
    print(verdict.model_dump_json(indent=2) if as_json else format_table(verdict))
    return EXIT_PASSED if verdict.status is VerificationStatus.passed else EXIT_FAILED


def format_table(verdict: Verification) -> str:
    """The verdict as aligned text for a terminal."""
    lines = [f"verification: {verdict.status.value}"]
    typography = verdict.typography
    if typography is not None:
        lines.append(f"typography: {_outcome(typography.passed)} "
                     f"(score {typography.score:.3f}, threshold {typography.threshold:.3f})")
        for expected, found, score in zip(typography.expected, typography.found,
                                          typography.scores, strict=True):
            shown = "(nothing read)" if found is None else repr(found)
            lines.append(f"  {expected!r:<32} found {shown:<32} score {score:.3f}")
    quality = verdict.quality
    if quality is not None:
        lines.append(f"quality: {_outcome(quality.passed)}")
        for name, metric in quality.metrics.items():
            lines.append(f"  {name:<14} {metric.value:>12.3f}   {metric.limit} "
                         f"{metric.threshold:<10g} {_outcome(metric.passed)}")
    return "\n".join(lines)


def _outcome(passed: bool) -> str:
    return "pass" if passed else "FAIL"
