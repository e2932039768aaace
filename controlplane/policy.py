"""The policy format: typed, frozen models for the YAML in CONTRACT.md.

Unknown keys are errors everywhere. Cross-references (engines, routes, tiers, aliases) are
checked by :func:`check_references` after the shapes validate, so each error can name its
path. Loading from YAML with line numbers lives in ``controlplane/policy_loader.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from controlplane.errors import FieldError
from controlplane.settings import (
    ENV_PREFIX,
    PROVIDER_PREFIX,
    RESERVED_PREFIXES,
    SECRET_PREFIX,
    Settings,
    setting_names,
)


def _not_a_setting(name: str) -> None:
    if name.upper() in setting_names():
        raise ValueError(f"{name} is a Laneway setting; a policy names the variable of a "
                         "secret, never a setting")


def _secret_env_name(name: str) -> str:
    """A variable that holds a secret must not look like a setting (it would stop the
    process at start as an unknown one): ``LANEWAY_`` names need ``LANEWAY_KEY_``."""
    _not_a_setting(name)
    upper = name.upper()
    if upper.startswith(ENV_PREFIX) and not upper.startswith(RESERVED_PREFIXES):
        raise ValueError(f"{ENV_PREFIX} names are settings; name a secret "
                         f"{SECRET_PREFIX}{upper.removeprefix(ENV_PREFIX)} or outside "
                         f"{ENV_PREFIX}")
    return name


def _provider_key_env_name(name: str) -> str:
    """A remote engine's key variable is never a setting; which prefixes it may have is
    the operator's choice (:func:`check_remote_engines`)."""
    _not_a_setting(name)
    upper = name.upper()
    if upper.startswith(ENV_PREFIX) and not upper.startswith(RESERVED_PREFIXES):
        raise ValueError(f"{ENV_PREFIX} names are settings; name a provider's key "
                         f"{PROVIDER_PREFIX}{upper.removeprefix(ENV_PREFIX)}")
    return name


SecretEnvName = Annotated[str, AfterValidator(_secret_env_name)]
"""The name of the environment variable that holds a secret (never the secret)."""
ProviderKeyEnvName = Annotated[str, AfterValidator(_provider_key_env_name)]
"""The name of the environment variable that holds a remote engine's API key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Intent(StrEnum):
    draft = "draft"
    final = "final"
    auto = "auto"


class Mode(StrEnum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"


class EngineKind(StrEnum):
    text2image = "diffusers.text2image"
    image2image = "diffusers.image2image"
    inpaint = "diffusers.inpaint"
    latent_upscale = "diffusers.latent_upscale"
    upscale = "diffusers.upscale"
    resize = "resize"
    sim = "sim"
    openai_images = "http.openai_images"


#: kinds that denoise ``steps x strength`` of their steps from an input image
STRENGTH_KINDS = frozenset({EngineKind.image2image, EngineKind.inpaint})
DIFFUSERS_KINDS = frozenset(
    {EngineKind.text2image, EngineKind.image2image, EngineKind.inpaint,
     EngineKind.latent_upscale, EngineKind.upscale}
)
#: engine kinds that run on a worker's own device (a GPU, or the CPU for resize); the others
#: are remote (``http.openai_images``) or simulated (``sim``)
DEVICE_KINDS = DIFFUSERS_KINDS | {EngineKind.resize}

PositiveInt = Annotated[int, Field(gt=0)]


#: the largest request body the API reads at all (Litestar's ``request_max_body_size``)
MAX_BODY_BYTES_CEILING = 64 * 1024 * 1024
#: room in a request body for everything but its ``image`` and ``mask``
BODY_ALLOWANCE_BYTES = 1024 * 1024


class Limits(Strict):
    """Bounds on a submitted request, checked before anything of it is stored."""

    max_pixels: PositiveInt = 1024 * 1024
    max_n: PositiveInt = 4
    #: characters of ``prompt``, and of ``negative_prompt``
    max_prompt_chars: PositiveInt = 2000
    #: phrases in ``text``, and characters in each phrase
    max_text_phrases: PositiveInt = 8
    max_text_chars: PositiveInt = 200
    #: ``metadata``: its size as compact JSON (UTF-8), how deep its objects and lists nest
    #: (``{"a": 1}`` is 1 deep) and its keys counted at every depth
    max_metadata_bytes: PositiveInt = 4 * 1024
    max_metadata_depth: PositiveInt = 4
    max_metadata_keys: PositiveInt = 64
    #: each decoded ``image`` and ``mask``
    max_image_bytes: PositiveInt = 16 * 1024 * 1024
    #: the whole request body; unset: room for ``image`` and ``mask`` in base64 plus
    #: ``BODY_ALLOWANCE_BYTES`` (see :attr:`body_limit_bytes`)
    max_body_bytes: int | None = Field(default=None, gt=0, le=MAX_BODY_BYTES_CEILING)
    default_width: PositiveInt = 1024
    default_height: PositiveInt = 1024

    @property
    def body_limit_bytes(self) -> int:
        """The largest request body accepted: ``max_body_bytes``, else two base64 images of
        ``max_image_bytes`` plus 1 MiB, at most ``MAX_BODY_BYTES_CEILING``."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        base64_bytes = -(-self.max_image_bytes // 3) * 4
        return min(2 * base64_bytes + BODY_ALLOWANCE_BYTES, MAX_BODY_BYTES_CEILING)


