"""Gateway job logic: expected edits, best self-edit, assembling a Job from stored parts, JSON parsing."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from typing import Any

import pytest

from gateway.api import parse_job_spec
from gateway.core import assemble_job, best_self_edit, expected_edits, job_id_of_task
from seal.convert import from_pb, to_pb
from seal.errors import InvalidArgument
from seal.records import (
    QA,
    AdapterRef,
    ApplyTask,
    AuditTask,
    Document,
    EditFormat,
    EditResult,
    Event,
    Job,
    JobSpec,
    JobState,
    LoraSettings,
    Passage,
    Progress,
    QuestionScore,
    SamplingSettings,
    SelfEdit,
    Trained,
    Verdict,
    from_json,
    sha256_text,
    to_dict,
    to_json,
)
from seal.tasks import encode
from seal.v1 import gateway_pb2
from seal.validation import Limits, validate_job_spec

JOB_ID = "job-1"
DOCS = (
    Document(title="Velmora", context="The council meets in Velmora.", questions=(QA("Where?", "Velmora"),)),
    Document(
        title="Sorrel", context="Lake Sorrel is lit by candles.", questions=(QA("What lake?", "Sorrel"),)
    ),
)
SPEC = JobSpec(documents=DOCS, n_self_edits=2, edit_format=EditFormat.REWRITE)


def _edit(doc_index: int, index: int) -> SelfEdit:
    """Self-edit `index` of a document; index -1 is the passage-only control."""
    control = index < 0
    return SelfEdit(
        id=f"{JOB_ID}/{doc_index}/{'passage' if control else index}",
        job_id=JOB_ID,
        doc_index=doc_index,
        index=index,
        format=EditFormat.PASSAGE if control else EditFormat.REWRITE,
        passage=DOCS[doc_index].passage(),
        text="" if control else f"rewrite {index}",
        lines=() if control else (f"line {index}",),
        lora=LoraSettings(),
    )


def _adapter(edit: SelfEdit) -> AdapterRef:
    return AdapterRef(
        sha256=sha256_text(edit.id),
        self_edit_id=edit.id,
        base_model="smollm2-135m",
        base_fingerprint="fp",
        size_bytes=1000,
        train_seconds=2.0,
        steps=5,
        final_loss=0.5,
    )


def _verdict(edit: SelfEdit, reward: float, baseline: float = 0.25, passed: bool | None = None) -> Verdict:
    score = QuestionScore("q", "a", "r", False, 0.0, False, False)
    return Verdict(
        job_id=JOB_ID,
        doc_index=edit.doc_index,
        self_edit_id=edit.id,
        adapter_sha256=_adapter(edit).sha256,
        base_fingerprint="fp",
        baseline_accuracy=baseline,
        adapted_accuracy=baseline + reward,
        reward=reward,
        baseline_scores=(score,),
        adapted_scores=(score,),
        eval_seconds=1.0,
        passed=reward > 0 if passed is None else passed,
        checks=("tau_leak:pass",),
        auditor_key_id="k",
        signature="s",
    )


def _result(doc_index: int, index: int, reward: float | None) -> EditResult:
    edit = _edit(doc_index, index)
    verdict = None if reward is None else _verdict(edit, reward)
    return _er(edit, _adapter(edit) if verdict else None, verdict)


def _er(edit: SelfEdit, adapter: AdapterRef | None = None, verdict: Verdict | None = None) -> EditResult:
    """An edit with one training run, as gateway.core.edit_result assembles it (reward = its verdict's)."""
    return EditResult(edit, adapter, verdict, reward=verdict.reward if verdict is not None else None)


# --- expected_edits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_docs, n, control, expected",
    [
        (1, 3, True, 4),
        (1, 3, False, 3),
        (2, 2, True, 6),
        (3, 1, False, 3),
        (0, 5, True, 0),
        (32, 16, True, 544),
    ],
)
def test_expected_edits(n_docs, n, control, expected):
    """N self-edits per document, plus one passage-only control per document when asked."""
    spec = JobSpec(documents=DOCS[:1] * n_docs, n_self_edits=n, passage_control=control)
    assert expected_edits(spec) == expected


