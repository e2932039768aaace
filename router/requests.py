"""The submit request: its shape, and the checks that need the policy in force."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controlplane.errors import FieldError, ValidationFailed, shown
from controlplane.policy import Intent, Mode, Policy

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
    """Every refusal the policy's limits imply, each naming the field and the value."""
    errors: list[FieldError] = []
    limits = policy.limits
    if not req.prompt.strip():
        errors.append(FieldError("prompt", "must not be empty", req.prompt))
    elif len(req.prompt) > limits.max_prompt_chars:
        errors.append(FieldError(
            "prompt", f"is {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}"))
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


def raise_if_any(errors: list[FieldError]) -> None:
    if errors:
        summary = "; ".join(
            f"{e.field}: {e.message}" + (f" (got {shown(e.value)})" if e.value is not None
                                         else "")
            for e in errors
        )
        raise ValidationFailed(summary, details=errors)
