from __future__ import annotations

from PIL import Image

from controlplane.policy import Verify
from controlplane.verification import Action, VerificationStatus
from tests.verifier.conftest import poster
from verifier.checks import check_image


def test_both_checks_pass() -> None:
    verdict = check_image(poster("SALE 50% OFF"), verify=Verify(typography=True, quality=True),
                          expected_text=["SALE 50% OFF"], expected_size=(1024, 1024))
    assert verdict.status is VerificationStatus.passed
    assert verdict.typography is not None and verdict.typography.passed
    assert verdict.quality is not None and verdict.quality.passed
    assert verdict.action is Action.none and verdict.attempt == 1


def test_quality_failure_fails_the_verdict() -> None:
    verdict = check_image(Image.new("RGB", (1024, 1024)),
                          verify=Verify(typography=True, quality=True),
                          expected_text=["SALE 50% OFF"], expected_size=(1024, 1024))
    assert verdict.status is VerificationStatus.failed
    assert verdict.typography is not None and not verdict.typography.passed


def test_typography_skipped_without_expected_text() -> None:
    verdict = check_image(poster("SALE"), verify=Verify(typography=True, quality=True),
                          expected_text=[], expected_size=None)
    assert verdict.typography is None
    assert verdict.status is VerificationStatus.passed


def test_skipped_when_nothing_applies() -> None:
    verdict = check_image(poster(None), verify=Verify(typography=True),
                          expected_text=[], expected_size=None)
    assert verdict.status is VerificationStatus.skipped
    assert verdict.typography is None and verdict.quality is None
