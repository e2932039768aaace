"""Figures of one burst run: latency per class and phase, admission, utilisation, lost jobs.

Classes: ``draft`` (asked for a draft), ``final`` (asked for a final and rendered as one),
``degraded`` (asked for a final, served through the draft route by admission). Phases by
arrival time: ``steady`` (before and after the spike) and ``spike``. A lane counts as
saturated when work waited for its slots through nearly all of the window: an idle slot
then is the dispatcher's fault, not the load's.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bench.common import percentile

if TYPE_CHECKING:
    from bench.burst import Scenario, Submission

FINAL_STATUSES = ("completed", "failed", "cancelled")
#: queueing shorter than this is the dispatch round trip, not waiting for a slot
WAIT_FLOOR_MS = 50
SATURATED_SHARE = 0.9


def epoch_s(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def job_class(job: dict[str, Any]) -> str:
    if job["intent"] == "draft":
        return "draft"
    return "degraded" if job.get("degraded_from") else "final"


def latency_figures(latencies_s: list[float], service_s: float) -> dict[str, float]:
    if not latencies_s:
        return {"count": 0}
    p95 = percentile(latencies_s, 95)
    return {"count": len(latencies_s), "p50_s": round(percentile(latencies_s, 50), 3),
            "p95_s": round(p95, 3), "p99_s": round(percentile(latencies_s, 99), 3),
            "p95_x_service": round(p95 / service_s, 2)}


def first_stage_figures(parts: list[tuple[int, int]]) -> dict[str, float]:
    """Where the first stage's time went: waiting in its lane, and the engine call."""
    if not parts:
        return {}
    queued, run = [float(q) for q, _ in parts], [float(r) for _, r in parts]
    return {"stage1_queued_ms_p50": round(percentile(queued, 50)),
            "stage1_queued_ms_p95": round(percentile(queued, 95)),
            "stage1_run_ms_p50": round(percentile(run, 50)),
            "stage1_run_ms_p95": round(percentile(run, 95))}


