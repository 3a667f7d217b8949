"""The audit log's pure chain check: each kind of tampering is caught and named where it happened."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict
from typing import Any

import pytest

from seal.auditlog import (
    GENESIS,
    KINDS,
    PROMOTION,
    SUBMISSION,
    VERDICT,
    AuditEntry,
    chain_entry,
    entry_hash,
    parse_entry,
    verify_entries,
)


def build_chain(n: int = 5) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    for i in range(n):
        previous = entries[-1] if entries else None
        kind = KINDS[i % len(KINDS)]
        entries.append(
            chain_entry(previous, kind, "alice", f"job:j{i}", {"i": i, "note": "naïve"}, 1.7e9 + i)
        )
    return entries


def head_of(entries: list[AuditEntry]) -> dict[str, Any]:
    return {"seq": entries[-1].seq, "hash": entries[-1].hash}


def test_an_intact_chain_verifies() -> None:
    entries = build_chain()
    report = verify_entries(entries, head_of(entries))
    assert report.ok and report.count == 5 and report.problems == []


def test_stored_json_and_decoded_objects_verify_like_entries() -> None:
    entries = build_chain()
    assert verify_entries([e.to_json() for e in entries], head_of(entries)).ok
    assert verify_entries([json.loads(e.to_json()) for e in entries], head_of(entries)).ok


def test_an_empty_log_without_a_head_is_intact() -> None:
    assert verify_entries([], None).ok


def test_the_hash_is_sha256_of_the_documented_canonical_json() -> None:
    entry = build_chain(1)[0]
    content = {k: v for k, v in asdict(entry).items() if k != "hash"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert entry.hash == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert entry.prev == GENESIS and entry.seq == 0


def test_the_chain_links_each_entry_to_the_one_before() -> None:
    entries = build_chain(3)
    assert [e.seq for e in entries] == [0, 1, 2]
    assert entries[1].prev == entries[0].hash and entries[2].prev == entries[1].hash


def test_an_edited_body_is_named() -> None:
    entries = build_chain()
    entries[2] = dataclasses.replace(entries[2], body={"i": 2, "note": "approved by mallory"})
    report = verify_entries(entries, head_of(entries))
    assert not report.ok
    assert report.problems == ["entry 2: its hash does not match its content (edited)"]


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link() -> None:
    entries = build_chain()
    edited = {**asdict(entries[2]), "actor": "mallory"}
    entries[2] = AuditEntry(**{**edited, "hash": entry_hash(edited)})
    report = verify_entries(entries, head_of(entries))
    assert report.problems == [
        "entry 3: its prev does not match the hash of entry 2 before it "
        "(an entry was edited, removed or reordered)"
    ]


def test_two_swapped_entries_are_named() -> None:
    entries = build_chain()
    entries[1], entries[2] = entries[2], entries[1]
    problems = verify_entries(entries, head_of(entries)).problems
    assert "entry 2 at position 1: expected seq 1 after entry 0 (entries removed or reordered)" in problems
    assert "entry 1 at position 2: expected seq 3 after entry 2 (entries removed or reordered)" in problems
    assert any(p.startswith("entry 2: its prev does not match the hash of entry 0") for p in problems)
    assert not any("hash does not match its content" in p for p in problems)  # nothing was edited


def test_a_removed_middle_entry_is_named_once() -> None:
    entries = build_chain()
    del entries[2]
    problems = verify_entries(entries, head_of(entries)).problems
    assert problems == [
        "entry 3 at position 2: expected seq 2 after entry 1 (entries removed or reordered)",
        "entry 3: its prev does not match the hash of entry 1 before it "
        "(an entry was edited, removed or reordered)",
    ]


def test_a_removed_first_entry_is_named() -> None:
    entries = build_chain()
    problems = verify_entries(entries[1:], head_of(entries)).problems
    assert problems == [
        "entry 1 at position 0: the log must start at seq 0 (entries removed)",
        "entry 1: it is the first entry but its prev is not 64 zeros",
    ]


def test_a_removed_tail_shows_against_the_head() -> None:
    entries = build_chain()
    report = verify_entries(entries[:-1], head_of(entries))
    assert report.problems == [
        "head: it names entry 4 but the log ends at entry 3 (entries removed from the end)"
    ]


def test_a_log_emptied_under_its_head_is_named() -> None:
    entries = build_chain()
    assert verify_entries([], head_of(entries)).problems == [
        "head: it names entry 4 but the log is empty (entries removed)"
    ]


def test_a_forged_entry_appended_without_the_head_is_named() -> None:
    entries = build_chain()
    head = head_of(entries)
    entries.append(chain_entry(entries[-1], PROMOTION, "mallory", "deployment:faq@9", {}, 1.8e9))
    assert verify_entries(entries, head).problems == [
        "head: it names entry 4 but the log goes on to entry 5 "
        "(entries appended without updating the head: forged)"
    ]


def test_a_replaced_last_entry_with_its_seq_kept_is_named() -> None:
    entries = build_chain()
    head = head_of(entries)
    entries[-1] = chain_entry(entries[-2], VERDICT, "mallory", "job:j4", {"passed": True}, 1.8e9)
    assert verify_entries(entries, head).problems == [
        "head: its hash does not match entry 4's hash (the last entry was replaced)"
    ]


def test_a_missing_head_is_a_problem_for_a_non_empty_log() -> None:
    assert verify_entries(build_chain(), None).problems == [
        "head: missing, so entries removed from the end cannot be ruled out"
    ]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: [1, 2], "not a JSON object but list"),
        (lambda d: {k: v for k, v in d.items() if k != "actor"}, "missing fields ['actor']"),
        (lambda d: {**d, "extra": 1}, "unknown fields ['extra']"),
        (lambda d: {**d, "seq": "2"}, "wrong type or form of seq='2'"),
        (lambda d: {**d, "prev": "abc"}, "wrong type or form of prev='abc'"),
        (lambda d: {**d, "body": []}, "wrong type or form of body=[]"),
    ],
)
def test_a_malformed_entry_is_named_by_its_position(mangle: Any, reason: str) -> None:
    entries: list[Any] = [json.loads(e.to_json()) for e in build_chain()]
    entries[2] = mangle(entries[2])
    if isinstance(entries[2], (dict, list)):
        entries[2] = json.dumps(entries[2])
    problems = verify_entries(entries, head_of(build_chain())).problems
    assert problems[0].startswith("entry at position 2: malformed: ")
    assert reason in problems[0]
    assert len(problems) == 1  # the next entry cannot be linked to it, and is not blamed for that


def test_a_malformed_head_is_named() -> None:
    entries = build_chain()
    problems = verify_entries(entries, {"seq": "4"}).problems
    assert len(problems) == 1 and problems[0].startswith("head: malformed")


def test_parse_entry_round_trips_the_stored_form() -> None:
    entry = build_chain(2)[1]
    assert parse_entry(entry.to_json()) == entry
    assert parse_entry(entry.to_json().encode()) == entry


def test_chain_entry_refuses_unknown_kinds_and_non_json_bodies() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        chain_entry(None, "promotoin", "alice", "job:j", {}, 0.0)
    with pytest.raises(ValueError, match="plain JSON"):
        chain_entry(None, SUBMISSION, "alice", "job:j", {"x": float("nan")}, 0.0)
    with pytest.raises(ValueError, match="actor and a subject"):
        chain_entry(None, SUBMISSION, "", "job:j", {}, 0.0)


def test_the_body_is_hashed_as_a_reader_decodes_it() -> None:
    # Int keys and tuples become strings and lists in JSON; the hash must cover that form.
    entry = chain_entry(None, SUBMISSION, "alice", "job:j", {"ids": (1, 2), 10: "a", 2: "b"}, 0.0)
    assert entry.body == {"ids": [1, 2], "10": "a", "2": "b"}
    assert verify_entries([entry.to_json()], {"seq": 0, "hash": entry.hash}).ok
