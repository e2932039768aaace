from __future__ import annotations

import pytest

from tests.verifier.conftest import poster
from verifier.typography import (
    MatchBudget,
    Region,
    best_match,
    check_typography,
    normalise,
    ocr_params,
    same_char,
    set_ocr_threads,
    similarity,
)


def test_normalise_drops_whitespace_and_punctuation() -> None:
    assert normalise(" Sale:  50%\tOFF! ") == "Sale50OFF"
    assert normalise("ＳＡＬＥ") == "SALE"  # NFKC folds full-width letters


def test_confusables_rule() -> None:
    assert similarity("SALE 50% OFF", "SALE 5O% 0FF") == 1.0
    assert similarity("HOTEL 101", "HOTEL I0l") == 1.0
    assert same_char("I", "l") and same_char("l", "1") and same_char("o", "0")
    # Case-insensitive, but not transitive through case: i ≠ l and L ≠ I.
    assert not same_char("i", "l")
    assert not same_char("L", "I")
    assert similarity("Daily", "Dally") < 1.0


def test_similarity_ignores_text_around_the_phrase() -> None:
    assert similarity("SALE 50% OFF", "BIG SALE 50% OFF TODAY") == 1.0
    assert similarity("SALE 50% OFF", "SALE 60% OFF") == 1 - 1 / 9
    assert similarity("SALE", "") == 0.0


def test_rendered_phrase_passes_and_is_recorded() -> None:
    verdict = check_typography(poster("SALE 50% OFF"), ["SALE 50% OFF"], threshold=1.0)
    assert verdict.passed
    assert verdict.expected == ["SALE 50% OFF"]
    assert verdict.found[0] is not None and normalise(verdict.found[0]).upper() == "SALE50OFF"
    assert verdict.score == 1.0 and verdict.scores == [1.0]
    assert verdict.threshold == 1.0


def test_confusable_rendering_passes() -> None:
    # Letter O in "5O" and digit zero in "0FF": the image shows the confusables.
    verdict = check_typography(poster("SALE 5O% 0FF"), ["SALE 50% OFF"], threshold=1.0)
    assert verdict.passed, verdict


def test_wrong_text_fails() -> None:
    verdict = check_typography(poster("Fresh Coffee Daily"), ["SALE 50% OFF"], threshold=1.0)
    assert not verdict.passed
    assert verdict.score < 0.5


def test_missing_text_fails() -> None:
    verdict = check_typography(poster(None), ["SALE 50% OFF"], threshold=1.0)
    assert not verdict.passed
    assert verdict.found == [None] and verdict.score == 0.0


def test_one_character_change_fails() -> None:
    verdict = check_typography(poster("Fresh Coffee Dairy"), ["Fresh Coffee Daily"],
                               threshold=1.0)
    assert not verdict.passed
    assert 0.9 < verdict.score < 1.0


def test_phrase_split_over_two_lines_is_joined() -> None:
    image = poster("Live Music Tonight", two_lines=True, font_px=96)
    verdict = check_typography(image, ["Live Music Tonight"], threshold=1.0)
    assert verdict.passed, verdict


def test_every_phrase_must_be_found() -> None:
    verdict = check_typography(poster("Grand Opening"), ["Grand Opening", "Saturday"],
                               threshold=1.0)
    assert not verdict.passed
    assert verdict.scores[0] == 1.0 and verdict.scores[1] < 1.0
    assert verdict.score == verdict.scores[1]


def test_ocr_threads_reach_onnxruntime_only_when_set() -> None:
    assert "EngineConfig.onnxruntime.intra_op_num_threads" not in ocr_params(640, None)
    params = ocr_params(640, 1)
    assert params["EngineConfig.onnxruntime.intra_op_num_threads"] == 1
    assert params["EngineConfig.onnxruntime.inter_op_num_threads"] == 1
    with pytest.raises(ValueError, match="OCR threads must be a positive integer, got 0"):
        set_ocr_threads(0)


def _regions(*texts: str) -> list[Region]:
    return [Region(text, 0.9, top_px=i * 30, bottom_px=i * 30 + 20, left_px=0)
            for i, text in enumerate(texts)]


def test_a_phrase_over_the_budget_is_not_scored_and_leaves_it_to_the_others() -> None:
    regions = _regions("GRAND OPENING", "TODAY ONLY")
    budget = MatchBudget()
    huge = "A" * 2_000_000
    assert best_match(huge, regions, budget) == (None, 0.0)
    assert budget.left == MatchBudget().left  # nothing was spent on it
    found, score = best_match("GRAND OPENING", regions, budget)
    assert (found, score) == ("GRAND OPENING", 1.0)
    assert budget.left < MatchBudget().left


def test_matching_stops_where_the_budget_ends() -> None:
    regions = _regions("NOTHING HERE", "OPEN 24 HOURS")
    phrase = "OPEN 24 HOURS"
    # room for the first candidate only: the region holding the phrase is never scored
    budget = MatchBudget(cells=len(phrase) * len("NOTHING HERE"))
    assert best_match(phrase, regions, budget)[1] < 0.5
    assert best_match(phrase, regions)[1] == 1.0
