"""Process settings: one typed object built at start-up from ``LANEWAY_*`` variables.

A process loads them once, at its entry point, and passes the object down::

    settings = load_settings()          # SettingsError names each unknown or bad variable
    create_app(settings)

Every ``LANEWAY_*`` variable is a setting, except names under ``RESERVED_PREFIXES``
(secrets a policy names, test-only variables) and the few in ``NOT_SETTINGS`` (read by
something other than a Laneway process). Any other one stops the process at start, with
the closest valid name: a misspelling is never silently ignored.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from controlplane.errors import FieldError, SettingsError

ENV_PREFIX = "LANEWAY_"
#: names a policy gives its secrets (``api_key_env`` of tenants, of remote engines) and
#: names only tests read start with these; the unknown-variable check skips them
SECRET_PREFIX = "LANEWAY_KEY_"
PROVIDER_PREFIX = "LANEWAY_PROVIDER_"
TEST_PREFIX = "LANEWAY_TEST_"
RESERVED_PREFIXES = (SECRET_PREFIX, PROVIDER_PREFIX, TEST_PREFIX)
_VARIABLE_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: ``LANEWAY_`` variables that no Laneway process reads
NOT_SETTINGS = frozenset({
    "LANEWAY_TORCH_SPEC",  # .ci/setup: the torch requirement to install
})


class Settings(BaseSettings):
    """Everything a Laneway process reads from its environment (``LANEWAY_<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    redis_url: str | None = None
    redis_timeout_s: float = Field(
        default=2.0, gt=0,
        description="API: connect and reply timeout of request-path Redis commands; a "
                    "stopped server answers 503 after this long")
    no_engine_grace_s: float = Field(
        default=30.0, ge=0,
        description="API: a route whose first engine no live worker has served for this "
                    "long is refused with 503 no_engine")
    home: Path = Field(default=Path("var"), description="runtime state: pidfiles, AOF, logs")
    registry: Path = Path("registry")
    artifacts: str = Field(
        default="var/artifacts",
        description="image store: a directory, or s3://BUCKET[/PREFIX] (endpoint, keys and "
                    "region from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_REGION)")
    image_urls: Literal["api", "presigned"] = Field(
        default="api",
        description="API: the url of a job's images: the API's own path, or a presigned "
                    "URL of the object (an s3:// store only)")
    image_url_ttl_s: int = Field(default=3600, gt=0,
                                 description="API: how long a presigned image URL works")
    artifact_sweep_interval_s: float = Field(
        default=60.0, gt=0,
        description="controller: how often the images and inputs of expired jobs are "
                    "deleted from the store")
    host: str = "127.0.0.1"
    port: int = 8000
    url: str = Field(default="http://127.0.0.1:8000",
                     description="CLI: the server the admin commands talk to")
    device: str = "cpu"
    torch_threads: int = 1
    ocr_threads: int | None = Field(
        default=None, gt=0,
        description="verifier: threads per onnxruntime session (unset: one per core)")
    admin_token: str | None = None
    metrics_token: str | None = Field(
        default=None, description="API: when set, GET /metrics needs Authorization: Bearer "
                                  "with it (Prometheus' authorization.credentials)")
    node_name: str = Field(default_factory=socket.gethostname,
                           description="prefix of worker and verifier names (default: "
                                       "the host name)")
    drain_timeout_s: float = Field(default=30.0, description="worker: finish running "
                                   "stages for this long on SIGTERM, then hand them back")
    job_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    sse_max_streams: int = Field(
        default=1000, gt=0,
        description="API: open event streams (GET /v1/jobs/{id}/events) per process; "
                    "beyond, 429 too_many_streams")
    sse_max_streams_per_tenant: int = Field(
        default=100, gt=0,
        description="API: open event streams per tenant and process, when the policy has "
                    "tenants; beyond, 429 too_many_streams")
    sse_max_duration_s: float = Field(
        default=300.0, gt=0,
        description="API: an event stream open this long ends with an SSE retry field; "
                    "the client reconnects with Last-Event-ID")
    verify_claim_idle_ms: int = Field(
        default=60_000, gt=0,
        description="a verification left pending this long by a dead verifier is reclaimed")
    provider_key_prefixes: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="policy validation: prefixes a remote engine's api_key_env may start "
                    f"with besides {PROVIDER_PREFIX} (comma-separated)")
    remote_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="policy validation: the only hosts a remote engine's base_url may "
                    "name (comma-separated; empty: any)")

    @field_validator("provider_key_prefixes", "remote_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        items = [item.strip() for item in value.split(",")]
        if items == [""]:
            return ()
        if "" in items:
            raise ValueError(f"an empty item in a comma-separated list (got {value!r})")
        return tuple(items)

    @field_validator("provider_key_prefixes")
    @classmethod
    def _key_prefixes(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in prefixes:
            if not _VARIABLE_PREFIX.fullmatch(prefix):
                raise ValueError(f"a variable-name prefix is letters, digits and _ "
                                 f"(got {prefix!r})")
            upper = prefix.upper()
            # variables under it would stop every process as unknown settings
            if upper.startswith(ENV_PREFIX) and not upper.startswith(RESERVED_PREFIXES):
                raise ValueError(f"{prefix} is under {ENV_PREFIX}, where names are "
                                 f"settings; use {PROVIDER_PREFIX}... or a prefix outside "
                                 f"{ENV_PREFIX}")
        return prefixes

    @field_validator("remote_hosts")
    @classmethod
    def _host_names(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for host in hosts:
            if any(c in host for c in "/@ \t") or (":" in host and not _is_ipv6(host)):
                raise ValueError(f"a host name, without scheme, port or path (got {host!r})")
        return tuple(host.lower() for host in hosts)

    @field_validator("artifacts", mode="before")
    @classmethod
    def _artifacts_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("artifacts")
    @classmethod
    def _artifacts_location(cls, value: str) -> str:
        if not value:
            raise ValueError("expected a directory or s3://BUCKET[/PREFIX] (got '')")
        scheme, sep, rest = value.partition("://")
        if sep and (scheme != "s3" or not rest.split("/")[0]):
            raise ValueError(f"expected a directory or s3://BUCKET[/PREFIX] (got {value!r})")
        return value

    @field_validator("image_urls")
    @classmethod
    def _presigned_needs_s3(cls, value: str, info: ValidationInfo) -> str:
        artifacts = info.data.get("artifacts")
        if value == "presigned" and artifacts is not None and not artifacts.startswith("s3://"):
            raise ValueError(f"presigned image URLs need an s3:// store, but "
                             f"LANEWAY_ARTIFACTS is the directory {artifacts!r}; set "
                             f"LANEWAY_IMAGE_URLS=api or an s3://BUCKET store")
        return value

    @property
    def embedded_dir(self) -> Path:
        return self.home / "valkey"

    def consumer_name(self, role: str) -> str:
        """A name no other process shares, even in containers whose PIDs are all equal:
        ``NODE/ROLE/PID-RANDOM`` (a worker's role is its device)."""
        return f"{self.node_name}/{role}/{os.getpid()}-{secrets.token_hex(3)}"

    def as_environ(self) -> dict[str, str]:
        """These settings as ``LANEWAY_*`` variables (unset ones left out)."""
        return {variable_name(name): _as_variable(value)
                for name, value in self.model_dump().items() if value is not None}


def _as_variable(value: object) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def variable_name(field: str) -> str:
    """The environment variable of a settings field: ``redis_url`` → ``LANEWAY_REDIS_URL``."""
    return ENV_PREFIX + field.upper()


def setting_names() -> list[str]:
    """Every variable that is a setting, in field order."""
    return [variable_name(field) for field in Settings.model_fields]


def unknown_variables(environ: Mapping[str, str]) -> list[FieldError]:
    """One error per ``LANEWAY_*`` name in ``environ`` that is neither a setting nor
    exempt, with the closest setting's name when one is close."""
    valid = setting_names()
    errors = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names without case
        if (not upper.startswith(ENV_PREFIX) or upper in valid or upper in NOT_SETTINGS
                or upper.startswith(RESERVED_PREFIXES)):
            continue
        errors.append(FieldError(name, f"unknown setting {name} ({_hint(upper, valid)})"))
    return errors


def _hint(name: str, valid: list[str]) -> str:
    # compared without the shared prefix, which would make every name look close
    close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX),
                                      [v.removeprefix(ENV_PREFIX) for v in valid], n=1)
    if close:
        return f"did you mean {ENV_PREFIX}{close[0]}?"
    return (f"not a setting; name a policy's secrets {SECRET_PREFIX}... (tenants) or "
            f"{PROVIDER_PREFIX}... (remote engines), test-only variables {TEST_PREFIX}...")


def load_settings() -> Settings:
    """The process's settings from ``os.environ``; its entry point calls this once.

    Raises SettingsError naming every unknown ``LANEWAY_*`` variable and every bad value.
    """
    unknown = unknown_variables(os.environ)
    if unknown:
        raise SettingsError("unknown LANEWAY_ variables", details=unknown)
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError("invalid LANEWAY_ variables", details=[
            _invalid(error["loc"], error["msg"]) for error in exc.errors()]) from None


def _invalid(loc: tuple[int | str, ...], message: str) -> FieldError:
    name = variable_name(str(loc[0])) if loc else ENV_PREFIX
    return FieldError(name, f"invalid setting {name}: {message}")


def child_environ(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child Laneway process: ``environ`` with its settings replaced by
    ``settings``, so the child loads exactly the parent's (command-line options included)."""
    names = set(setting_names())
    inherited = {k: v for k, v in environ.items() if k.upper() not in names}
    return inherited | settings.as_environ()