class Tier(Strict):
    weight: PositiveInt = 1
    deferrable: bool = False


class SimService(Strict):
    """Service time of a simulated device (``kind: sim``), for capacity planning only."""

    mean_ms: float = Field(gt=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    per_item_ms: float = Field(default=0, ge=0)
    dist: Literal["lognormal", "fixed"] = "lognormal"


class Circuit(Strict):
    failures: PositiveInt = 5
    window_s: float = Field(default=30, gt=0)
    cooldown_s: float = Field(default=10, gt=0)


class EngineSpec(Strict):
    kind: EngineKind
    model: str | None = None
    steps: PositiveInt | None = None
    guidance: float | None = Field(default=None, ge=0)
    strength: float | None = Field(default=None, gt=0, le=1)
    max_concurrency: PositiveInt = 1
    max_batch: PositiveInt = 1
    max_wait_ms: int = Field(default=0, ge=0)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: bool = False
    fuse_lora: str | None = None
    max_loaded_adapters: PositiveInt = 4
    claim_idle_ms: PositiveInt = 30_000
    max_attempts: PositiveInt = 3
    #: device memory the engine needs loaded (weights and activations at its batch size);
    #: counted against a worker's ``--memory-gb`` budget
    memory_gb: float | None = Field(default=None, gt=0)
    #: stays loaded whatever the budget asks; else unloads after ``idle_unload_s`` idle
    keep_warm: bool = False
    idle_unload_s: float | None = Field(default=None, gt=0)
    cost_per_device_s: float | None = Field(default=None, ge=0)
    native_size: PositiveInt | None = None
    sim: SimService | None = None
    #: before ``base_url``: its validator reads this
    allow_insecure: bool = False
    base_url: str | None = None
    api_key_env: ProviderKeyEnvName | None = None
    timeout_s: float = Field(default=60, gt=0)
    rpm: PositiveInt | None = None
    cost_per_image: float | None = Field(default=None, ge=0)
    circuit: Circuit = Circuit()

    @field_validator("base_url")
    @classmethod
    def _https_unless_allowed(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (parses the port; a bad one raises)
        except ValueError as exc:
            raise ValueError(f"not a URL ({exc})") from None
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("an https:// URL with a host")
        if parts.scheme == "http" and not info.data.get("allow_insecure"):
            raise ValueError("http:// sends the API key and the prompts in clear; use "
                             "https://, or set allow_insecure: true (a loopback provider)")
        return url

    @model_validator(mode="after")
    def _fields_for_kind(self) -> EngineSpec:
        if self.kind in DIFFUSERS_KINDS and not self.model:
            raise ValueError(f"engines of kind {self.kind.value} need 'model' (a registry name)")
        if self.kind is EngineKind.sim and self.sim is None:
            raise ValueError("engines of kind sim need 'sim: {mean_ms: ...}'")
        if self.kind is EngineKind.openai_images and not (self.base_url and self.model):
            raise ValueError("engines of kind http.openai_images need 'base_url' and 'model'")
        if self.fuse_lora and self.kind not in DIFFUSERS_KINDS:
            raise ValueError("'fuse_lora' only applies to diffusers engines")
        if self.allow_insecure and self.base_url is None:
            raise ValueError("'allow_insecure' only applies to engines with a 'base_url'")
        return self

    @property
    def is_local_model(self) -> bool:
        return self.kind in DIFFUSERS_KINDS


class Match(Strict):
    intent: Intent | None = None
    has_text: bool | None = None
    tier: str | None = None
    mode: Mode | None = None
    min_pixels: PositiveInt | None = None
    max_pixels: PositiveInt | None = None


class Stage(Strict):
    engine: str
    scale: float | None = Field(default=None, gt=0, le=8)
    size: Literal["input", "native", "target"] | None = None
    strength: float | None = Field(default=None, gt=0, le=1)
    steps: PositiveInt | None = None
    fallback: tuple[str, ...] = ()


class OnFull(StrEnum):
    reject = "reject"
    degrade = "degrade"
    defer = "defer"


class Admission(Strict):
    max_queue: PositiveInt = 1000
    on_full: OnFull = OnFull.reject
    degrade_to: str | None = None

    @model_validator(mode="after")
    def _degrade_needs_target(self) -> Admission:
        if self.on_full is OnFull.degrade and not self.degrade_to:
            raise ValueError("on_full: degrade needs 'degrade_to' (a route name)")
        return self


class OnFail(StrEnum):
    none = "none"
    regenerate = "regenerate"
    flag = "flag"


class Verify(Strict):
    typography: bool = False
    quality: bool = False
    on_fail: OnFail = OnFail.flag
    max_attempts: PositiveInt = 2
    text_threshold: float = Field(default=1.0, ge=0, le=1)
    min_mean_luma: float = Field(default=4.0, ge=0)
    min_std_luma: float = Field(default=2.0, ge=0)
    min_sharpness: float = Field(default=10.0, ge=0)
    max_aspect_error: float = Field(default=0.02, ge=0)
    max_size_error_px: int = Field(default=0, ge=0)


class Route(Strict):
    name: str = Field(min_length=1)
    match: Match = Match()
    stages: tuple[Stage, ...] = Field(min_length=1)
    admission: Admission = Admission()
    verify: Verify | None = None
    timeout_s: float = Field(default=300, gt=0)


class Alias(Strict):
    intent: Intent | None = None
    route: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Alias:
        if (self.intent is None) == (self.route is None):
            raise ValueError("an alias names exactly one of 'intent' or 'route'")
        return self


class Tenant(Strict):
    api_key_env: SecretEnvName
    tiers: tuple[str, ...] = ()


class Devices(Strict):
    """Defaults for every worker device (``laneway worker --max-stages`` overrides)."""

    #: stages running at once on one device across its engines (None: only the engines'
    #: own ``max_concurrency`` caps apply)
    max_concurrent_stages: PositiveInt | None = None


class Defer(Strict):
    max_interactive_depth: int = Field(default=0, ge=0)
    #: deferred jobs waiting at most; a submit that would defer one more is refused (429)
    max_depth: PositiveInt = 10_000


class Policy(Strict):
    version: Literal[1] = 1
    limits: Limits = Limits()
    tiers: dict[str, Tier] = Field(default_factory=lambda: {"standard": Tier(weight=1)})
    default_tier: str = "standard"
    engines: dict[str, EngineSpec] = Field(min_length=1)
    routes: tuple[Route, ...] = Field(min_length=1)
    aliases: dict[str, Alias] = Field(default_factory=dict)
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    defer: Defer = Defer()
    devices: Devices = Devices()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @cached_property
    def version_id(self) -> str:
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()
        return f"sha256:{digest}"

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


def check_references(policy: Policy) -> list[FieldError]:
    """Every name a policy uses must exist; return one error per dangling reference."""
    errors: list[FieldError] = []
    route_names = [r.name for r in policy.routes]
    if policy.default_tier not in policy.tiers:
        errors.append(FieldError("default_tier", "unknown tier", policy.default_tier))
    for i, route in enumerate(policy.routes):
        at = f"routes[{i}]"
        if route_names.count(route.name) > 1:
            errors.append(FieldError(f"{at}.name", "duplicate route name", route.name))
        if route.match.tier is not None and route.match.tier not in policy.tiers:
            errors.append(FieldError(f"{at}.match.tier", "unknown tier", route.match.tier))
        for j, stage in enumerate(route.stages):
            if stage.engine not in policy.engines:
                errors.append(FieldError(f"{at}.stages[{j}].engine", "unknown engine",
                                         stage.engine))
            for k, name in enumerate(stage.fallback):
                if name not in policy.engines:
                    errors.append(FieldError(f"{at}.stages[{j}].fallback[{k}]",
                                             "unknown engine", name))
            spec = policy.engines.get(stage.engine)
            if spec is not None and spec.kind in STRENGTH_KINDS:
                steps, strength = stage.steps or spec.steps, stage.strength or spec.strength
                if steps is not None and strength is not None and int(steps * strength) < 1:
                    errors.append(FieldError(
                        f"{at}.stages[{j}]", f"runs no denoising step: steps {steps} x "
                        f"strength {strength} is under 1 (img2img runs steps x strength)",
                        stage.engine))
        degrade_to = route.admission.degrade_to
        if degrade_to is not None:
            if degrade_to not in route_names:
                errors.append(FieldError(f"{at}.admission.degrade_to", "unknown route",
                                         degrade_to))
            elif degrade_to == route.name:
                errors.append(FieldError(f"{at}.admission.degrade_to",
                                         "a route cannot degrade to itself", degrade_to))
    for name, alias in policy.aliases.items():
        if alias.route is not None and alias.route not in route_names:
            errors.append(FieldError(f"aliases.{name}.route", "unknown route", alias.route))
    for name, tenant in policy.tenants.items():
        for k, tier in enumerate(tenant.tiers):
            if tier not in policy.tiers:
                errors.append(FieldError(f"tenants.{name}.tiers[{k}]", "unknown tier", tier))
    return errors


def check_models(policy: Policy, known_models: set[str]) -> list[FieldError]:
    """Every registry model the local engines name must exist in the registry."""
    errors: list[FieldError] = []
    for name, spec in policy.engines.items():
        if spec.is_local_model and spec.model not in known_models:
            errors.append(FieldError(f"engines.{name}.model", "not in the model registry",
                                     spec.model))
        if spec.fuse_lora is not None and spec.fuse_lora not in known_models:
            errors.append(FieldError(f"engines.{name}.fuse_lora", "not in the model registry",
                                     spec.fuse_lora))
    return errors


@dataclass(frozen=True)
class RemoteRules:
    """What the operator lets remote engines name: the prefixes of their key variables
    and the hosts they may call (empty: any). The process that validates a policy builds
    them from its settings::

        check_remote_engines(policy, RemoteRules.from_settings(settings))
    """

    key_prefixes: tuple[str, ...] = (PROVIDER_PREFIX,)
    hosts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteRules:
        """``LANEWAY_PROVIDER_KEY_PREFIXES`` (after the default) and ``LANEWAY_REMOTE_HOSTS``."""
        return cls(key_prefixes=(PROVIDER_PREFIX, *settings.provider_key_prefixes),
                   hosts=settings.remote_hosts)


def check_remote_engines(policy: Policy, rules: RemoteRules) -> list[FieldError]:
    """Every engine's ``api_key_env`` and ``base_url`` must be allowed by ``rules``."""
    errors: list[FieldError] = []
    for name, spec in policy.engines.items():
        if spec.api_key_env is not None and not spec.api_key_env.startswith(
                rules.key_prefixes):
            errors.append(FieldError(
                f"engines.{name}.api_key_env",
                f"a remote engine's key variable starts with {' or '.join(rules.key_prefixes)}"
                " (the operator adds prefixes with LANEWAY_PROVIDER_KEY_PREFIXES)",
                spec.api_key_env))
        host = urlsplit(spec.base_url).hostname if spec.base_url else None
        if host is not None and rules.hosts and host not in rules.hosts:
            errors.append(FieldError(
                f"engines.{name}.base_url",
                f"host {host} is not in LANEWAY_REMOTE_HOSTS ({', '.join(rules.hosts)})",
                spec.base_url))
    return errors
