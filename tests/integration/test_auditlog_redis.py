"""The audit log on a real Redis: concurrent appenders keep one chain; tampering with the list shows."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from seal.auditlog import (
    APPROVAL,
    KILL_SWITCH,
    PROMOTION,
    SUBMISSION,
    AuditLog,
    AuditLogError,
    add_parser,
    run,
    verify_file,
)
from tests.conftest import delete_namespace


@pytest.fixture()
def client(redis_url: str, namespace: str) -> Iterator[redis.Redis]:
    yield redis.Redis.from_url(redis_url)
    delete_namespace(redis_url, namespace)


@pytest.fixture()
def audit(client: redis.Redis, namespace: str) -> AuditLog:
    return AuditLog(client, f"{namespace}:")


def fill(audit: AuditLog, n: int = 6) -> None:
    for i in range(n):
        audit.append(SUBMISSION, "alice", f"job:j{i}", {"documents": i})


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="seal")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_entries_round_trip_with_their_chain(audit: AuditLog, client: redis.Redis, namespace: str) -> None:
    first = audit.append(SUBMISSION, "alice", "job:abc", {"documents": 2})
    second = audit.append(PROMOTION, "operator", "deployment:faq@3", {"from": "faq@2"})
    assert (first.seq, second.seq, second.prev) == (0, 1, first.hash)
    assert audit.entries() == [first, second] and len(audit) == 2
    assert audit.entries(start=1) == [second] and audit.entries(count=1) == [first]
    assert audit.entries(start=-1) == [second]
    assert json.loads(client.get(f"{namespace}:audit:head")) == {"seq": 1, "hash": second.hash}
    assert audit.verify().ok


def test_four_concurrent_appenders_make_one_unbroken_chain(
    redis_url: str, namespace: str, audit: AuditLog
) -> None:
    errors: list[BaseException] = []

    def append_50(worker: int) -> None:
        # A client of its own per thread: as separate processes would, each has its own connections.
        own = AuditLog(redis.Redis.from_url(redis_url), f"{namespace}:")
        try:
            for i in range(50):
                own.append(APPROVAL, f"worker-{worker}", f"job:w{worker}-{i}", {"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=append_50, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = audit.verify()
    assert report.ok, report.problems
    entries = audit.entries()
    assert [e.seq for e in entries] == list(range(200))
    assert sorted(e.subject for e in entries) == sorted(f"job:w{w}-{i}" for w in range(4) for i in range(50))


def test_an_entry_edited_in_place_is_caught(audit: AuditLog, client: redis.Redis) -> None:
    fill(audit)
    key = audit.entries_key
    stored = json.loads(client.lindex(key, 3))
    client.lset(key, 3, json.dumps({**stored, "actor": "mallory"}))
    report = audit.verify()
    assert not report.ok
    assert report.problems == ["entry 3: its hash does not match its content (edited)"]


def test_an_entry_removed_from_the_middle_is_caught(audit: AuditLog, client: redis.Redis) -> None:
    fill(audit)
    client.lrem(audit.entries_key, 1, client.lindex(audit.entries_key, 2))
    problems = audit.verify().problems
    assert "entry 3 at position 2: expected seq 2 after entry 1 (entries removed or reordered)" in problems


def test_two_swapped_entries_are_caught(audit: AuditLog, client: redis.Redis) -> None:
    fill(audit)
    key = audit.entries_key
    one, two = client.lindex(key, 1), client.lindex(key, 2)
    client.lset(key, 1, two)
    client.lset(key, 2, one)
    problems = audit.verify().problems
    assert "entry 2 at position 1: expected seq 1 after entry 0 (entries removed or reordered)" in problems


def test_a_removed_last_entry_is_caught_by_the_head(audit: AuditLog, client: redis.Redis) -> None:
    fill(audit)
    client.rpop(audit.entries_key)
    assert audit.verify().problems == [
        "head: it names entry 5 but the log ends at entry 4 (entries removed from the end)"
    ]


def test_appending_to_a_log_whose_head_was_deleted_is_refused(audit: AuditLog, client: redis.Redis) -> None:
    fill(audit, 2)
    client.delete(audit.head_key)
    with pytest.raises(AuditLogError, match="head.*missing|missing"):
        audit.append(KILL_SWITCH, "operator", "deployment:faq", {"on": True})
    assert len(audit) == 2


def test_an_export_verifies_and_an_edited_export_does_not(audit: AuditLog, tmp_path: Path) -> None:
    fill(audit)
    path = tmp_path / "audit.jsonl"
    assert audit.export(path) == 6
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1]) == {"head": json.loads(audit.redis.get(audit.head_key))}
    assert verify_file(path).ok and verify_file(path).count == 6
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]  # no temp file left behind

    lines[1] = lines[1].replace('"alice"', '"mallory"')
    path.write_text("\n".join(lines) + "\n")
    assert verify_file(path).problems == ["entry 1: its hash does not match its content (edited)"]

    path.write_text("\n".join(lines[:-1]) + "\n")
    assert any("no final" in p for p in verify_file(path).problems)


def test_an_empty_log_exports_and_verifies(audit: AuditLog, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    assert audit.export(path) == 0
    assert path.read_text() == '{"head":null}\n'
    assert verify_file(path).ok and audit.verify().ok


def test_the_cli_verifies_shows_and_exports(
    audit: AuditLog, client: redis.Redis, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(audit, 3)
    prefix = f"{namespace}:"
    assert run(parse(["audit", "verify"]), client, prefix) == 0
    assert "intact: 3 entries" in capsys.readouterr().out

    assert run(parse(["audit", "show", "--limit", "2", "--json"]), client, prefix) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in shown] == [1, 2]

    assert run(parse(["audit", "export", str(tmp_path / "out.jsonl")]), client, prefix) == 0
    assert verify_file(tmp_path / "out.jsonl").ok

    stored = json.loads(client.lindex(audit.entries_key, 0))
    client.lset(audit.entries_key, 0, json.dumps({**stored, "body": {"documents": 99}}))
    capsys.readouterr()
    assert run(parse(["audit", "verify"]), client, prefix) == 1
    out = capsys.readouterr().out
    assert "TAMPERED" in out and "entry 0: its hash does not match its content (edited)" in out


def test_an_unreadable_head_is_reported_not_raised(audit: AuditLog, client: redis.Redis) -> None:
    fill(audit, 2)
    client.set(audit.head_key, "garbage")
    problems = audit.verify().problems
    assert len(problems) == 1 and problems[0].startswith("head: malformed: 'garbage'")


def test_an_export_keeps_entries_with_line_separators_whole(audit: AuditLog, tmp_path: Path) -> None:
    audit.append(SUBMISSION, "alice", "job:ls", {"title": "one\u2028two\u0085three\nfour"})
    audit.export(tmp_path / "audit.jsonl")
    report = verify_file(tmp_path / "audit.jsonl")
    assert report.ok and report.count == 1, report.problems
