"""Prometheus metrics move when a real Worker processes, retries and dead-letters tasks on real Redis;
queue depth is read from Redis at scrape time; /metrics answers the Prometheus text format."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from seal import metrics
from seal.embedded_redis import free_port
from seal.errors import PermanentError
from seal.workplane import Task, Worker, WorkPlane


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _worker(plane: WorkPlane, namespace: str, handle, **kw) -> Worker:
    # The group is unique to the test, so its labelled series start at zero.
    return Worker(plane, "apply", group=namespace, consumer="c1", handle=handle, **kw)


def _poll_until(worker: Worker, done, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "worker did not get there in time"
        worker.poll_once(block_ms=50)


def test_a_processed_task_counts_once_with_its_latency_and_duration(plane: WorkPlane, namespace: str) -> None:
    def handle(payload: dict) -> dict:
        time.sleep(0.05)
        return {"doubled": payload["x"] * 2}

    worker = _worker(plane, namespace, handle)
    labels = {"service": namespace, "stream": "apply"}
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    time.sleep(0.2)  # the task waits in the queue; the latency must include that wait
    assert worker.poll_once(block_ms=100) == 1

    assert _value("seal_tasks_completed_total", **labels) == 1
    assert _value("seal_task_duration_seconds_count", **labels) == 1
    assert 0.05 <= _value("seal_task_duration_seconds_sum", **labels) < 0.2
    assert _value("seal_task_latency_seconds_count", **labels) == 1
    assert _value("seal_task_latency_seconds_sum", **labels) >= 0.25  # queued 0.2 s + handled 0.05 s
    assert _value("seal_task_retries_total", **labels) == 0

    # A redelivered task whose result is stored is acknowledged again but not computed again:
    # the duration count is how many results were computed (the load benchmark's duplicate check).
    plane.store_result("apply", "t2", {"doubled": 4})
    plane.enqueue(Task("apply", "t2", {"x": 2}))
    assert worker.poll_once(block_ms=100) == 1
    assert _value("seal_tasks_completed_total", **labels) == 2
    assert _value("seal_task_duration_seconds_count", **labels) == 1


def test_a_failing_task_counts_its_retries_then_one_dead_letter(plane: WorkPlane, namespace: str) -> None:
    def handle(payload: dict) -> dict:
        raise RuntimeError("flaky")

    worker = _worker(plane, namespace, handle, max_attempts=3, visibility_timeout_s=1.0, retry_backoff_s=0.05)
    labels = {"service": namespace, "stream": "apply"}
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    _poll_until(worker, lambda: plane.redis.xlen(plane.stream_key("dead")) > 0)

    assert _value("seal_task_retries_total", **labels) == 2  # attempts 1 and 2 retried, 3 gave up
    assert _value("seal_dead_letters_total", **labels) == 1
    assert _value("seal_tasks_completed_total", **labels) == 0
    assert _value("seal_task_duration_seconds_count", **labels) == 0  # failures are not durations


def test_a_permanent_error_is_dead_lettered_without_a_retry(plane: WorkPlane, namespace: str) -> None:
    def handle(payload: dict) -> dict:
        raise PermanentError("bad input")

    worker = _worker(plane, namespace, handle)
    plane.enqueue(Task("apply", "t1", {"x": 1}))
    worker.poll_once(block_ms=100)
    labels = {"service": namespace, "stream": "apply"}
    assert _value("seal_dead_letters_total", **labels) == 1
    assert _value("seal_task_retries_total", **labels) == 0


def test_queue_depth_is_read_from_redis_at_scrape_time(plane: WorkPlane, namespace: str) -> None:
    worker = _worker(plane, namespace, lambda payload: {})
    registry = CollectorRegistry()
    registry.register(
        metrics.QueueDepthCollector(plane.redis, [("apply", plane.stream_key("apply"), namespace)])
    )
    labels = {"stream": "apply", "group": namespace}

    assert registry.get_sample_value("seal_queue_depth", labels) == 0
    for i in range(3):
        plane.enqueue(Task("apply", f"t{i}", {"i": i}))
    # Another consumer of the group holds one task without acknowledging it (a training in progress).
    plane.redis.xreadgroup(namespace, "busy", {plane.stream_key("apply"): ">"}, count=1)
    assert registry.get_sample_value("seal_queue_depth", labels) == 3
    assert registry.get_sample_value("seal_queue_in_flight", labels) == 1

    worker.poll_once(block_ms=100)  # acknowledges (and deletes) one of the waiting two
    assert registry.get_sample_value("seal_queue_depth", labels) == 2
    assert registry.get_sample_value("seal_queue_in_flight", labels) == 1


def test_queue_depth_counts_unread_entries_when_redis_cannot_tell_the_lag(
    plane: WorkPlane, namespace: str
) -> None:
    key = plane.stream_key("apply")
    ids = [plane.redis.xadd(key, {"task_id": f"t{i}", "payload": "{}"}) for i in range(4)]
    plane.ensure_group("apply", namespace)
    plane.redis.xreadgroup(namespace, "busy", {key: ">"}, count=1)
    plane.redis.xdel(key, ids[2])  # a hole after the last delivered entry: XINFO's lag becomes nil
    assert plane.redis.xinfo_groups(key)[0]["lag"] is None
    registry = CollectorRegistry()
    registry.register(metrics.QueueDepthCollector(plane.redis, [("apply", key, namespace)]))
    assert registry.get_sample_value("seal_queue_depth", {"stream": "apply", "group": namespace}) == 3


def test_queue_depth_of_a_stream_that_does_not_exist_yet_is_absent_not_an_error(
    plane: WorkPlane, namespace: str
) -> None:
    registry = CollectorRegistry()
    registry.register(
        metrics.QueueDepthCollector(plane.redis, [("audit", plane.stream_key("audit"), "auditor")])
    )
    assert registry.get_sample_value("seal_queue_depth", {"stream": "audit", "group": "auditor"}) is None


def test_enqueue_time_comes_from_the_stream_entry_id() -> None:
    assert metrics.enqueue_time(b"1700000000123-4") == pytest.approx(1_700_000_000.123)
    assert metrics.enqueue_time("1700000000000-0") == 1_700_000_000.0
    assert metrics.enqueue_time(b"not-an-id") is None


def test_expose_serves_prometheus_text_and_stops_cleanly(plane: WorkPlane, namespace: str) -> None:
    worker = _worker(plane, namespace, lambda payload: {})
    plane.enqueue(Task("apply", "t1", {}))
    address = f"127.0.0.1:{free_port()}"
    stop = metrics.expose("student", address, [worker])
    try:
        body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    finally:
        stop()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    depth = {s.labels["group"]: s.value for s in families["seal_queue_depth"].samples}
    assert depth[namespace] == 1
    # This worker's series exist at zero before its first task.
    completed = [s for s in families["seal_tasks_completed"].samples if s.labels.get("service") == namespace]
    assert completed and completed[0].value == 0
    for name in (
        "seal_task_latency_seconds",
        "seal_task_retries",
        "seal_dead_letters",
        "seal_training_steps",
    ):
        assert name in families
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{address}/metrics", timeout=2)
    # The collector was unregistered: exposing again does not collide with a duplicate.
    metrics.expose("student", "", [worker])()


def test_training_an_adapter_counts_its_steps(tiny_model, tmp_path: Path) -> None:
    from seal.records import EditFormat, LoraSettings, Passage, SelfEdit
    from student.core import apply_self_edit

    model, tokenizer = tiny_model
    edit = SelfEdit(
        id="e1",
        job_id="j1",
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=Passage("Velmora", "The council meets in Velmora."),
        text="The council meets in Velmora.",
        lines=("The council meets in Velmora.",),
        lora=LoraSettings(epochs=2, rank=4),
    )
    before = _value("seal_training_steps_total")
    ref = apply_self_edit(model, tokenizer, edit, "tiny", "f" * 64, tmp_path)
    assert ref.steps > 0
    assert _value("seal_training_steps_total") - before == ref.steps
    assert _value("seal_training_steps_per_second") > 0


def test_training_rate_is_steps_over_seconds() -> None:
    metrics.training_done(12, 3.0)
    assert _value("seal_training_steps_per_second") == 4.0
    metrics.training_done(5, 0.0)  # a zero-length update leaves the last rate rather than dividing by 0
    assert _value("seal_training_steps_per_second") == 4.0


def test_verdicts_are_counted_by_outcome() -> None:
    passed, failed = (
        _value("seal_verdicts_total", outcome="passed"),
        _value("seal_verdicts_total", outcome="failed"),
    )
    metrics.verdict_signed(True)
    metrics.verdict_signed(False)
    metrics.verdict_signed(False)
    assert _value("seal_verdicts_total", outcome="passed") - passed == 1
    assert _value("seal_verdicts_total", outcome="failed") - failed == 2


def test_a_job_accepted_by_the_gateway_is_counted_and_a_refused_one_is_not(plane: WorkPlane) -> None:
    from gateway.api import GatewayApi, parse_job_spec
    from gateway.jobs import JobStore
    from seal.errors import InvalidArgument
    from seal.validation import Limits

    api = GatewayApi(JobStore(plane), Limits(), "smollm2-135m")
    doc = {
        "title": "T",
        "context": "T is a town.",
        "questions": [{"question": "What is T?", "answer": "a town"}],
    }
    before = _value("seal_jobs_submitted_total")
    api.submit(parse_job_spec({"documents": [doc]}))
    assert _value("seal_jobs_submitted_total") - before == 1
    with pytest.raises(InvalidArgument):
        api.submit(parse_job_spec({"documents": [doc], "n_self_edits": 10_000}))
    assert _value("seal_jobs_submitted_total") - before == 1
