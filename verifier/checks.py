"""The verifier's one entry point: every check a route's ``verify`` block asks for."""

from __future__ import annotations

from PIL import Image

from controlplane.policy import Verify
from controlplane.verification import Verification, VerificationStatus
from verifier.quality import check_quality
from verifier.typography import check_typography


def check_image(
    image: Image.Image,
    *,
    verify: Verify,
    expected_text: list[str],
    expected_size: tuple[int, int] | None,
) -> Verification:
    """Run the typography and quality checks ``verify`` enables on one image.

    Typography is skipped without expected text; the verdict is ``skipped`` when no check
    applies. ``expected_size`` is ``(width, height)``. The caller sets ``action`` and
    ``attempt``.
    """
    typography = (
        check_typography(image, expected_text, threshold=verify.text_threshold)
        if verify.typography and expected_text
        else None
    )
    quality = (
        check_quality(image, verify=verify, expected_size=expected_size)
        if verify.quality
        else None
    )
    checks = [c.passed for c in (typography, quality) if c is not None]
    if not checks:
        status = VerificationStatus.skipped
    elif all(checks):
        status = VerificationStatus.passed
    else:
        status = VerificationStatus.failed
    return Verification(status=status, typography=typography, quality=quality)
