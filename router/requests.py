"""The submit request: its shape, and the checks that need the policy in force."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controlplane.errors import FieldError, ValidationFailed, shown
from controlplane.policy import Intent, Limits, Mode, Policy

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    scale: float = Field(default=1.0, ge=0, le=4)


class ImageRequest(BaseModel):
    """``POST /v1/images`` body (CONTRACT.md). Policy-dependent limits are checked later."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    intent: Intent = Intent.auto
    width: int | None = None
    height: int | None = None
    n: int = 1
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    mode: Mode = Mode.txt2img
    image: str | None = None
    mask: str | None = None
    strength: float | None = Field(default=None, gt=0, le=1)
    lora: LoraSpec | None = None
    text: list[str] | None = None
    tier: str | None = None
    wait: float = Field(default=0, ge=0, le=600)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def expected_text(self) -> list[str]:
        """Text the image must show: the ``text`` list, else quoted strings in the prompt."""
        if self.text is not None:
            return [t for t in self.text if t.strip()]
        return [a or b for a, b in _QUOTED.findall(self.prompt)]


def check_against_policy(req: ImageRequest, policy: Policy) -> list[FieldError]:
    """Every refusal the policy's limits imply, each naming the field (and the value,
    where it is small)."""
    limits = policy.limits
    errors = check_sizes(req, limits)
    if len(req.prompt) <= limits.max_prompt_chars and not req.prompt.strip():
        errors.append(FieldError("prompt", "must not be empty", req.prompt))
    width = req.width if req.width is not None else limits.default_width
    height = req.height if req.height is not None else limits.default_height
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 8:
            errors.append(FieldError(name, "must be a positive multiple of 8", value))
    if width * height > limits.max_pixels:
        errors.append(FieldError(
            "width", f"{width}x{height} is {width * height} pixels; the limit is "
                     f"{limits.max_pixels}", width))
    if not 1 <= req.n <= limits.max_n:
        errors.append(FieldError("n", f"must be between 1 and {limits.max_n}", req.n))
    if req.tier is not None and req.tier not in policy.tiers:
        errors.append(FieldError("tier", f"unknown tier; known: {sorted(policy.tiers)}",
                                 req.tier))
    if req.mode is Mode.txt2img:
        for name in ("image", "mask", "strength"):
            if getattr(req, name) is not None:
                errors.append(FieldError(name, "only allowed with mode img2img or inpaint"))
    else:
        if req.image is None:
            errors.append(FieldError("image", f"is required with mode {req.mode.value}"))
        if req.mode is Mode.inpaint and req.mask is None:
            errors.append(FieldError("mask", "is required with mode inpaint"))
        if req.mode is Mode.img2img and req.mask is not None:
            errors.append(FieldError("mask", "only allowed with mode inpaint"))
    return errors


def check_sizes(req: ImageRequest, limits: Limits) -> list[FieldError]:
    """The size limits of the free-form fields; each error names the field and the size,
    never the value. Counts are checked before contents, so refusing a huge field costs
    one pass over it at most."""
    errors: list[FieldError] = []
    for name, value in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if value is not None and len(value) > limits.max_prompt_chars:
            errors.append(FieldError(
                name, f"is {len(value)} characters; the limit is {limits.max_prompt_chars}"))
    if req.text is not None:
        if len(req.text) > limits.max_text_phrases:
            errors.append(FieldError(
                "text", f"has {len(req.text)} phrases; the limit is {limits.max_text_phrases}"))
        else:
            errors.extend(
                FieldError(f"text[{i}]", f"is {len(phrase)} characters; the limit is "
                                         f"{limits.max_text_chars}")
                for i, phrase in enumerate(req.text) if len(phrase) > limits.max_text_chars)
    error = metadata_error(req.metadata, limits)
    if error is not None:
        errors.append(error)
    return errors


def metadata_error(metadata: dict[str, Any], limits: Limits) -> FieldError | None:
    """Why ``metadata`` is too large, or None: its depth, keys and elements first, in a
    walk that stops at the first excess, then its size as JSON (small by then).

    Every key and list item takes at least a byte of JSON, so the walk stops after
    ``max_metadata_bytes`` elements at most.
    """
    keys = elements = 0
    pending: list[tuple[Any, int]] = [(metadata, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            keys += len(value)
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        elements += len(children)
        if depth > limits.max_metadata_depth:
            return FieldError("metadata", f"nests deeper than {limits.max_metadata_depth} "
                                          "levels of objects and lists")
        if keys > limits.max_metadata_keys:
            return FieldError("metadata", f"has more than {limits.max_metadata_keys} keys "
                                          "(counted at every depth)")
        if elements > limits.max_metadata_bytes:
            return FieldError("metadata", f"is more than {limits.max_metadata_bytes} bytes "
                                          "as JSON")
        pending.extend((child, depth + 1) for child in children
                       if isinstance(child, dict | list))
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > limits.max_metadata_bytes:
        return FieldError("metadata", f"is {size} bytes as JSON; the limit is "
                                      f"{limits.max_metadata_bytes}")
    return None


def raise_if_any(errors: list[FieldError]) -> None:
    if errors:
        summary = "; ".join(
            f"{e.field}: {e.message}" + (f" (got {shown(e.value)})" if e.value is not None
                                         else "")
            for e in errors
        )
        raise ValidationFailed(summary, details=errors)
