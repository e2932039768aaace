"""Precision, recall and latency of the typography verdict on a rendered labelled set.

    python bench/verifier_accuracy.py

One onnxruntime thread (``set_ocr_threads(1)`` → ``intra_op_num_threads=1``), so the
latencies are per core. First a sweep of detector sizes on a smaller set, then the full set
at ``DETECTOR_LONG_SIDE_PX`` through ``check_image`` with the default ``Verify`` thresholds.
Writes ``bench/results/verifier_accuracy.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np

from controlplane.policy import Verify
from verifier.checks import check_image
from verifier.typography import (
    DETECTOR_LONG_SIDE_PX,
    check_typography,
    ocr_engine,
    set_ocr_threads,
)

# Run as a script, this folder is sys.path[0]; the labelled set is imported as bench.*.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_result  # noqa: E402
from bench.labelled_set import NEGATIVE_KINDS, Sample, available_fonts, labelled_set  # noqa: E402

N_POSITIVE, N_NEGATIVE, SEED = 120, 120, 2026
SWEEP_N, SWEEP_SEED = 40, 7
SWEEP_SIDES_PX = (1024, 736, 640, 512, 384)
CURVE_THRESHOLDS = (0.8, 0.85, 0.9, 0.95, 1.0)


def rates(labels: list[bool], scores: list[float], threshold: float) -> dict[str, float]:
    tp = sum(1 for y, s in zip(labels, scores, strict=True) if y and s >= threshold)
    fp = sum(1 for y, s in zip(labels, scores, strict=True) if not y and s >= threshold)
    fn = sum(1 for y, s in zip(labels, scores, strict=True) if y and s < threshold)
    return {"threshold": threshold, "precision": round(tp / max(1, tp + fp), 4),
            "recall": round(tp / max(1, tp + fn), 4), "tp": tp, "fp": fp, "fn": fn}


def latency_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1),
            "p95": round(float(np.percentile(ms, 95)), 1),
            "max": round(float(ms.max()), 1), "mean": round(float(ms.mean()), 1)}


def sweep(threshold: float) -> list[dict[str, object]]:
    """Accuracy and latency per detector size on a smaller set, OCR only."""
    samples = list(labelled_set(SWEEP_N, SWEEP_N, seed=SWEEP_SEED))
    labels = [s.positive for s in samples]
    rows: list[dict[str, object]] = []
    for side_px in SWEEP_SIDES_PX:
        ocr_engine(side_px)(np.zeros((64, 64, 3), np.uint8))  # load the models untimed
        scores, seconds = [], []
        for sample in samples:
            start = time.perf_counter()
            verdict = check_typography(sample.image, [sample.expected], threshold=threshold,
                                       det_long_side_px=side_px)
            seconds.append(time.perf_counter() - start)
            scores.append(verdict.score)
        row = {"det_long_side_px": side_px, **rates(labels, scores, threshold),
               "latency_ms": latency_ms(seconds)}
        print(f"sweep {row}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    started = time.perf_counter()
    set_ocr_threads(1)  # as LANEWAY_OCR_THREADS=1 does in a verifier process
    verify = Verify(typography=True, quality=True)
    sweep_rows = sweep(verify.text_threshold)
    ocr_engine()(np.zeros((64, 64, 3), np.uint8))
    labels: list[bool] = []
    scores: list[float] = []
    seconds: list[float] = []
    kinds: list[str] = []
    mistakes: list[dict[str, object]] = []
    sample: Sample
    for sample in labelled_set(N_POSITIVE, N_NEGATIVE, seed=SEED):
        start = time.perf_counter()
        verdict = check_image(sample.image, verify=verify, expected_text=[sample.expected],
                              expected_size=sample.image.size)
        seconds.append(time.perf_counter() - start)
        assert verdict.typography is not None
        score = verdict.typography.score
        labels.append(sample.positive)
        scores.append(score)
        kinds.append(sample.kind)
        if verdict.typography.passed != sample.positive:
            style = sample.style
            mistakes.append({"kind": sample.kind, "expected": sample.expected,
                             "shown": sample.shown, "found": verdict.typography.found[0],
                             "score": score, "font": style.font.name if style.font else None,
                             "font_px": style.font_px, "background": style.background,
                             "blur_px": style.blur_px, "two_lines": style.two_lines})
    result = rates(labels, scores, verify.text_threshold)
    passed_negatives = Counter(k for k, y, s in zip(kinds, labels, scores, strict=True)
                               if not y and s >= verify.text_threshold)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/verifier_accuracy.py",
        "onnxruntime_threads": "1 (LANEWAY_OCR_THREADS=1 → intra_op_num_threads=1)",
        "versions": {name: version(name) for name in ("rapidocr", "onnxruntime", "pillow")},
        "image_px": [1024, 1024],
        "detector_long_side_px": DETECTOR_LONG_SIDE_PX,
        "text_threshold": verify.text_threshold,
        "fonts": [font.name if font else "pillow-default" for font in available_fonts()],
        "counts": {"positives": N_POSITIVE, "negatives": N_NEGATIVE,
                   "negatives_per_kind": N_NEGATIVE // len(NEGATIVE_KINDS),
                   "negatives_passed_per_kind": dict(passed_negatives)},
        "precision": result["precision"], "recall": result["recall"],
        "confusion": {"tp": result["tp"], "fp": result["fp"], "fn": result["fn"],
                      "tn": N_NEGATIVE - result["fp"]},
        "latency_ms_per_image": {"check_image": latency_ms(seconds)},
        "threshold_curve": [rates(labels, scores, t) for t in CURVE_THRESHOLDS],
        "detector_sweep": {"samples": 2 * SWEEP_N, "rows": sweep_rows},
        "mistakes": mistakes,
        "bench_runtime_s": round(time.perf_counter() - started, 1),
    }
    latency = report["latency_ms_per_image"]["check_image"]
    summary = (f"precision {report['precision']}, recall {report['recall']} on "
               f"{N_POSITIVE}+{N_NEGATIVE} labelled images; check_image p95 "
               f"{latency.get('p95')} ms per 1024² image on one core")
    results = write_result("verifier_accuracy", "python bench/verifier_accuracy.py", report,
                           summary)
    print(json.dumps({k: report[k] for k in ("precision", "recall", "confusion",
                                             "latency_ms_per_image")}, indent=2))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
