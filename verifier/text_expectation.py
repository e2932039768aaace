"""Which text an image must show: the request's ``text`` list, else the prompt's quotes."""

from __future__ import annotations

import re

# Double quotes of any style always delimit text. Single quotes only do when the opening
# quote does not follow a letter and the closing one is not followed by one, so that the
# apostrophes in "don't" or "the shop's door" are not read as quotes.
_QUOTED = re.compile(
    r'"([^"\n]+)"'
    r"|“([^”\n]+)”"
    r"|„([^“”\n]+)[“”]"
    r"|«([^»\n]+)»"
    r"|(?<!\w)['‘]([^'‘’\n]+)['’](?!\w)"
)


def quoted_strings(prompt: str) -> list[str]:
    """The non-empty strings between quotes in ``prompt``, in order of appearance."""
    found: list[str] = []
    for match in _QUOTED.finditer(prompt):
        text = next(group for group in match.groups() if group is not None).strip()
        if text:
            found.append(text)
    return found


def expected_text(text: list[str] | None, prompt: str) -> list[str]:
    """The phrases to look for: ``text`` when the request gave any, else the prompt's quotes."""
    if text:
        return [phrase.strip() for phrase in text if phrase.strip()]
    return quoted_strings(prompt)
