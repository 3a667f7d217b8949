"""Domain records: JSON round trips, strict decoding, the verdict's signing payload, passage digests."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from seal.records import (
    QA,
    AdapterFile,
    AdapterRef,
    Document,
    DocumentResult,
    EditFormat,
    EditResult,
    Job,
    JobSpec,
    JobState,
    LoraSettings,
    Passage,
    Progress,
    QuestionScore,
    RecordError,
    SamplingSettings,
    SelfEdit,
    Verdict,
    from_dict,
    from_json,
    to_dict,
    to_json,
)

PASSAGE = Passage(title="Velmora", context="The Zorbian council meets in Velmora every spring.")
LORA = LoraSettings(rank=4, alpha=8.0, learning_rate=5e-4, epochs=2, target_modules=("q_proj", "v_proj"))
SPEC = JobSpec(
    documents=(
        Document(
            title="Velmora",
            context=PASSAGE.context,
            questions=(QA("Where?", "Velmora"), QA("When?", "spring")),
        ),
        Document(title="Empty", context="No questions here."),
    ),
    n_self_edits=2,
    edit_format=EditFormat.SELF_QA,
    lora=LORA,
    sampling=SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3),
    passage_control=False,
    model="smollm2-135m",
)
SELF_EDIT = SelfEdit(
    id="job-1/0/0",
    job_id="job-1",
    doc_index=0,
    index=0,
    format=EditFormat.IMPLICATIONS,
    passage=PASSAGE,
    text="1. The council meets.\n2. In spring.",
    lines=("The council meets.", "In spring."),
    lora=LORA,
    teacher_model="smollm2-135m",
    generation_seconds=1.25,
)
CONTROL = dataclasses.replace(SELF_EDIT, id="job-1/0/passage", index=-1, format=EditFormat.PASSAGE, lines=())
ADAPTER = AdapterRef(
    sha256="ab" * 32,
    self_edit_id=SELF_EDIT.id,
    base_model="smollm2-135m",
    base_fingerprint="fp",
    size_bytes=123456,
    train_seconds=20.5,
    steps=10,
    final_loss=0.125,
    student_id="student-host-1",
    files=(
        AdapterFile("adapter_model.safetensors", "cd" * 32, 123),
        AdapterFile("adapter_config.json", "ef" * 32, 45),
    ),
)
SCORE = QuestionScore(
    question="Where?",
    answer="Velmora",
    response="In Velmora.",
    exact_match=False,
    f1=0.5,
    contains=True,
    correct=True,
)
MISS = QuestionScore(
    question="When?",
    answer="spring",
    response="winter",
    exact_match=False,
    f1=0.0,
    contains=False,
    correct=False,
)
VERDICT = Verdict(
    job_id="job-1",
    doc_index=0,
    self_edit_id=SELF_EDIT.id,
    adapter_sha256=ADAPTER.sha256,
    base_fingerprint="fp",
    baseline_accuracy=0.0,
    adapted_accuracy=0.5,
    reward=0.5,
    baseline_scores=(MISS, MISS),
    adapted_scores=(SCORE, MISS),
    eval_seconds=3.5,
    passed=True,
    checks=("fingerprint", "size"),
    auditor_key_id="key-1",
    signature="deadbeef",
)
JOB = Job(
    id="job-1",
    state=JobState.RUNNING,
    spec=SPEC,
    created_at=1700000000.5,
    finished_at=0.0,
    error="",
    progress=Progress(documents=2, proposed=1, self_edits=4, trained=2, audited=1),
    documents=(
        DocumentResult(
            doc_index=0,
            title="Velmora",
            baseline_accuracy=0.0,
            edits=(
                EditResult(self_edit=SELF_EDIT, adapter=ADAPTER, verdict=VERDICT),
                EditResult(self_edit=CONTROL, adapter=ADAPTER, verdict=None),
            ),
            best_self_edit_id=SELF_EDIT.id,
        ),
        DocumentResult(doc_index=1, title="Empty", baseline_accuracy=None, edits=()),
    ),
)

RECORDS = [
    QA("q", "a"),
    SPEC.documents[0],
    PASSAGE,
    LORA,
    SamplingSettings(),
    SPEC,
    JobSpec(),
    SELF_EDIT,
    CONTROL,
    ADAPTER,
    SCORE,
    VERDICT,
    EditResult(self_edit=SELF_EDIT),
    EditResult(self_edit=SELF_EDIT, adapter=ADAPTER, verdict=VERDICT),
    JOB.documents[0],
    JOB.documents[1],
    Progress(),
    JOB,
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_json_round_trip_gives_an_equal_record(record):
    """from_json(to_json(r)) == r for every record type, nested values included."""
    assert from_json(type(record), to_json(record)) == record


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_dict_round_trip_gives_an_equal_record(record):
    """from_dict(to_dict(r)) == r, and to_dict output is plain JSON (survives json.dumps/loads)."""
    data = to_dict(record)
    assert json.loads(json.dumps(data)) == data
    assert from_dict(type(record), data) == record


def test_round_trip_restores_enums_tuples_and_none():
    """Enums come back as enum members, lists as tuples, None as None (not as 0.0)."""
    job = from_json(Job, to_json(JOB))
    assert job.state is JobState.RUNNING
    assert job.spec.edit_format is EditFormat.SELF_QA
    assert isinstance(job.spec.documents, tuple) and isinstance(job.spec.documents[0].questions, tuple)
    assert isinstance(job.spec.lora.target_modules, tuple)
    assert job.documents[0].edits[1].verdict is None
    assert job.documents[0].baseline_accuracy == 0.0
    assert job.documents[1].baseline_accuracy is None
    assert job.documents[0].edits[0].verdict.adapted_scores[0] == SCORE
    assert job.documents[0].edits[1].self_edit.index == -1


def test_to_dict_writes_enums_as_values_and_tuples_as_lists():
    """The stored JSON shape: enum values (not names), lists, nested dicts."""
    data = to_dict(JOB)
    assert data["state"] == "running"
    assert data["spec"]["edit_format"] == "self_qa"
    assert data["spec"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert data["documents"][0]["edits"][1]["verdict"] is None
    assert data["documents"][0]["edits"][0]["self_edit"]["format"] == "implications"


def test_to_json_is_deterministic_with_sorted_keys():
    """Equal records give identical JSON text."""
    text = to_json(VERDICT)
    assert text == to_json(dataclasses.replace(VERDICT))
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_json_integers_decode_as_floats_for_float_fields():
    """A JSON 1 for a float field (what other JSON writers emit) becomes 1.0."""
    data = to_dict(ADAPTER) | {"train_seconds": 20, "final_loss": 0}
    adapter = from_dict(AdapterRef, data)
    assert type(adapter.train_seconds) is float and type(adapter.final_loss) is float
    result = from_dict(DocumentResult, {"doc_index": 0, "title": "t", "baseline_accuracy": 1, "edits": []})
    assert type(result.baseline_accuracy) is float and result.baseline_accuracy == 1.0


def test_missing_fields_take_their_defaults():
    """An empty JSON object is the default JobSpec; a partial lora keeps the other defaults."""
    assert from_dict(JobSpec, {}) == JobSpec()
    spec = from_dict(JobSpec, {"lora": {"rank": 8}})
    assert spec.lora == dataclasses.replace(LoraSettings(), rank=8)


@pytest.mark.parametrize(
    "cls, data, unknown",
    [
        (QA, {"question": "q", "answer": "a", "hint": "h"}, "hint"),
        (JobSpec, {"n_self_edit": 3}, "n_self_edit"),
        (JobSpec, {"lora": {"rnk": 4}}, "rnk"),
        (JobSpec, {"documents": [{"title": "t", "context": "c", "questions": [{"q": "x"}]}]}, "'q'"),
        (Job, to_dict(JOB) | {"extra": 1}, "extra"),
    ],
)
def test_unknown_field_is_a_value_error_naming_it(cls, data, unknown):
    """Strict decoding: an unknown key (at any depth) raises ValueError with its name."""
    with pytest.raises(ValueError, match=unknown):
        from_dict(cls, data)


def test_unknown_nested_field_inside_a_job_names_its_record():
    """A typo deep inside a stored job names both the field and the record type that lacks it."""
    data = to_dict(JOB)
    data["documents"][0]["edits"][0]["verdict"]["rewrd"] = 1.0
    with pytest.raises(ValueError, match=r"Verdict.*rewrd"):
        from_dict(Job, data)


def test_bad_enum_value_is_a_value_error():
    """An edit_format that names no EditFormat fails loudly."""
    with pytest.raises(ValueError):
        from_dict(JobSpec, {"edit_format": "summary"})


# --- the signed statement (seal.signing.statement_of) ----------------------------------------------

_CHANGED = {
    "job_id": "job-2",
    "doc_index": 1,
    "self_edit_id": "job-1/0/1",
    "adapter_sha256": "cd" * 32,
    "base_fingerprint": "fp2",
    "baseline_accuracy": 0.25,
    "adapted_accuracy": 0.75,
    "reward": 0.0,
    "baseline_scores": (SCORE, MISS),
    "adapted_scores": (dataclasses.replace(SCORE, f1=0.75), MISS),
    "eval_seconds": 4.0,
    "passed": False,
    "checks": ("fingerprint",),
    "auditor_key_id": "key-2",
    "self_edit_sha256": "12" * 32,
    "document_sha256": "34" * 32,
    "teacher_model": "policy-v2",
    "grading_metric": "f1",
    "judge_model": "gpt-4.1",
    "signoff_baseline_accuracy": 0.5,
    "signoff_adapted_accuracy": 1.0,
    "signoff_scores": (MISS,),
    "issued_at": 5.0,
    "expires_at": 6.0,
}


def test_every_verdict_field_but_the_signature_and_statement_is_covered_by_the_table():
    """The table changes every signed field, so a new Verdict field must be added to it (and signed)."""
    names = {f.name for f in dataclasses.fields(Verdict)}
    assert set(_CHANGED) == names - {"signature", "statement"}


@pytest.mark.parametrize("name, value", list(_CHANGED.items()), ids=list(_CHANGED))
def test_statement_changes_when_any_signed_field_changes(name, value):
    """Tampering with any field but the signature changes the bytes the signature covers."""
    from seal.signing import statement_of

    assert getattr(VERDICT, name) != value
    changed = statement_of(dataclasses.replace(VERDICT, **{name: value}))
    assert changed.SerializeToString(deterministic=True) != statement_of(VERDICT).SerializeToString(
        deterministic=True
    )


def test_statement_ignores_the_signature_and_survives_the_json_round_trip():
    from seal.signing import statement_of

    resigned = dataclasses.replace(VERDICT, signature="0123", statement="AAAA")
    assert statement_of(resigned) == statement_of(VERDICT)
    assert statement_of(from_json(Verdict, to_json(VERDICT))) == statement_of(VERDICT)


# --- strict decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, path",
    [
        ({"passage_control": "false"}, "passage_control"),
        ({"n_self_edits": "3"}, "n_self_edits"),
        ({"n_self_edits": 2.5}, "n_self_edits"),
        ({"n_self_edits": True}, "n_self_edits"),
        ({"lora": {"learning_rate": "0.001"}}, "lora.learning_rate"),
        ({"model": 7}, "model"),
        ({"documents": [{"title": "\ud800", "context": "c"}]}, "documents[0].title"),
        ({"lora": {"target_modules": [1]}}, "lora.target_modules[0]"),
    ],
    ids=[
        "bool-as-string",
        "int-as-string",
        "int-as-float",
        "int-as-bool",
        "float-as-string",
        "str-as-int",
        "lone-surrogate",
        "list-item",
    ],
)
def test_values_of_the_wrong_type_are_refused_with_their_path(data, path):
    """A JSON value of the wrong type never reaches validation or a queue (it used to raise later)."""
    with pytest.raises(RecordError) as info:
        from_dict(JobSpec, data)
    assert info.value.path == path


# --- Passage.digest ------------------------------------------------------------------------------


def test_passage_digest_is_sha256_of_title_newline_context():
    """A pinned value: the digest must not drift between releases."""
    expected = hashlib.sha256(b"Velmora\nThe Zorbian council meets in Velmora every spring.").hexdigest()
    assert PASSAGE.digest() == expected
    assert Passage("Velmora", PASSAGE.context).digest() == expected


@pytest.mark.parametrize(
    "other",
    [Passage("velmora", PASSAGE.context), Passage("Velmora", PASSAGE.context + " "), Passage("", "")],
)
def test_passage_digest_differs_when_text_differs(other):
    """Any change to title or context changes the digest."""
    assert other.digest() != PASSAGE.digest()


def test_document_passage_drops_the_questions():
    """Document.passage() keeps title and context only, so τ never reaches teacher or student."""
    doc = SPEC.documents[0]
    assert doc.passage() == Passage(title=doc.title, context=doc.context)
    assert doc.passage().digest() == dataclasses.replace(doc, questions=()).passage().digest()


# --- SelfEdit digest -----------------------------------------------------------------------------


def test_self_edit_digest_is_pinned_and_zero_token_usage_leaves_it_as_it_was():
    """A pinned value from before token usage existed: verdicts signed over old self-edits still
    verify, because proto3 does not serialize zero-valued fields."""
    from seal.digests import self_edit_sha256

    assert self_edit_sha256(SELF_EDIT) == "e6cf60df6ac60528c7be530aa793b9bc0ed5f468605b0dd10dd52cc10d92173b"
    used = dataclasses.replace(SELF_EDIT, prompt_tokens=40, completion_tokens=12)
    # Usage is part of the record: it is bound like generation_seconds, and survives JSON.
    assert self_edit_sha256(used) != self_edit_sha256(SELF_EDIT)
    assert from_json(SelfEdit, to_json(used)) == used
    old_json = {
        k: v for k, v in to_dict(SELF_EDIT).items() if k not in ("prompt_tokens", "completion_tokens")
    }
    assert from_dict(SelfEdit, old_json) == SELF_EDIT