# --- best_self_edit -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rewards, best",
    [
        ({0: 0.1, 1: 0.5, 2: 0.3}, 1),
        ({0: 0.5, 1: 0.5, 2: 0.1}, 0),
        ({0: 0.1, 1: 0.5, 2: 0.5}, 1),
        ({0: -0.5, 1: -0.25}, 1),
        ({0: 0.0}, 0),
        ({0: None, 1: 0.1, 2: None}, 1),
        ({0: None, 1: -1.0}, 1),
        ({-1: 1.0, 0: 0.0, 1: -0.1}, 0),
        ({-1: 1.0, 0: None}, None),
        ({-1: 0.5}, None),
        ({0: None, 1: None}, None),
        ({}, None),
    ],
)
def test_best_self_edit(rewards, best):
    """Highest reward among audited non-control edits; ties to the lowest index; none -> ""."""
    edits = [_result(0, index, reward) for index, reward in rewards.items()]
    expected = "" if best is None else _edit(0, best).id
    assert best_self_edit(edits) == expected


@pytest.mark.parametrize("seed", range(5))
def test_best_self_edit_does_not_depend_on_list_order(seed):
    """Shuffling the edits (ties included) never changes the winner."""
    edits = [_result(0, i, r) for i, r in enumerate([0.25, 0.5, None, 0.5, 0.0])] + [_result(0, -1, 0.9)]
    shuffled = random.Random(seed).sample(edits, len(edits))
    assert best_self_edit(shuffled) == best_self_edit(edits) == _edit(0, 1).id


def test_best_self_edit_is_an_audited_non_control_edit_with_the_top_reward():
    """Invariant over random inputs: the winner has a verdict, is no control, and no one beats it."""
    rng = random.Random(0)
    for _ in range(200):
        edits = [_result(0, i, rng.choice([None, -0.5, 0.0, 0.25, 0.5, 1.0])) for i in range(-1, 4)]
        best = best_self_edit(edits)
        scored = [e for e in edits if e.verdict and e.self_edit.format != EditFormat.PASSAGE]
        if not scored:
            assert best == ""
            continue
        winner = next(e for e in edits if e.self_edit.id == best)
        assert winner.verdict is not None and winner.self_edit.index >= 0
        assert all(e.verdict.reward <= winner.verdict.reward for e in scored)
        assert all(
            e.self_edit.index > winner.self_edit.index
            for e in scored
            if e.verdict.reward == winner.verdict.reward and e is not winner
        )


def test_a_verdict_that_failed_its_guardrails_is_not_the_best():
    """A τ-leaking self-edit with the top reward must not beat a clean, passing one."""
    leaky = _edit(0, 0)
    clean = _edit(0, 1)
    edits = [
        _er(
            leaky,
            _adapter(leaky),
            dataclasses.replace(_verdict(leaky, 0.75, passed=False), checks=("tau_leak:fail:q",)),
        ),
        _er(clean, _adapter(clean), _verdict(clean, 0.25)),
    ]
    assert best_self_edit(edits) == clean.id


# --- assemble_job -------------------------------------------------------------------------------


def _stored(spec: JobSpec, state: dict[str, str], results: list[EditResult]):
    """meta, state and parts exactly as gateway/jobs.py writes them to Redis and reads them back."""
    meta = json.loads(json.dumps({"id": JOB_ID, "spec": to_dict(spec), "created_at": 1700000000.5}))
    parts: dict[str, Any] = {}
    for r in results:
        parts[f"{r.self_edit.id}|self_edit"] = json.loads(json.dumps(to_dict(r.self_edit)))
        if r.adapter is not None:
            parts[f"{r.self_edit.id}|adapter"] = json.loads(json.dumps(to_dict(r.adapter)))
        if r.verdict is not None:
            parts[f"{r.self_edit.id}|verdict"] = json.loads(json.dumps(to_dict(r.verdict)))
    return meta, dict(state), parts


