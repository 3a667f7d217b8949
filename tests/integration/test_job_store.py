"""The gateway's job store on a real Redis: atomic submission, and finished jobs stay finished."""

from __future__ import annotations

import json
import time

import pytest

from gateway.jobs import JOB_TTL_S, MAX_PAGE, JobStore
from seal.errors import InvalidArgument, NotFound
from seal.records import QA, Document, JobSpec, JobState, ProposeTask
from seal.tasks import decode

SPEC = JobSpec(
    documents=(Document("A", "Alpha is a town.", (QA("What is Alpha?", "a town"),)),) * 2, n_self_edits=2
)


def test_submission_stores_the_job_and_one_propose_task_per_document(plane) -> None:
    job = JobStore(plane).create(SPEC)
    assert job.state == JobState.QUEUED
    entries = plane.redis.xrange(plane.stream_key("propose"))
    tasks = [decode(ProposeTask, json.loads(fields[b"payload"])) for _, fields in entries]
    assert [(t.job_id, t.doc_index, t.n, t.passage_control) for t in tasks] == [
        (job.id, 0, 2, True),
        (job.id, 1, 2, True),
    ]
    assert b"What is Alpha" not in b"".join(fields[b"payload"] for _, fields in entries)  # τ stays out
    # The enqueue markers were set too: replaying the same task ids adds nothing.
    from seal.workplane import Task

    assert not plane.enqueue(Task("propose", f"{job.id}/0", {}))


def test_only_a_policy_training_rounds_audits_are_reward_only(plane) -> None:
    import dataclasses

    store = JobStore(plane)
    ordinary = store.create(SPEC)
    round_job = store.create(dataclasses.replace(SPEC, parent_job_id=ordinary.id))
    entries = plane.redis.xrange(plane.stream_key("propose"))
    tasks = [decode(ProposeTask, json.loads(fields[b"payload"])) for _, fields in entries]
    assert {t.job_id: t.reward_only for t in tasks} == {ordinary.id: False, round_job.id: True}


def test_a_finished_job_stays_finished(plane) -> None:
    store = JobStore(plane)
    job = store.create(SPEC)
    store.set_state(job.id, JobState.RUNNING)
    assert store.get(job.id).state == JobState.RUNNING
    store.set_state(job.id, JobState.SUCCEEDED)
    store.set_state(job.id, JobState.FAILED, error="late dead letter")
    store.set_state(job.id, JobState.RUNNING)
    finished = store.get(job.id)
    assert finished.state == JobState.SUCCEEDED and finished.error == "" and finished.finished_at > 0


def test_job_ids_that_the_store_did_not_make_are_not_found(plane) -> None:
    store = JobStore(plane)
    job = store.create(SPEC)
    for bad in (f"{job.id}:state", f"{job.id}:parts", job.id.upper(), job.id[:-1], "", "../" + job.id):
        with pytest.raises(NotFound):  # not WRONGTYPE from reading the state hash as the job
            store.get(bad)


def test_a_job_is_visible_to_its_owner_only_unless_no_owner_is_asked(plane) -> None:
    store = JobStore(plane)
    alices = store.create(SPEC, owner="alice")
    assert store.get(alices.id, owner="alice").id == alices.id
    assert store.get(alices.id).id == alices.id  # an operator's view
    with pytest.raises(NotFound, match="no job with id"):
        store.get(alices.id, owner="bob")
    bobs = store.create(SPEC, owner="bob")
    assert store.list_page(owner="alice").ids == [alices.id]
    assert store.list_page(owner="bob").ids == [bobs.id]
    assert store.list_page().ids == [bobs.id, alices.id]


def test_indexes_expire_and_drop_ids_older_than_the_job_ttl(plane) -> None:
    store = JobStore(plane)
    old = time.time() - JOB_TTL_S - 60
    for index in (plane.key("jobs"), plane.key("jobs", "owner", "alice")):
        plane.redis.zadd(index, {"0123456789abcdef": old})
    job = store.create(SPEC, owner="alice")
    for index in (plane.key("jobs"), plane.key("jobs", "owner", "alice")):
        assert [m.decode() for m in plane.redis.zrange(index, 0, -1)] == [job.id]
        assert 0 < plane.redis.ttl(index) <= JOB_TTL_S
    for key in (plane.key("job", job.id), plane.key("job", job.id, "state"), plane.key("tau", job.id)):
        assert 0 < plane.redis.ttl(key) <= JOB_TTL_S


def test_pages_cover_every_job_once_even_with_equal_timestamps(plane) -> None:
    store = JobStore(plane)
    # Seven ids, five of them submitted in the same instant.
    ids = [f"{i:016x}" for i in range(7)]
    plane.redis.zadd(plane.key("jobs"), {i: (1000.0 if n < 5 else 1000.0 + n) for n, i in enumerate(ids)})
    seen, cursor = [], ""
    while True:
        page = store.list_page(limit=2, cursor=cursor)
        seen += page.ids
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)
    assert seen[:2] == [ids[6], ids[5]]  # newest first
    for limit in (0, MAX_PAGE + 1):
        with pytest.raises(InvalidArgument, match="limit"):
            store.list_page(limit=limit)
    with pytest.raises(InvalidArgument, match="cursor"):
        store.list_page(cursor="nan/0123456789abcdef")