def union_s(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[start, end]``."""
    total, reach = 0.0, start
    for low, high in sorted(intervals):
        low, high = max(low, reach), min(high, end)
        if high > low:
            total += high - low
            reach = high
    return total


def utilisation(jobs: list[dict[str, Any]], devices: dict[str, int], start: float,
                end: float) -> dict[str, Any]:
    """Busy slot time over slot time per engine in ``[start, end]``, and how long work waited.

    ``waiting_share`` is the part of the window in which some stage of the lane was waiting
    for a slot (longer than the dispatch round trip, ``WAIT_FLOOR_MS``); a lane waiting for
    ``SATURATED_SHARE`` of the window is saturated.
    """
    busy: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    waiting: dict[str, list[tuple[float, float]]] = defaultdict(list)
    batch_sizes: dict[str, list[int]] = defaultdict(list)
    for job in jobs:
        for stage in job["stages"]:
            if not (stage.get("started_at") and stage.get("finished_at")):
                continue
            began, ended = epoch_s(stage["started_at"]), epoch_s(stage["finished_at"])
            busy[(stage["worker"], stage["engine"])].append((began, ended))
            enqueued = began - (stage.get("queued_ms") or 0) / 1000
            waiting[stage["engine"]].append((enqueued + WAIT_FLOOR_MS / 1000, began))
            if start <= began < end:
                batch_sizes[stage["engine"]].append(stage.get("batch_size") or 1)
    window_s = end - start
    per_engine: dict[str, Any] = {}
    saturated_busy = saturated_total = all_busy = 0.0
    for engine, count in devices.items():
        busy_s = sum(union_s(iv, start, end) for (_, e), iv in busy.items() if e == engine)
        waiting_share = union_s(waiting.get(engine, []), start, end) / window_s
        saturated = waiting_share >= SATURATED_SHARE
        sizes = batch_sizes.get(engine)
        per_engine[engine] = {
            "slots": count, "utilisation": round(busy_s / (count * window_s), 3),
            "waiting_share": round(waiting_share, 3), "saturated": saturated,
            "stages_started": len(sizes or []),
            "mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else None}
        all_busy += busy_s
        if saturated:
            saturated_busy += busy_s
            saturated_total += count * window_s
    return {"window_s": round(window_s, 1), "per_engine": per_engine,
            "all_slots": round(all_busy / (sum(devices.values()) * window_s), 3),
            "saturated": round(saturated_busy / saturated_total, 3) if saturated_total else None}


def analyse(scenario: Scenario, t0: float, submissions: list[Submission],
            jobs: dict[str, dict[str, Any]], devices: dict[str, int],
            draft_service_s: float) -> dict[str, Any]:
    spike = (scenario.spike_start_s, scenario.spike_end_s)
    latencies: dict[str, dict[str, list[float]]] = {
        "steady": defaultdict(list), "spike": defaultdict(list), "all": defaultdict(list)}
    parts: dict[str, dict[str, list[tuple[int, int]]]] = {
        "steady": defaultdict(list), "spike": defaultdict(list), "all": defaultdict(list)}
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    lost = 0
    for sub in submissions:
        phase = "spike" if spike[0] <= sub.arrival.at_s < spike[1] else "steady"
        if sub.status_code == 429:
            outcomes[f"rejected_{sub.arrival.intent}"] += 1
            continue
        if sub.job_id is None:
            outcomes["errors"] += 1
            errors[(sub.error or f"HTTP {sub.status_code}")[:160]] += 1
            continue
        outcomes["accepted"] += 1
        outcomes["degraded"] += bool(sub.degraded_from)
        job = jobs.get(sub.job_id)
        if job is None or job["status"] not in FINAL_STATUSES:
            lost += 1
            continue
        if job["status"] != "completed":
            failures[(job.get("error") or job["status"])[:160]] += 1
            continue
        latency_s = epoch_s(job["completed_at"]) - epoch_s(job["created_at"])
        for bucket in (phase, "all"):
            latencies[bucket][job_class(job)].append(latency_s)
            first = job["stages"][0]
            parts[bucket][job_class(job)].append(
                (first.get("queued_ms") or 0, first.get("run_ms") or 0))
    by_phase = {phase: {cls: latency_figures(values, draft_service_s)
                        | first_stage_figures(parts[phase][cls])
                        for cls, values in sorted(classes.items())}
                for phase, classes in latencies.items()}
    for figures in by_phase.values():
        figures.setdefault("draft", {"count": 0, "p95_x_service": float("nan")})
    retry_after = [float(s.retry_after_s) for s in submissions
                   if s.retry_after_s is not None]
    answered_ms = [s.answered_s * 1000 - s.arrival.at_s * 1000 for s in submissions]
    done = [j for j in jobs.values() if j["status"] in FINAL_STATUSES]
    window = (t0 + spike[0] + scenario.settle_s, t0 + spike[1])
    return {
        "submitted": len(submissions), **dict(sorted(outcomes.items())),
        "retry_after_s": {"min": min(retry_after), "p50": percentile(retry_after, 50),
                          "max": max(retry_after)} if retry_after else None,
        "submit_answer_ms": {"p50": round(percentile(answered_ms, 50), 1),
                             "p99": round(percentile(answered_ms, 99), 1)},
        "lost": lost, "failed": sum(failures.values()),
        "failures": dict(failures.most_common(3)), "submit_errors": dict(errors.most_common(3)),
        **by_phase,
        "utilisation": utilisation(done, devices, *window),
    }


def summary_line(name: str, figures: dict[str, Any]) -> str:
    spike = figures["spike"]
    draft = spike["draft"]
    final = spike.get("final", {})
    rejected = sum(v for k, v in figures.items() if k.startswith("rejected_"))
    util = figures["utilisation"]["saturated"]
    return (f"{name}: spike draft p95 {draft.get('p95_s')} s ({draft['p95_x_service']}x), "
            f"final p95 {final.get('p95_s')} s, {rejected} rejected, "
            f"{figures.get('degraded', 0)} degraded, saturated util "
            f"{util if util is not None else 'n/a'}, {figures['lost']} lost")