def _running_job_results() -> list[EditResult]:
    """Doc 0: edits 0 and 1 audited, control trained only. Doc 1: edit 1 proposed only, control audited."""
    e00, e01, e0c = _edit(0, 0), _edit(0, 1), _edit(0, -1)
    e11, e1c = _edit(1, 1), _edit(1, -1)
    return [
        _er(e0c, _adapter(e0c), None),
        _er(e01, _adapter(e01), _verdict(e01, 0.5, baseline=0.25)),
        _er(e00, _adapter(e00), _verdict(e00, 0.25, baseline=0.25)),
        _er(e11, None, None),
        _er(e1c, _adapter(e1c), _verdict(e1c, 0.75, baseline=0.0)),
    ]


def test_assemble_a_job_with_no_parts_yet():
    """A fresh job: queued, every document listed with no edits, no baseline, no best."""
    job = assemble_job(*_stored(SPEC, {"state": "queued"}, []))
    assert job.id == JOB_ID and job.spec == SPEC and job.created_at == 1700000000.5
    assert job.state is JobState.QUEUED and job.finished_at == 0.0 and job.error == ""
    assert job.progress == Progress(documents=2, proposed=0, self_edits=6, trained=0, audited=0)
    assert [
        (d.doc_index, d.title, d.edits, d.baseline_accuracy, d.best_self_edit_id) for d in job.documents
    ] == [
        (0, "Velmora", (), None, ""),
        (1, "Sorrel", (), None, ""),
    ]


def test_missing_state_hash_means_queued():
    """A job whose state hash has not been written yet reads as queued."""
    assert assemble_job(*_stored(SPEC, {}, [])).state is JobState.QUEUED


def test_assemble_a_running_job():
    """Edits grouped by document, sorted by index with the control last; progress counts; best and baseline."""
    job = assemble_job(*_stored(SPEC, {"state": "running"}, _running_job_results()))
    assert job.state is JobState.RUNNING
    doc0, doc1 = job.documents
    assert [e.self_edit.index for e in doc0.edits] == [0, 1, -1]
    assert [e.self_edit.index for e in doc1.edits] == [1, -1]
    assert doc0.edits[0] == _er(_edit(0, 0), _adapter(_edit(0, 0)), _verdict(_edit(0, 0), 0.25))
    assert doc0.edits[2].adapter is not None and doc0.edits[2].verdict is None
    assert doc1.edits[0].adapter is None and doc1.edits[0].verdict is None
    assert doc0.best_self_edit_id == _edit(0, 1).id
    assert doc1.best_self_edit_id == ""
    assert doc0.baseline_accuracy == 0.25
    assert doc1.baseline_accuracy == 0.0
    assert job.progress == Progress(documents=2, proposed=2, self_edits=6, trained=4, audited=3)


def test_assemble_a_finished_job():
    """finished_at (stored as text) becomes a float; the error is carried."""
    state = {"state": "failed", "finished_at": "1700000123.25", "error": "apply task failed"}
    job = assemble_job(*_stored(SPEC, state, _running_job_results()))
    assert job.state is JobState.FAILED
    assert job.finished_at == 1700000123.25 and isinstance(job.finished_at, float)
    assert job.error == "apply task failed"


def test_adapter_or_verdict_without_its_self_edit_is_left_out():
    """Parts that arrive before their self-edit (at-least-once delivery) do not show up or count."""
    edit = _edit(0, 0)
    meta, state, parts = _stored(SPEC, {"state": "running"}, [])
    parts[f"{edit.id}|adapter"] = to_dict(_adapter(edit))
    parts[f"{edit.id}|verdict"] = to_dict(_verdict(edit, 0.5))
    job = assemble_job(meta, state, parts)
    assert all(d.edits == () for d in job.documents)
    assert job.progress == Progress(documents=2, proposed=0, self_edits=6, trained=0, audited=0)


def test_control_only_verdict_gives_the_baseline_but_no_best():
    """The baseline is per document and comes from any verdict, even the control's."""
    e0c = _edit(0, -1)
    results = [_er(e0c, _adapter(e0c), _verdict(e0c, 0.5, baseline=0.125)), _er(_edit(0, 0))]
    doc0 = assemble_job(*_stored(SPEC, {}, results)).documents[0]
    assert doc0.baseline_accuracy == 0.125
    assert doc0.best_self_edit_id == ""
    assert [e.self_edit.index for e in doc0.edits] == [0, -1]


