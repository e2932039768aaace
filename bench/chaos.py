"""Chaos soak: mixed traffic against a real Laneway while a seeded scheduler breaks it.

Topology: ``laneway serve`` (the bundled Valkey, the API, workers for the simulated engines
of ``bench/policies/chaos.yaml``, the verifier, the controller, all supervised) plus a
second API process on the same Valkey (``serve --redis-url … --no-workers``), restarted
by this harness when it is killed, as an orchestrator would. Client threads send drafts,
finals (two stages and a verdict), cancels and SSE followers to both APIs; a client
retries a refused or unanswered submit with the same ``Idempotency-Key``, so an accepted
job is counted once.

Faults, at random moments from a seeded generator, one at a time: ``kill -9`` of the sim
worker, of the verifier and of the second API process; Redis stopped (SIGSTOP) for a
while and continued; Redis killed (-9) and restarted by serve with its AOF.

Afterwards every accepted job must be final (``completed``, ``failed`` with a cause,
``cancelled``), no stage may have run more often than its engine's ``max_attempts``,
every route's in-flight count must be 0, no client may have seen a 5xx outside the
contract's error shape, and the service must answer a waited draft without a restart::

    python bench/chaos.py --minutes 10 --seed 7      # writes bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH, write_result  # noqa: E402
from controlplane import keys  # noqa: E402
from controlplane.policy import Policy  # noqa: E402
from controlplane.policy_loader import load_policy  # noqa: E402
from tests.service import Service, descendants, pid_alive  # noqa: E402

POLICY = BENCH / "policies" / "chaos.yaml"
FAULTS = ("kill_worker", "kill_verifier", "kill_api", "stop_redis", "kill_redis")
#: how long a client keeps retrying one submit (through a Redis stop)
SUBMIT_PATIENCE_S = 60.0
#: after the traffic stops, how long accepted jobs get to end
SETTLE_S = 240.0


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    seed: int = 7
    clients: int = 4
    #: seconds between faults, drawn uniformly
    gap_s: tuple[float, float] = (10.0, 25.0)
    #: how long Redis stays stopped, drawn uniformly
    stop_s: tuple[float, float] = (10.0, 20.0)


@dataclass
class Tally:
    """What the clients and the scheduler saw; shared by their threads under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict[str, str] = field(default_factory=dict)  # job id -> intent
    statuses: Counter[int] = field(default_factory=Counter)
    errors_5xx: Counter[str] = field(default_factory=Counter)  # code
    off_contract: list[str] = field(default_factory=list)
    unreachable: int = 0
    submits_given_up: int = 0
    cancels: int = 0
    sse_streams: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def saw(self, response: httpx.Response) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code < 500:
                return
            try:
                error = response.json()["error"]
                assert set(error) == {"code", "message", "details"}
                self.errors_5xx[error["code"]] += 1
            except (ValueError, KeyError, TypeError, AssertionError):
                self.off_contract.append(f"{response.status_code}: {response.text[:200]}")


