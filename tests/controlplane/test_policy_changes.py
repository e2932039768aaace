"""Policy apply/rollback/watch against a real Redis: invalid files never change routing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from controlplane import audit
from controlplane.errors import PolicyError
from controlplane.policy import RemoteRules
from controlplane.policy_changes import apply_policy_text, rollback_policy
from controlplane.policy_store import PolicyStore
from controlplane.policy_watch import PolicyWatcher
from controlplane.registry import Registry
from tests.controlplane.rollout_fixtures import POLICY_YAML, policy
from tests.service import free_port


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_watch_applies_edits_and_keeps_the_last_good_policy(
        redis: aioredis.Redis, tiny_registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML)
    watcher = PolicyWatcher(redis, path, tiny_registry, remote=RemoteRules())
    first = await watcher.check_once()
    assert first is not None and first.version == policy(1).version_id
    assert await watcher.check_once() is None                      # unchanged file
    path.write_text(POLICY_YAML.replace("steps: 1", "steps: 2"))
    second = await watcher.check_once()
    assert second is not None and second.changed and second.previous == first.version
    path.write_text(POLICY_YAML.replace("match: {}", "match: {intent: doodle}"))
    assert await watcher.check_once() is None
    assert any("routes[0].match.intent" in e for e in watcher.last_errors), watcher.last_errors
    assert await PolicyStore(redis).current_version() == policy(2).version_id


async def test_watch_tries_again_when_redis_did_not_answer(
        redis: aioredis.Redis, tiny_registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML)
    nobody = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    watcher = PolicyWatcher(nobody, path, tiny_registry, remote=RemoteRules())
    assert await watcher.check_once() is None  # refused connection: nothing recorded
    assert watcher.seen_sha256 is None and watcher.last_errors == []
    await nobody.aclose()
    watcher.redis = redis  # Redis is back
    applied = await watcher.check_once()
    assert applied is not None and applied.version == policy(1).version_id
    assert await PolicyStore(redis).current_version() == policy(1).version_id


async def test_apply_refuses_unknown_models_and_rollback_goes_back(
        redis: aioredis.Redis, tiny_registry: Registry) -> None:
    rules = RemoteRules()
    await apply_policy_text(redis, POLICY_YAML, tiny_registry, remote=rules, actor="ci",
                            reason="v1", source="a.yaml")
    with pytest.raises(PolicyError) as refused:
        await apply_policy_text(redis, POLICY_YAML.replace("model: tiny-sdxl,", "model: nope,"),
                                tiny_registry, remote=rules, actor="ci", reason="typo",
                                source="b.yaml")
    assert refused.value.details[0].field == "engines.base.model"
    await apply_policy_text(redis, POLICY_YAML.replace("steps: 1", "steps: 3"), tiny_registry,
                            remote=rules, actor="ci", reason="more steps", source="c.yaml")
    back = await rollback_policy(redis, tiny_registry, remote=rules, actor="oncall",
                                 reason="too slow")
    assert back.version == policy(1).version_id
    history = await PolicyStore(redis).history()
    assert [c.reason for c in history] == ["v1", "more steps", "too slow"]
    actions = [(e.actor, e.action) for e in await audit.recent(redis, target="policy")]
    assert actions == [("ci", "policy.apply"), ("ci", "policy.apply"),
                       ("oncall", "policy.rollback")]


WITH_REMOTE = POLICY_YAML.replace("routes:", """\
  hosted: {kind: http.openai_images, base_url: "https://images.example.com/v1", model: m,
           api_key_env: ACME_IMAGES_KEY}
routes:""")


async def test_apply_and_rollback_check_remote_engines_against_the_operators_rules(
        redis: aioredis.Redis, tiny_registry: Registry) -> None:
    with pytest.raises(PolicyError) as refused:
        await apply_policy_text(redis, WITH_REMOTE, tiny_registry, remote=RemoteRules(),
                                actor="ci", reason="remote", source="a.yaml")
    (detail,) = refused.value.details
    assert detail.field == "engines.hosted.api_key_env" and detail.value == "ACME_IMAGES_KEY"
    assert detail.message.startswith("line 8: ")  # applying text names the line
    operator = RemoteRules(key_prefixes=("LANEWAY_PROVIDER_", "ACME_"),
                           hosts=("images.example.com",))
    first = await apply_policy_text(redis, WITH_REMOTE, tiny_registry, remote=operator,
                                    actor="ci", reason="remote", source="a.yaml")
    await apply_policy_text(redis, POLICY_YAML, tiny_registry, remote=operator, actor="ci",
                            reason="local only", source="b.yaml")
    # the operator has since narrowed the hosts: going back to the remote engine is refused
    narrowed = RemoteRules(key_prefixes=operator.key_prefixes, hosts=("api.example.com",))
    with pytest.raises(PolicyError) as refused:
        await rollback_policy(redis, tiny_registry, remote=narrowed, actor="oncall",
                              reason="back", to=first.version)
    assert [d.field for d in refused.value.details] == ["engines.hosted.base_url"]
    assert "images.example.com is not in LANEWAY_REMOTE_HOSTS" in refused.value.details[0].message
    assert await PolicyStore(redis).current_version() == policy(1).version_id
