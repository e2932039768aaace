"""Quality gates that need no model weights: black or NaN-produced frames, near-constant
images, blur, wrong size or aspect ratio. Each gate is one named metric with its threshold."""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlplane.policy import Verify
from controlplane.verification import Limit, Metric, Quality

# Sharpness is measured on the image resized so its long side is this many pixels, which
# makes one threshold fit every output size (a Laplacian's variance falls as the same
# picture is upscaled). Smaller images are measured as they are.
SHARPNESS_LONG_SIDE_PX = 512


def luma(image: Image.Image) -> np.ndarray:
    """ITU-R 601 luma in 0..255 as float32."""
    return np.asarray(image.convert("L"), dtype=np.float32)


def sharpness(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the luma at ``SHARPNESS_LONG_SIDE_PX``."""
    scale = SHARPNESS_LONG_SIDE_PX / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.convert("L").resize(size, Image.Resampling.BOX)
    y = luma(image)
    if min(y.shape) < 3:
        return 0.0
    laplacian = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:]
                 - 4 * y[1:-1, 1:-1])
    return float(laplacian.var())


def _metric(value: float, threshold: float, limit: Limit) -> Metric:
    passed = value >= threshold if limit == "min" else value <= threshold
    return Metric(value=round(value, 4), threshold=threshold, limit=limit, passed=passed)


def check_quality(
    image: Image.Image, *, verify: Verify, expected_size: tuple[int, int] | None
) -> Quality:
    """Every quality metric of ``image`` against the policy's thresholds.

    ``expected_size`` is ``(width, height)``; without it size and aspect are not checked.
    """
    y = luma(image)
    metrics = {
        "mean_luma": _metric(float(y.mean()), verify.min_mean_luma, "min"),
        "std_luma": _metric(float(y.std()), verify.min_std_luma, "min"),
        "sharpness": _metric(sharpness(image), verify.min_sharpness, "min"),
    }
    if expected_size is not None:
        width, height = expected_size
        if width <= 0 or height <= 0:
            raise ValueError(f"expected_size must be positive, got {expected_size!r}")
        aspect_error = abs((image.width / image.height) / (width / height) - 1)
        size_error_px = max(abs(image.width - width), abs(image.height - height))
        metrics["aspect_error"] = _metric(aspect_error, verify.max_aspect_error, "max")
        metrics["size_error_px"] = _metric(size_error_px, verify.max_size_error_px, "max")
    return Quality(metrics=metrics, passed=all(m.passed for m in metrics.values()))
