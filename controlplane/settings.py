"""Process settings: one typed object built at start-up from ``LANEWAY_*`` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a Laneway process reads from its environment.

    Misspelt ``LANEWAY_*`` variables are not silently accepted as something else: every
    field has one name, shown in ``laneway serve --help``.
    """

    model_config = SettingsConfigDict(env_prefix="LANEWAY_", extra="forbid", frozen=True)

    redis_url: str | None = None
    home: Path = Field(default=Path("var"), description="runtime state: pidfiles, AOF, logs")
    registry: Path = Path("registry")
    artifacts: Path = Path("var/artifacts")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    torch_threads: int = 1
    admin_token: str | None = None
    node_name: str = Field(default="node-1", description="prefix of worker names")
    drain_timeout_s: float = Field(default=30.0, description="worker: finish running "
                                   "stages for this long on SIGTERM, then hand them back")
    job_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    verify_claim_idle_ms: int = Field(
        default=60_000, gt=0,
        description="a verification left pending this long by a dead verifier is reclaimed")

    @property
    def embedded_dir(self) -> Path:
        return self.home / "valkey"
