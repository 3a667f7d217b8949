"""Record <-> protobuf translation: round trips, presence of optional fields, enum mapping."""

from __future__ import annotations

import dataclasses

import pytest

from seal.convert import enum_from_pb, from_pb, to_pb
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
    SamplingSettings,
    SelfEdit,
    Verdict,
)
from seal.v1 import gateway_pb2, types_pb2

PASSAGE = Passage(title="Velmora", context="The Zorbian council meets in Velmora every spring.")
LORA = LoraSettings(
    rank=4, alpha=8.0, learning_rate=5e-4, epochs=2, target_modules=("q_proj", "v_proj"), seed=7
)
SPEC = JobSpec(
    documents=(
        Document(
            title="Velmora",
            context=PASSAGE.context,
            questions=(QA("Where?", "Velmora"), QA("When?", "spring")),
        ),
        Document(title="Second", context="Another context.", questions=(QA("What?", "this"),)),
    ),
    n_self_edits=2,
    edit_format=EditFormat.REWRITE,
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
    format=EditFormat.SELF_QA,
    passage=PASSAGE,
    text="Q: Where? A: Velmora",
    lines=("Q: Where? A: Velmora",),
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
    size_bytes=2**33,
    train_seconds=20.5,
    steps=10,
    final_loss=0.125,
    student_id="student-host-1",
    files=(
        AdapterFile("adapter_model.safetensors", "cd" * 32, 123),
        AdapterFile("adapter_config.json", "ef" * 32, 45),
    ),
)
SCORE = QuestionScore("Where?", "Velmora", "In Velmora.", False, 0.5, True, True)
VERDICT = Verdict(
    job_id="job-1",
    doc_index=0,
    self_edit_id=SELF_EDIT.id,
    adapter_sha256=ADAPTER.sha256,
    base_fingerprint="fp",
    baseline_accuracy=0.0,
    adapted_accuracy=0.5,
    reward=0.5,
    baseline_scores=(dataclasses.replace(SCORE, correct=False, contains=False),),
    adapted_scores=(SCORE,),
    eval_seconds=3.5,
    passed=True,
    checks=("fingerprint", "size"),
    auditor_key_id="key-1",
    signature="deadbeef",
)


def _job(baseline_0: float | None, baseline_1: float | None) -> Job:
    return Job(
        id="job-1",
        state=JobState.SUCCEEDED,
        spec=SPEC,
        created_at=1700000000.5,
        finished_at=1700000100.25,
        error="",
        progress=Progress(documents=2, proposed=2, self_edits=4, trained=3, audited=2),
        documents=(
            DocumentResult(
                doc_index=0,
                title="Velmora",
                baseline_accuracy=baseline_0,
                edits=(
                    EditResult(self_edit=SELF_EDIT, adapter=ADAPTER, verdict=VERDICT),
                    EditResult(self_edit=CONTROL, adapter=ADAPTER),
                    EditResult(self_edit=dataclasses.replace(SELF_EDIT, id="job-1/0/1", index=1)),
                ),
                best_self_edit_id=SELF_EDIT.id,
            ),
            DocumentResult(doc_index=1, title="Second", baseline_accuracy=baseline_1, edits=()),
        ),
    )


ROUND_TRIPS = [
    (SPEC, gateway_pb2.JobSpec),
    (JobSpec(), gateway_pb2.JobSpec),
    (dataclasses.replace(SPEC, n_self_edits=0, passage_control=True), gateway_pb2.JobSpec),
    (_job(0.5, None), gateway_pb2.Job),
    (_job(0.0, 0.0), gateway_pb2.Job),
    (_job(None, None), gateway_pb2.Job),
    (SELF_EDIT, types_pb2.SelfEdit),
    (CONTROL, types_pb2.SelfEdit),
    (VERDICT, types_pb2.Verdict),
    (dataclasses.replace(VERDICT, passed=False, checks=(), reward=-0.5), types_pb2.Verdict),
    (ADAPTER, types_pb2.AdapterRef),
    (LORA, types_pb2.LoraSettings),
    (PASSAGE, types_pb2.Passage),
    (SPEC.documents[0], types_pb2.Document),
    (EditResult(self_edit=SELF_EDIT, adapter=ADAPTER, verdict=VERDICT), gateway_pb2.EditResult),
    (EditResult(self_edit=SELF_EDIT), gateway_pb2.EditResult),
]


@pytest.mark.parametrize("record, pb_cls", ROUND_TRIPS, ids=lambda x: getattr(x, "__name__", ""))
def test_round_trip_gives_an_equal_record(record, pb_cls):
    """from_pb(to_pb(r)) == r, also after serialising the message to bytes and back."""
    msg = to_pb(record, pb_cls)
    assert from_pb(type(record), msg) == record
    wire = pb_cls.FromString(msg.SerializeToString())
    assert from_pb(type(record), wire) == record