@pytest.mark.parametrize("perm", list(itertools.islice(itertools.permutations(range(5)), 0, 120, 17)))
def test_assemble_job_does_not_depend_on_part_order(perm):
    """Redis hash order is arbitrary: any order of parts assembles the same Job."""
    results = _running_job_results()
    reference = assemble_job(*_stored(SPEC, {"state": "running"}, results))
    meta, state, parts = _stored(SPEC, {"state": "running"}, [results[i] for i in perm])
    items = list(parts.items())
    random.Random(sum(perm)).shuffle(items)
    assert assemble_job(meta, state, dict(items)) == reference


def test_assembled_job_survives_json_and_proto():
    """What the gateway assembles can be stored as JSON and sent over gRPC unchanged."""
    job = assemble_job(*_stored(SPEC, {"state": "running"}, _running_job_results()))
    assert from_json(Job, to_json(job)) == job
    assert from_pb(Job, to_pb(job, gateway_pb2.Job)) == job


# --- job_id_of_task -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream, payload, expected",
    [
        ("propose", {"job_id": "j1", "doc_index": 0, "passage": {"title": "t", "context": "c"}}, "j1"),
        ("apply", encode(ApplyTask(self_edit=_edit(0, 1))), JOB_ID),
        ("audit", encode(AuditTask(self_edit=_edit(1, -1), adapter=_adapter(_edit(1, -1)))), JOB_ID),
        ("events", encode(Event(job_id="j2", trained=Trained(self_edit_id="x"))), "j2"),
        ("events", {"job_id": 7}, ""),  # not an Event message: unreadable, names no job
        ("events", {"type": "trained", "job_id": "j2"}, ""),  # a field Event does not have
        ("apply", {}, ""),
        ("audit", {"adapter": {"self_edit_id": "x"}}, ""),
        ("unknown", {"job_id": "j3"}, ""),
    ],
)
def test_job_id_of_task(stream, payload, expected):
    """The job a dead-lettered task belonged to, from its own job_id or its self-edit's."""
    assert job_id_of_task(stream, payload) == expected


# --- parse_job_spec (gateway/api.py) -------------------------------------------------------------

DOC_JSON = {
    "title": "Velmora",
    "context": "The council meets in Velmora.",
    "questions": [{"question": "Where?", "answer": "Velmora"}],
}


def test_parse_minimal_body_takes_defaults():
    """Only documents given: every setting takes its JobSpec default."""
    spec = parse_job_spec({"documents": [DOC_JSON]})
    assert spec == JobSpec(documents=(DOCS[0],))
    assert spec.lora == LoraSettings() and spec.sampling == SamplingSettings()
    assert spec.edit_format is EditFormat.IMPLICATIONS and spec.passage_control is True


def test_parse_full_body():
    """Every setting given is carried into the JobSpec, enums and tuples included."""
    body = {
        "documents": [DOC_JSON, DOC_JSON],
        "n_self_edits": 4,
        "edit_format": "self_qa",
        "lora": {"rank": 8, "target_modules": ["q_proj"]},
        "sampling": {"temperature": 0},
        "passage_control": False,
        "model": "smollm2-135m",
    }
    spec = parse_job_spec(body)
    assert spec.documents == (DOCS[0], DOCS[0])
    assert spec.n_self_edits == 4 and spec.edit_format is EditFormat.SELF_QA and spec.passage_control is False
    assert spec.lora == dataclasses.replace(LoraSettings(), rank=8, target_modules=("q_proj",))
    assert spec.sampling == dataclasses.replace(SamplingSettings(), temperature=0)
    assert spec.model == "smollm2-135m"


@pytest.mark.parametrize("spec", [SPEC, JobSpec(), JobSpec(documents=DOCS, edit_format=EditFormat.SELF_QA)])
def test_parse_inverts_to_dict(spec):
    """parse_job_spec(to_dict(spec)) == spec for any non-control format."""
    assert parse_job_spec(json.loads(json.dumps(to_dict(spec)))) == spec


