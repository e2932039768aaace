"""Issue 11, acceptance 3: a 2 GB worker serving two 1.5 GB engines holds one at a time;
the unloads show in ``/metrics`` and the worker's memory in ``/v1/status``."""

from __future__ import annotations

from controlplane.policy_loader import load_policy
from tests.conftest import POLICIES
from tests.router.conftest import RouterFactory


async def test_the_budget_swaps_engines_and_metrics_show_it(make_router: RouterFactory) -> None:
    policy = load_policy(POLICIES / "memory_budget.yaml")
    async with make_router(policy) as router:
        worker = await router.start_worker("sim-a", "sim-b", memory_gb=2.0)
        seen: list[list[str]] = []
        for intent in ["draft", "final", "draft", "final"]:
            job = (await router.submit(intent=intent)).json()
            await router.wait_job(job["id"], "completed")
            seen.append(worker.memory.loaded())
        assert seen == [["sim-a"], ["sim-b"], ["sim-a"], ["sim-b"]]
        assert worker.memory.unloads == {"sim-a": 2, "sim-b": 1}  # a, b, a, b

        await worker._heartbeat()
        metrics = (await router.http.get("/metrics")).text
        unloads = [line for line in metrics.splitlines()
                   if line.startswith("laneway_worker_engine_unloads_total{")]
        assert any('engine="sim-a"' in line and line.endswith(" 2.0") for line in unloads)
        assert 'laneway_worker_memory_budget_gb{' in metrics
        status = (await router.http.get("/v1/status")).json()
        (memory,) = [w["memory"] for w in status["workers"]]
        assert memory["total_gb"] == 2.0 and memory["loaded"] == ["sim-b"]