@pytest.mark.parametrize("baseline", [None, 0.0, 0.75])
def test_optional_baseline_accuracy_keeps_none_apart_from_zero(baseline):
    """`optional double`: None stays None (no verdict yet) and 0.0 stays 0.0 (nothing known)."""
    record = DocumentResult(doc_index=0, title="t", baseline_accuracy=baseline, edits=())
    msg = to_pb(record, gateway_pb2.DocumentResult)
    assert msg.HasField("baseline_accuracy") is (baseline is not None)
    back = from_pb(DocumentResult, gateway_pb2.DocumentResult.FromString(msg.SerializeToString()))
    assert back.baseline_accuracy == baseline
    assert (back.baseline_accuracy is None) is (baseline is None)


def test_self_edit_control_index_minus_one_survives():
    """The passage-only control's index -1 goes through int32 unchanged."""
    msg = to_pb(CONTROL, types_pb2.SelfEdit)
    assert msg.index == -1
    assert msg.format == types_pb2.EDIT_FORMAT_PASSAGE
    assert from_pb(SelfEdit, msg).index == -1


def test_empty_job_spec_message_gives_record_defaults():
    """Every unset optional field, unset message and UNSPECIFIED enum takes the JobSpec default."""
    assert from_pb(JobSpec, gateway_pb2.JobSpec()) == JobSpec()


def test_partly_set_lora_keeps_defaults_for_unset_fields():
    """Only the fields a client set override the defaults."""
    msg = gateway_pb2.JobSpec(
        lora=types_pb2.LoraSettings(rank=8), sampling=types_pb2.SamplingSettings(top_p=0.5)
    )
    spec = from_pb(JobSpec, msg)
    assert spec.lora == dataclasses.replace(LoraSettings(), rank=8)
    assert spec.sampling == dataclasses.replace(SamplingSettings(), top_p=0.5)
    assert spec.n_self_edits == JobSpec().n_self_edits
    assert spec.passage_control is True


@pytest.mark.parametrize(
    "msg, path, value",
    [
        (gateway_pb2.JobSpec(lora=types_pb2.LoraSettings(rank=0)), ("lora", "rank"), 0),
        (gateway_pb2.JobSpec(lora=types_pb2.LoraSettings(epochs=0)), ("lora", "epochs"), 0),
        (gateway_pb2.JobSpec(lora=types_pb2.LoraSettings(alpha=0.0)), ("lora", "alpha"), 0.0),
        (
            gateway_pb2.JobSpec(sampling=types_pb2.SamplingSettings(temperature=0.0)),
            ("sampling", "temperature"),
            0.0,
        ),
        (gateway_pb2.JobSpec(sampling=types_pb2.SamplingSettings(top_p=0.0)), ("sampling", "top_p"), 0.0),
        (gateway_pb2.JobSpec(n_self_edits=0), ("n_self_edits",), 0),
        (gateway_pb2.JobSpec(passage_control=False), ("passage_control",), False),
    ],
)
def test_explicit_zero_in_an_optional_field_survives(msg, path, value):
    """A set 0 / False is not mistaken for unset, so validation can reject it (or honour it)."""
    wire = gateway_pb2.JobSpec.FromString(msg.SerializeToString())
    got = from_pb(JobSpec, wire)
    for name in path:
        got = getattr(got, name)
    assert got == value
    default = JobSpec()
    for name in path:
        default = getattr(default, name)
    assert default != value


def test_to_pb_sets_presence_for_every_optional_field_of_a_record():
    """A record always carries a value, so to_pb marks optional fields present (even zeros)."""
    msg = to_pb(
        dataclasses.replace(SPEC, n_self_edits=0, lora=dataclasses.replace(LORA, seed=0)), gateway_pb2.JobSpec
    )
    assert msg.HasField("n_self_edits") and msg.n_self_edits == 0
    assert msg.HasField("passage_control") and msg.passage_control is False
    assert msg.lora.HasField("seed") and msg.lora.seed == 0
    assert msg.HasField("lora") and msg.HasField("sampling")


@pytest.mark.parametrize(
    "number, expected",
    [
        (types_pb2.EDIT_FORMAT_UNSPECIFIED, EditFormat.IMPLICATIONS),
        (types_pb2.EDIT_FORMAT_IMPLICATIONS, EditFormat.IMPLICATIONS),
        (types_pb2.EDIT_FORMAT_REWRITE, EditFormat.REWRITE),
        (types_pb2.EDIT_FORMAT_SELF_QA, EditFormat.SELF_QA),
        (types_pb2.EDIT_FORMAT_PASSAGE, EditFormat.PASSAGE),
    ],
)
def test_job_spec_edit_format_maps_by_name_and_unspecified_takes_the_default(number, expected):
    """EDIT_FORMAT_X <-> EditFormat.X; EDIT_FORMAT_UNSPECIFIED gives IMPLICATIONS."""
    assert from_pb(JobSpec, gateway_pb2.JobSpec(edit_format=number)).edit_format is expected


