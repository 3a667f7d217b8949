"""Benchmark: 200 small jobs submitted at once to a local stack, and what happens to every one.

Starts a LocalStack (the four real services as processes on loopback) on a tiny random Llama, with
Redis given by --redis-url or an embedded one, submits every job concurrently through the gateway's
gRPC API, waits for all of them, and reports:
- completed / failed / lost: lost is a job accepted but not finished by the deadline (must be 0);
- duplicated: work done twice for one self-edit (must be 0), counted four independent ways: results
  each service computed (its /metrics: seal_task_duration_seconds_count) beyond the tasks it was
  given, edits or verdicts per job beyond the expected one, verdict events per self-edit beyond one
  (the events stream, tailed live), adapters on the student's disk beyond the self-edits;
- latency: queue (submission to "proposed"), per stage, and end to end, p50 / p99; jobs per minute;
- Redis used_memory and the namespace's key count before and after.

    .venv/bin/python benchmarks/load.py [--jobs 200] [--redis-url URL] [--out load.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import parse_job_spec
from gateway.client import GatewayClient
from seal.config import SERVICE_KINDS
from seal.models import build_tiny_model
from seal.records import Job, JobState
from seal.stack import LocalStack

STAGE_STREAMS = {"teacher": "propose", "student": "apply", "auditor": "audit"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def job_body(i: int) -> dict[str, Any]:
    """One small job: one document, one self-edit, no passage control, the cheapest LoRA."""
    return {
        "documents": [
            {
                "title": f"Town {i}",
                "context": f"Town {i} lies by the river Ost. Its market opens every Tuesday at dawn.",
                "questions": [
                    {"question": f"Which river is Town {i} by?", "answer": "Ost"},
                    {"question": f"When does the market of Town {i} open?", "answer": "Tuesday"},
                ],
            }
        ],
        "n_self_edits": 1,
        "passage_control": False,
        "lora": {"epochs": 1, "rank": 4},
        "sampling": {"max_new_tokens": 8},
    }


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_s": percentile(values, 50), "p99_s": percentile(values, 99)}


def entry_time(entry_id: bytes) -> float:
    return int(entry_id.split(b"-")[0]) / 1000


@dataclass
class EventTail:
    """Reads the events stream as it is written (no consumer group, so the gateway is unaffected)
    and keeps when each event was added: the gateway deletes events once folded into the job."""

    client: redis.Redis
    key: str
    first_seen: dict[str, float] = field(default_factory=dict)
    """task id ("proposed/<job>/<doc>", "trained/<self-edit>", "verdict/<self-edit>") -> added at"""
    counts: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = b"0-0"
        while not self.stop.is_set():
            reply = self.client.xread({self.key: last}, count=1000, block=200)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    task_id = fields.get(b"task_id", b"").decode()
                    self.counts[task_id] += 1
                    self.first_seen.setdefault(task_id, entry_time(entry_id))

    def start(self) -> EventTail:
        threading.Thread(target=self.run, name="event-tail", daemon=True).start()
        return self


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a service's /metrics, keyed by (name, sorted labels)."""
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def scrape_or_empty(address: str) -> dict:
    try:
        return scrape(address)
    except OSError as exc:  # a service without /metrics must not lose the other figures
        log(f"no metrics from {address}: {exc}")
        return {}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def namespace_keys(client: redis.Redis, namespace: str) -> int:
    return sum(1 for _ in client.scan_iter(f"{namespace}:*", count=1000))


def key_census(client: redis.Redis, namespace: str) -> dict[str, dict[str, int]]:
    """Keys of the namespace by kind (the part after the namespace), and how many never expire."""
    census: dict[str, dict[str, int]] = {}
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    for key, ttl in zip(keys, pipe.execute(), strict=True):
        kind = key.decode().removeprefix(namespace + ":").split(":")[0]
        entry = census.setdefault(kind, {"keys": 0, "without_ttl": 0})
        entry["keys"] += 1
        entry["without_ttl"] += int(ttl == -1)
    return dict(sorted(census.items()))


