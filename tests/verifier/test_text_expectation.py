from __future__ import annotations

from verifier.text_expectation import expected_text, quoted_strings


def test_straight_and_curly_double_quotes() -> None:
    prompt = 'a shop sign reading "SALE 50% OFF" above “Fresh Coffee”'
    assert quoted_strings(prompt) == ["SALE 50% OFF", "Fresh Coffee"]


def test_single_quotes_but_not_apostrophes() -> None:
    prompt = "the baker's window, a sign saying 'OPEN' and ‘Hot Bread’, don't blur it"
    assert quoted_strings(prompt) == ["OPEN", "Hot Bread"]


def test_guillemets_and_low_quotes() -> None:
    assert quoted_strings("«Bonjour» und „Guten Tag“") == ["Bonjour", "Guten Tag"]


def test_empty_quotes_are_ignored() -> None:
    assert quoted_strings('a blank sign "  " on a wall') == []


def test_request_text_wins_over_prompt_quotes() -> None:
    assert expected_text([" GRAND OPENING ", ""], 'a poster "SALE"') == ["GRAND OPENING"]


def test_prompt_quotes_when_request_has_no_text() -> None:
    assert expected_text(None, 'a poster "SALE"') == ["SALE"]
    assert expected_text([], "a landscape at dusk") == []