@pytest.mark.parametrize("fmt", list(EditFormat))
def test_every_edit_format_has_a_proto_value_and_round_trips(fmt):
    """Each domain enum member has its EDIT_FORMAT_* twin."""
    msg = to_pb(JobSpec(edit_format=fmt), gateway_pb2.JobSpec)
    assert types_pb2.EditFormat.Name(msg.edit_format) == "EDIT_FORMAT_" + fmt.name
    assert from_pb(JobSpec, msg).edit_format is fmt


@pytest.mark.parametrize("state", list(JobState))
def test_every_job_state_maps_to_its_proto_value(state):
    """JobState.X <-> JOB_STATE_X."""
    msg = to_pb(dataclasses.replace(_job(None, None), state=state), gateway_pb2.Job)
    assert gateway_pb2.JobState.Name(msg.state) == "JOB_STATE_" + state.name
    assert from_pb(Job, msg).state is state


@pytest.mark.parametrize(
    "enum_cls, wrapper, number, default, expected",
    [
        (
            EditFormat,
            types_pb2.EditFormat,
            types_pb2.EDIT_FORMAT_UNSPECIFIED,
            EditFormat.IMPLICATIONS,
            EditFormat.IMPLICATIONS,
        ),
        (
            EditFormat,
            types_pb2.EditFormat,
            types_pb2.EDIT_FORMAT_UNSPECIFIED,
            EditFormat.REWRITE,
            EditFormat.REWRITE,
        ),
        (
            EditFormat,
            types_pb2.EditFormat,
            types_pb2.EDIT_FORMAT_SELF_QA,
            EditFormat.IMPLICATIONS,
            EditFormat.SELF_QA,
        ),
        (
            EditFormat,
            types_pb2.EditFormat,
            types_pb2.EDIT_FORMAT_PASSAGE,
            EditFormat.IMPLICATIONS,
            EditFormat.PASSAGE,
        ),
        (JobState, gateway_pb2.JobState, gateway_pb2.JOB_STATE_UNSPECIFIED, JobState.QUEUED, JobState.QUEUED),
        (JobState, gateway_pb2.JobState, gateway_pb2.JOB_STATE_FAILED, JobState.QUEUED, JobState.FAILED),
    ],
)
def test_enum_from_pb(enum_cls, wrapper, number, default, expected):
    """A proto enum number as its domain member; UNSPECIFIED gives the caller's default."""
    assert enum_from_pb(enum_cls, wrapper, number, default) is expected


def test_enum_from_pb_rejects_an_unknown_number():
    """A number the proto enum does not define is an error, not a silent default."""
    with pytest.raises(ValueError):
        enum_from_pb(EditFormat, types_pb2.EditFormat, 99, EditFormat.IMPLICATIONS)


def test_to_pb_writes_field_values_by_name():
    """Spot-check the message to_pb builds (not only that from_pb undoes it)."""
    msg = to_pb(SPEC, gateway_pb2.JobSpec)
    assert [d.title for d in msg.documents] == ["Velmora", "Second"]
    assert [(q.question, q.answer) for q in msg.documents[0].questions] == [
        ("Where?", "Velmora"),
        ("When?", "spring"),
    ]
    assert msg.edit_format == types_pb2.EDIT_FORMAT_REWRITE
    assert list(msg.lora.target_modules) == ["q_proj", "v_proj"]
    assert (msg.lora.rank, msg.lora.alpha, msg.lora.seed) == (4, 8.0, 7)
    assert msg.sampling.top_p == pytest.approx(0.9)
    assert msg.model == "smollm2-135m"


def test_edit_result_without_adapter_or_verdict_leaves_them_unset():
    """None nested records become unset messages, and unset messages come back as None."""
    msg = to_pb(EditResult(self_edit=SELF_EDIT), gateway_pb2.EditResult)
    assert msg.HasField("self_edit")
    assert not msg.HasField("adapter") and not msg.HasField("verdict")
    back = from_pb(EditResult, msg)
    assert back.adapter is None and back.verdict is None


def test_an_enum_number_the_contract_does_not_define_is_invalid_argument_naming_the_field():
    """The foundation raised KeyError here, which reached callers as INTERNAL."""
    from seal.errors import InvalidArgument
    from seal.v1 import gateway_pb2

    msg = gateway_pb2.JobSpec(edit_format=99)
    with pytest.raises(InvalidArgument) as info:
        from_pb(JobSpec, msg)
    assert info.value.field == "edit_format" and "EDIT_FORMAT_REWRITE" in str(info.value)


def test_bytes_fields_are_base64_text_in_records():
    import base64

    from seal.v1 import types_pb2

    verdict = dataclasses.replace(VERDICT, statement=base64.b64encode(b"\x00signed\xff").decode())
    msg = to_pb(verdict, types_pb2.Verdict)
    assert msg.statement == b"\x00signed\xff"
    assert from_pb(Verdict, msg) == verdict