def submit_all(client: GatewayClient, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Submit every job at the same moment (one thread each, released together)."""
    gate = threading.Barrier(len(bodies))

    def one(body: dict[str, Any]) -> dict[str, Any]:
        spec = parse_job_spec(body)
        gate.wait()
        started = time.time()
        try:
            job = client.submit(spec)
            return {"id": job.id, "submitted_at": started, "accepted_s": time.time() - started}
        except grpc.RpcError as exc:  # a refused submission is a figure, not a crash
            return {"id": "", "submitted_at": started, "error": f"{exc.code().name}: {exc.details()}"}

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(one, bodies))


def wait_all(
    client: redis.Redis, namespace: str, ids: list[str], timeout_s: float, report: Callable[[Counter], None]
) -> dict[str, str]:
    """Poll every job's state hash in one Redis round trip until all are finished or time runs out."""
    deadline = time.monotonic() + timeout_s
    finished = {JobState.SUCCEEDED.value, JobState.FAILED.value}
    states: dict[str, str] = {}
    last_report = 0.0
    while True:
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"{namespace}:job:{job_id}:state", "state")
        states = {job_id: (s or b"missing").decode() for job_id, s in zip(ids, pipe.execute(), strict=True)}
        tally = Counter(states.values())
        if time.monotonic() - last_report > 15:
            report(tally)
            last_report = time.monotonic()
        if all(s in finished for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def duplicates(
    jobs: list[Job],
    tail: EventTail,
    computed: dict[str, float | None],
    adapters_on_disk: int,
    expected_edits: int,
) -> dict[str, int]:
    """Work done more than once for one self-edit, by each independent count."""
    per_job_edits = sum(max(0, len(d.edits) - expected_edits) for j in jobs for d in j.documents)
    per_job_verdicts = sum(
        max(0, sum(e.verdict is not None for e in d.edits) - expected_edits)
        for j in jobs
        for d in j.documents
    )
    shas = [e.adapter.sha256 for j in jobs for d in j.documents for e in d.edits if e.adapter is not None]
    reused_adapters = len(shas) - len(set(shas))
    events = sum(n - 1 for task_id, n in tail.counts.items() if n > 1)
    expected_tasks = {
        "propose": len(jobs),
        "apply": len(jobs) * expected_edits,
        "audit": len(jobs) * expected_edits,
    }
    # Without a service's /metrics this count cannot be made: -1 says so (and fails the run).
    computed_twice = (
        sum(max(0, int(computed[s]) - expected_tasks[s]) for s in expected_tasks)
        if all(computed[s] is not None for s in expected_tasks)
        else -1
    )
    return {
        "results_computed_twice": computed_twice,
        "edits_beyond_expected": per_job_edits,
        "verdicts_beyond_expected": per_job_verdicts,
        "adapters_shared_by_two_edits": reused_adapters,
        "events_added_twice": events,
        "adapters_on_disk_beyond_trained": max(0, adapters_on_disk - len(shas)),
    }


def stage_latencies(jobs: list[Job], submitted: dict[str, float], tail: EventTail) -> dict[str, dict]:
    queue, train, audit, fold, end_to_end = [], [], [], [], []
    for job in jobs:
        t0 = submitted[job.id]
        proposed = tail.first_seen.get(f"proposed/{job.id}/0")
        if proposed is not None:
            queue.append(proposed - t0)
        for doc in job.documents:
            for edit in doc.edits:
                trained = tail.first_seen.get(f"trained/{edit.self_edit.id}")
                verdict = tail.first_seen.get(f"verdict/{edit.self_edit.id}")
                if proposed is not None and trained is not None:
                    train.append(trained - proposed)
                if trained is not None and verdict is not None:
                    audit.append(verdict - trained)
                if verdict is not None and job.finished_at:
                    fold.append(job.finished_at - verdict)
        if job.finished_at:
            end_to_end.append(job.finished_at - t0)
    return {
        "queue_submit_to_proposed": summary(queue),
        "proposed_to_trained": summary(train),
        "trained_to_verdict": summary(audit),
        "verdict_to_finished": summary(fold),
        "end_to_end": summary(end_to_end),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="seal-load-"))
    model_dir = build_tiny_model(work / "tiny-llama")
    namespace = f"seal-load-{uuid.uuid4().hex[:8]}"
    flags = {"student": ["--adapter-retention", "0"]}  # keep every adapter, so the disk count is exact
    stack = LocalStack(
        model=str(model_dir),
        data_dir=work / "stack",
        redis_url=args.redis_url,
        namespace=namespace,
        threads=args.threads,
        extra_flags=flags,
    )
    log(f"starting the stack in {work} (namespace {namespace})")
    with stack:
        client = redis.Redis.from_url(stack.redis_url)
        memory_before = int(client.info("memory")["used_memory"])
        keys_before = namespace_keys(client, namespace)
        tail = EventTail(client, f"{namespace}:stream:events").start()
        gateway = GatewayClient(stack.addresses["gateway"], timeout_s=300, token=stack.operator_token)

        log(f"submitting {args.jobs} jobs at once")
        started = time.time()
        submissions = submit_all(gateway, [job_body(i) for i in range(args.jobs)])
        accepted = [s for s in submissions if s["id"]]
        log(f"{len(accepted)} accepted in {time.time() - started:.1f} s")
        ids = [s["id"] for s in accepted]
        # A submission answered with an error may still have created its job (the client cannot
        # tell): the namespace's job index holds every job that exists.
        ghosts = sorted({i.decode() for i in client.zrange(f"{namespace}:jobs", 0, -1)} - set(ids))
        states = wait_all(
            client,
            namespace,
            ids + ghosts,
            args.timeout_s,
            lambda t: log(f"{time.time() - started:.0f} s: {dict(t)}"),
        )
        elapsed = time.time() - started
        time.sleep(1.0)  # let the tail read the last events
        tail.stop.set()

        jobs = [gateway.get(job_id) for job_id in ids]
        ghost_jobs = [gateway.get(job_id) for job_id in ghosts]
        samples = {kind: scrape_or_empty(stack.metrics_addresses[kind]) for kind in SERVICE_KINDS}
        memory_after = int(client.info("memory")["used_memory"])
        keys_after = namespace_keys(client, namespace)
        census = key_census(client, namespace)
        adapters_dir = stack.data_dir / "student" / "adapters"
        on_disk = (
            sum(1 for p in adapters_dir.iterdir() if SHA256.match(p.name)) if adapters_dir.is_dir() else 0
        )
        gateway.close()
        if args.redis_url:  # a shared Redis: leave nothing behind
            for key in client.scan_iter(f"{namespace}:*", count=1000):
                client.delete(key)

    computed = {
        stream: sample(samples[kind], "seal_task_duration_seconds_count", service=kind, stream=stream)
        if samples[kind]
        else None
        for kind, stream in STAGE_STREAMS.items()
    }
    by_state = Counter(j.state.value for j in jobs)
    finished_at = [j.finished_at for j in jobs if j.finished_at]
    completed = by_state.get(JobState.SUCCEEDED.value, 0)
    span = (max(finished_at) - started) if finished_at else elapsed
    dup = duplicates(jobs + ghost_jobs, tail, computed, on_disk, expected_edits=1)
    return {
        "jobs": args.jobs,
        "accepted": len(accepted),
        "refused": dict(Counter(s["error"] for s in submissions if not s["id"])),
        "refused_but_created": {j.id: j.state.value for j in ghost_jobs},
        "completed": completed,
        "failed": by_state.get(JobState.FAILED.value, 0),
        "failure_reasons": dict(Counter(j.error[:120] for j in jobs if j.state == JobState.FAILED)),
        "lost": sum(1 for i in ids if states[i] not in (JobState.SUCCEEDED.value, JobState.FAILED.value)),
        "duplicated": sum(dup.values()) if dup["results_computed_twice"] >= 0 else None,
        "duplicate_checks": dup,
        "submit_accept_s": summary([s["accepted_s"] for s in accepted]),
        "latency": stage_latencies(jobs, {s["id"]: s["submitted_at"] for s in accepted}, tail),
        "wall_s": elapsed,
        "jobs_per_minute": completed / span * 60 if span > 0 else None,
        "redis": {
            "used_memory_before": memory_before,
            "used_memory_after": memory_after,
            "namespace_keys_before": keys_before,
            "namespace_keys_after": keys_after,
            "keys_after_by_kind": census,
            "embedded": not args.redis_url,
        },
        "services": {
            "results_computed": computed,
            "retries": sum(
                v for s in samples.values() for (n, _), v in s.items() if n == "seal_task_retries_total"
            ),
            "dead_letters": sum(
                v for s in samples.values() for (n, _), v in s.items() if n == "seal_dead_letters_total"
            ),
            "verdicts_passed": sample(samples["auditor"], "seal_verdicts_total", outcome="passed"),
            "verdicts_failed": sample(samples["auditor"], "seal_verdicts_total", outcome="failed"),
            "training_steps": sample(samples["student"], "seal_training_steps_total"),
            "jobs_submitted": sample(samples["gateway"], "seal_jobs_submitted_total"),
        },
        "threads_per_model_service": args.threads or "cores/3",
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(r: dict[str, Any]) -> None:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = [
        ("jobs submitted at once", r["jobs"]),
        ("accepted / refused", f"{r['accepted']} / {sum(r['refused'].values())}"),
        ("refused, yet created and run", len(r["refused_but_created"])),
        ("completed", r["completed"]),
        ("failed", r["failed"]),
        ("lost (must be 0)", r["lost"]),
        ("duplicated (must be 0)", r["duplicated"]),
        ("wall time (s)", s(r["wall_s"])),
        ("jobs per minute", s(r["jobs_per_minute"])),
    ]
    for stage, v in r["latency"].items():
        rows.append((f"{stage} p50 / p99 (s)", f"{s(v['p50_s'])} / {s(v['p99_s'])}  (n={v['n']})"))
    mem = r["redis"]
    rows += [
        ("Redis used_memory before / after (MiB)",
         f"{mem['used_memory_before'] / 2**20:.2f} / {mem['used_memory_after'] / 2**20:.2f}"),
        ("namespace keys before / after", f"{mem['namespace_keys_before']} / {mem['namespace_keys_after']}"),
        ("retries / dead letters", f"{r['services']['retries']:.0f} / {r['services']['dead_letters']:.0f}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--redis-url", default="", help="a Redis to use; default: an embedded one")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per model service (0: cores/3)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up waiting after this long")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    result = run(args)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    sys.exit(0 if result["lost"] == 0 and result["duplicated"] == 0 and result["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