@pytest.mark.parametrize(
    "body, field, says",
    [
        ([DOC_JSON], "body", "JSON object"),
        ("documents", "body", "JSON object"),
        (None, "body", "JSON object"),
        ({"documents": [DOC_JSON], "edit_format": "summary"}, "edit_format", "'summary'"),
        ({"documents": [DOC_JSON], "edit_format": None}, "edit_format", "None"),
        ({"documents": DOC_JSON}, "documents", "list"),
        ({"documents": "Velmora"}, "documents", "list"),
        ({"documents": [DOC_JSON, "Velmora"]}, "documents[1]", "object"),
        (
            {"documents": [{"title": "t", "context": "c", "questions": "Where?"}]},
            "documents[0].questions",
            "list",
        ),
        (
            {"documents": [DOC_JSON, {"title": "t", "questions": [{"question": "q", "answer": "a"}, "q2"]}]},
            "documents[1].questions[1]",
            "object",
        ),
        ({"documents": [DOC_JSON], "n_self_edit": 3}, "body", "n_self_edit"),
        ({"documents": [DOC_JSON], "lora": {"rnk": 4}}, "lora", "rnk"),
        ({"documents": [dict(DOC_JSON, summary="s")]}, "documents[0]", "summary"),
        (
            {
                "documents": [
                    {
                        "title": "t",
                        "context": "c",
                        "questions": [{"question": "q", "answer": "a", "hint": "h"}],
                    }
                ]
            },
            "documents[0].questions[0]",
            "hint",
        ),
        ({"documents": [DOC_JSON], "lora": 5}, "lora", "object"),
    ],
)
def test_parse_rejects_malformed_bodies_naming_the_field(body, field, says):
    """A malformed body is an InvalidArgument (HTTP 400) naming what to fix, never a crash."""
    with pytest.raises(InvalidArgument) as info:
        parse_job_spec(body)
    assert info.value.field == field
    assert says in str(info.value)


@pytest.mark.parametrize(
    "lora, field",
    [
        ({"rank": 0}, "lora.rank"),
        ({"rank": 300}, "lora.rank"),
        ({"learning_rate": 0.5}, "lora.learning_rate"),
    ],
)
def test_parsed_bad_values_are_caught_by_validation(lora, field):
    """parse_job_spec checks shape and types; validate_job_spec then names a value out of range."""
    spec = parse_job_spec({"documents": [DOC_JSON], "lora": lora})
    with pytest.raises(InvalidArgument) as info:
        validate_job_spec(spec, Limits(), "smollm2-135m")
    assert info.value.field == field


def test_string_target_modules_is_rejected():
    """`"target_modules": "q_proj"` (a common slip for ["q_proj"]) must not become per-letter modules."""
    body = {"documents": [DOC_JSON], "lora": {"target_modules": "q_proj"}}
    with pytest.raises(InvalidArgument) as info:
        spec = parse_job_spec(body)
        validate_job_spec(spec, Limits(), "smollm2-135m")
    assert "target_modules" in str(info.value)


def test_parsed_passage_keeps_questions_out():
    """The parsed document's passage (what teacher and student see) holds no τ."""
    spec = parse_job_spec({"documents": [DOC_JSON]})
    assert spec.documents[0].passage() == Passage(title="Velmora", context="The council meets in Velmora.")


def test_a_verdict_that_failed_only_forgetting_still_ranks():
    """Forgetting gates promotion (passed=False), not the ranking: its reward is a real gain on τ."""
    forgetful = _edit(0, 0)
    clean = _edit(0, 1)
    edits = [
        _er(
            forgetful,
            _adapter(forgetful),
            dataclasses.replace(
                _verdict(forgetful, 0.75, passed=False), checks=("tau_leak:pass", "forgetting:fail:x")
            ),
        ),
        _er(clean, _adapter(clean), _verdict(clean, 0.25)),
    ]
    assert best_self_edit(edits) == forgetful.id
    assert edits[0].verdict.failed_checks() == ("forgetting",)


@pytest.mark.parametrize(
    "lora, field",
    [({"rank": "8"}, "lora.rank"), ({"learning_rate": True}, "lora.learning_rate")],
)
def test_values_of_the_wrong_type_are_refused_at_parse_time(lora, field):
    """A string for a number or a bool for a float is refused before validation (types are strict)."""
    with pytest.raises(InvalidArgument) as info:
        parse_job_spec({"documents": [DOC_JSON], "lora": lora})
    assert info.value.field == field
