from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from controlplane.policy import Verify
from tests.verifier.conftest import poster
from verifier.quality import check_quality

VERIFY = Verify(quality=True)


def failed(image: Image.Image, expected_size: tuple[int, int] | None = None) -> list[str]:
    quality = check_quality(image, verify=VERIFY, expected_size=expected_size)
    assert quality.passed == (not quality.failed_metrics)
    return quality.failed_metrics


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """What diffusers' ``numpy_to_pil`` does with a decoded batch in [0, 1]."""
    images = (images * 255).round().astype("uint8")
    return [Image.fromarray(image) for image in images]


def test_rendered_poster_passes_every_gate() -> None:
    assert failed(poster("Grand Opening"), expected_size=(1024, 1024)) == []


def test_black_frame_fails() -> None:
    black = Image.new("RGB", (1024, 1024))
    assert {"mean_luma", "std_luma", "sharpness"} <= set(failed(black))


def test_nan_produced_frame_fails() -> None:
    # An fp16 VAE overflow decodes to NaN; the pipeline's post-processing clips and casts it.
    decoded = np.full((1, 256, 256, 3), np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        (image,) = numpy_to_pil(np.clip(decoded / 2 + 0.5, 0, 1))
    assert "mean_luma" in failed(image)


def test_near_constant_frame_fails() -> None:
    rng = np.random.default_rng(0)
    grey = np.clip(180 + rng.normal(0, 0.8, (512, 512, 3)), 0, 255).astype(np.uint8)
    failures = failed(Image.fromarray(grey))
    assert "std_luma" in failures and "mean_luma" not in failures


def test_blurred_frame_fails_on_sharpness_only() -> None:
    blurred = poster("Grand Opening", blur_px=0).filter(ImageFilter.GaussianBlur(6))
    assert failed(blurred) == ["sharpness"]


def test_sharpness_threshold_holds_across_sizes() -> None:
    sharp = poster("Grand Opening", blur_px=0)
    upscaled = sharp.resize((2048, 2048), Image.Resampling.BICUBIC)
    assert "sharpness" not in failed(upscaled)


def test_wrong_aspect_fails() -> None:
    failures = failed(poster("Grand Opening"), expected_size=(1024, 768))
    assert failures == ["aspect_error", "size_error_px"]


def test_wrong_size_with_right_aspect_fails() -> None:
    small = poster("Grand Opening").resize((512, 512))
    assert failed(small, expected_size=(1024, 1024)) == ["size_error_px"]


def test_metrics_record_value_threshold_and_limit() -> None:
    quality = check_quality(Image.new("RGB", (64, 64)), verify=VERIFY, expected_size=(64, 64))
    mean_luma = quality.metrics["mean_luma"]
    assert (mean_luma.value, mean_luma.threshold, mean_luma.limit) == (0.0, 4.0, "min")
    assert quality.metrics["aspect_error"].limit == "max"