class Soak:
    def __init__(self, config: SoakConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.policy: Policy = load_policy(POLICY)
        self.tally = Tally()
        self.stop = threading.Event()
        self.main = Service(home=workdir / "main", registry=workdir / "registry",
                            policy=POLICY)
        self.second: Service | None = None

    # -- topology --------------------------------------------------------------------

    def start(self) -> None:
        self.main.start()
        self.second = self._second_api()

    def _second_api(self, port: int | None = None) -> Service:
        extra = {"LANEWAY_REDIS_URL": self.redis_url,
                 "LANEWAY_ARTIFACTS": str(self.main.home / "artifacts")}
        service = Service(home=self.workdir / "second", registry=self.workdir / "registry",
                          policy=POLICY, extra_args=["--no-workers"], extra_env=extra,
                          wait_for_worker=False)
        if port is not None:
            service.port = port
        return service.start()

    def stop_all(self) -> None:
        if self.second is not None and self.second.process is not None:
            self.second.stop()
        self.main.stop()

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self._valkey()['port']}/0"

    def _valkey(self) -> dict[str, int]:
        """The bundled server's pid and port (its state file is rewritten on a restart)."""
        path = self.main.home / "valkey" / "server.json"
        deadline = time.monotonic() + 10
        while True:
            try:
                state: dict[str, int] = json.loads(path.read_text())
                return state
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _child(self, *words: str) -> int | None:
        assert self.main.process is not None
        for pid in descendants(self.main.process.pid):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if all(w in args for w in words) and pid_alive(pid):
                return pid
        return None

    @property
    def urls(self) -> list[str]:
        return [self.main.url] + ([self.second.url] if self.second else [])

    # -- faults ----------------------------------------------------------------------

    def _faults(self) -> None:
        rng = random.Random(self.config.seed)
        order: list[str] = []
        while not self.stop.wait(rng.uniform(*self.config.gap_s)):
            if not order:
                order = list(FAULTS)
                rng.shuffle(order)
            fault = order.pop()
            self._inject(fault, rng)
            with self.tally.lock:
                self.tally.faults[fault] += 1

    def _inject(self, fault: str, rng: random.Random) -> None:
        if fault == "kill_worker":
            _kill(self._child("worker", "sim"))
        elif fault == "kill_verifier":
            _kill(self._child("verifier"))
        elif fault == "kill_api":
            assert self.second is not None and self.second.process is not None
            port = self.second.port
            self.second.process.kill()
            self.second.process.wait()
            self.second = self._second_api(port)  # the orchestrator starts it again
        elif fault == "stop_redis":
            pid = self._valkey()["pid"]
            os.kill(pid, signal.SIGSTOP)
            try:
                self.stop.wait(rng.uniform(*self.config.stop_s))
            finally:
                os.kill(pid, signal.SIGCONT)
        elif fault == "kill_redis":
            _kill(self._valkey()["pid"])

    # -- traffic ---------------------------------------------------------------------

    def _client(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                roll = rng.random()
                if roll < 0.5:
                    self._submit(http, rng, "draft", wait=rng.choice([0, 0, 5]))
                elif roll < 0.75:
                    self._submit(http, rng, "final", wait=0)
                elif roll < 0.87:
                    self._cancel(http, rng)
                else:
                    self._follow(http, rng)

    def _request(self, http: httpx.Client, rng: random.Random, method: str, path: str,
                 **kwargs: Any) -> httpx.Response | None:
        url = rng.choice(self.urls) + path
        try:
            response = http.request(method, url, **kwargs)
        except httpx.HTTPError:
            with self.tally.lock:
                self.tally.unreachable += 1
            return None
        self.tally.saw(response)
        return response

    def _submit(self, http: httpx.Client, rng: random.Random, intent: str, *,
                wait: int) -> None:
        body = {"prompt": f"chaos {rng.random():.6f}", "intent": intent, "wait": wait}
        headers = {"Idempotency-Key": uuid.UUID(int=rng.getrandbits(128)).hex}
        deadline = time.monotonic() + SUBMIT_PATIENCE_S
        while time.monotonic() < deadline:
            response = self._request(http, rng, "POST", "/v1/images", json=body,
                                     headers=headers)
            if response is not None and response.status_code in (200, 202):
                with self.tally.lock:
                    self.tally.accepted[response.json()["id"]] = intent
                return
            if response is not None and response.status_code < 500:
                return  # refused on purpose (429 and the like): not accepted
            time.sleep(0.2)  # 503 or no answer: the same key again
        with self.tally.lock:
            self.tally.submits_given_up += 1

    def _some_job(self, rng: random.Random) -> str | None:
        with self.tally.lock:
            ids = list(self.tally.accepted)
        return rng.choice(ids[-50:]) if ids else None

    def _cancel(self, http: httpx.Client, rng: random.Random) -> None:
        job_id = self._some_job(rng)
        if job_id is not None and self._request(http, rng, "DELETE",
                                                f"/v1/jobs/{job_id}") is not None:
            with self.tally.lock:
                self.tally.cancels += 1

    def _follow(self, http: httpx.Client, rng: random.Random) -> None:
        job_id = self._some_job(rng)
        if job_id is None:
            return
        url = rng.choice(self.urls) + f"/v1/jobs/{job_id}/events"
        try:
            with http.stream("GET", url, timeout=15) as response:
                if response.status_code >= 400:
                    response.read()  # a refusal is a body, not a stream
                self.tally.saw(response)
                for line in response.iter_lines():
                    if line.startswith("event:") and line.split(":", 1)[1].strip() in {
                            "completed", "failed", "cancelled"}:
                        break
        except httpx.HTTPError:
            with self.tally.lock:
                self.tally.unreachable += 1
            return
        with self.tally.lock:
            self.tally.sse_streams += 1

    # -- the run ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.config.clients)]
        scheduler = threading.Thread(target=self._faults, daemon=True)
        for thread in [*threads, scheduler]:
            thread.start()
        self.stop.wait(self.config.duration_s)
        self.stop.set()
        for thread in [scheduler, *threads]:
            thread.join(timeout=SUBMIT_PATIENCE_S + 30)
        return self._settle()

    def _settle(self) -> dict[str, Any]:
        """Wait for every accepted job to end, then check what the issue asks."""
        with self.tally.lock:
            accepted = dict(self.tally.accepted)
        jobs: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + SETTLE_S
        with httpx.Client(base_url=self.main.url, timeout=30) as http:
            pending = set(accepted)
            while pending and time.monotonic() < deadline:
                for job_id in list(pending):
                    response = _get(http, f"/v1/jobs/{job_id}")
                    if response is None or response.status_code != 200:
                        continue
                    jobs[job_id] = response.json()
                    if jobs[job_id]["status"] in {"completed", "failed", "cancelled"}:
                        pending.discard(job_id)
                if pending:
                    time.sleep(0.5)
            after = _get(http, "/v1/images", method="POST",
                         json={"prompt": "after the soak", "intent": "draft", "wait": 30})
        client = redis.Redis.from_url(self.redis_url)
        inflight = {route.name: int(client.get(keys.route_inflight(route.name)) or 0)
                    for route in self.policy.routes}
        client.close()
        return self._figures(accepted, jobs, pending, inflight, after)

    def _figures(self, accepted: dict[str, str], jobs: dict[str, dict[str, Any]],
                 pending: set[str], inflight: dict[str, int],
                 after: httpx.Response | None) -> dict[str, Any]:
        final = Counter(job["status"] for job in jobs.values())
        failed_by_cause = Counter(_cause(job) for job in jobs.values()
                                  if job["status"] == "failed")
        over_attempts = [
            f"{job['id']} stage {i}: {stage['attempts']} attempts"
            for job in jobs.values() for i, stage in enumerate(job["stages"])
            if stage["attempts"] > self.policy.engines[stage["engine"]].max_attempts]
        failed_without_cause = [job["id"] for job in jobs.values()
                                if job["status"] == "failed" and _cause(job) == "unknown"]
        answered_after = (after is not None and after.status_code == 200
                          and after.json().get("status") == "completed")
        tally = self.tally
        return {
            "config": {"duration_s": self.config.duration_s, "seed": self.config.seed,
                       "clients": self.config.clients, "gap_s": self.config.gap_s,
                       "stop_s": self.config.stop_s},
            "accepted": len(accepted),
            "accepted_by_intent": dict(Counter(accepted.values())),
            "final": dict(final),
            "not_final": sorted(pending),
            "failed_by_cause": dict(failed_by_cause),
            "failed_without_cause": failed_without_cause,
            "over_attempts": over_attempts,
            "inflight_after": inflight,
            "faults": dict(tally.faults),
            "client_statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
            "errors_5xx_by_code": dict(tally.errors_5xx),
            "off_contract_5xx": tally.off_contract[:20],
            "unreachable": tally.unreachable,
            "submits_given_up": tally.submits_given_up,
            "cancels": tally.cancels,
            "sse_streams": tally.sse_streams,
            "answered_after": answered_after,
        }


def problems(figures: dict[str, Any]) -> list[str]:
    """What the soak's figures break of the issue's promises (empty: all kept)."""
    out = []
    if figures["not_final"]:
        out.append(f"{len(figures['not_final'])} accepted jobs not final: "
                   f"{figures['not_final'][:5]}")
    if figures["failed_without_cause"]:
        out.append(f"failed without a cause: {figures['failed_without_cause'][:5]}")
    if figures["over_attempts"]:
        out.append(f"stages over their attempts: {figures['over_attempts'][:5]}")
    if any(figures["inflight_after"].values()):
        out.append(f"in-flight counts not back to 0: {figures['inflight_after']}")
    if figures["off_contract_5xx"]:
        out.append(f"5xx outside the contract's shape: {figures['off_contract_5xx'][:3]}")
    if not figures["answered_after"]:
        out.append("the service did not answer a waited draft after the soak")
    return out


def soak(config: SoakConfig, workdir: Path) -> dict[str, Any]:
    run = Soak(config, workdir)
    run.start()
    try:
        return run.run()
    finally:
        run.stop_all()


def _kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _get(http: httpx.Client, path: str, *, method: str = "GET",
         **kwargs: Any) -> httpx.Response | None:
    try:
        return http.request(method, path, **kwargs)
    except httpx.HTTPError:
        return None


def _cause(job: dict[str, Any]) -> str:
    """A failed job's cause in a few words: its error up to the first colon."""
    error = job.get("error") or next(
        (s["error"] for s in job["stages"] if s.get("error")), None)
    return str(error).split(":", 1)[0][:60] if error else "unknown"


def summary(figures: dict[str, Any]) -> str:
    final = figures["final"]
    faults = ", ".join(f"{k} {v}" for k, v in sorted(figures["faults"].items()))
    causes = ", ".join(f"{k} {v}" for k, v in figures["failed_by_cause"].items()) or "none"
    statuses = ", ".join(f"{k}: {v}" for k, v in figures["client_statuses"].items()
                         if int(k) >= 400)
    return (f"{figures['config']['duration_s'] / 60:.0f} min, seed {figures['config']['seed']}:"
            f" {figures['accepted']} accepted, {final.get('completed', 0)} completed, "
            f"{final.get('cancelled', 0)} cancelled, {final.get('failed', 0)} failed "
            f"(by cause: {causes}), {len(figures['not_final'])} not final; faults: {faults};"
            f" client errors {statuses or 'none'}, {figures['unreachable']} unanswered; "
            f"{len(figures['off_contract_5xx'])} 5xx off contract; "
            f"in-flight after {sum(figures['inflight_after'].values())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic duration")
    parser.add_argument("--seed", type=int, default=7, help="seeds faults and traffic")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    args = parser.parse_args(argv)
    config = SoakConfig(duration_s=args.minutes * 60, seed=args.seed, clients=args.clients)
    with tempfile.TemporaryDirectory(prefix="laneway-chaos-") as tmp:
        figures = soak(config, Path(tmp))
    broken = problems(figures)
    figures["problems"] = broken
    command = f"python bench/chaos.py --minutes {args.minutes:g} --seed {args.seed}"
    write_result("chaos", command, figures, summary(figures))
    print(summary(figures))
    for problem in broken:
        print("PROBLEM:", problem)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
