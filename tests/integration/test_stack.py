"""The four real services as processes on loopback, real Redis, a tiny random model: jobs end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.client import GatewayClient
from seal.digests import manifest_sha256
from seal.records import EditFormat, Job, JobState, from_dict, to_dict
from seal.registry import StudentRegistry
from seal.signing import verify_verdict
from seal.stack import LocalStack
from seal.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    student_pb2,
    student_pb2_grpc,
)
from seal.workplane import WorkPlane
from tests.conftest import delete_namespace
from tests.integration.waiting import wait_finished

SMALL_JOB = {
    "n_self_edits": 2,
    "lora": {"epochs": 1, "rank": 4},
    "sampling": {"max_new_tokens": 24},
    "documents": [
        {
            "title": "Alpha",
            "context": "Alpha is a town by the sea.",
            "questions": [
                {"question": "What is Alpha?", "answer": "a town"},
                {"question": "Where is Alpha?", "answer": "by the sea"},
            ],
        },
        {
            "title": "Beta",
            "context": "Beta is a river in the north.",
            "questions": [
                {"question": "What is Beta?", "answer": "a river"},
                {"question": "Which sea is it near?", "answer": "the north sea"},
            ],
        },
    ],
}


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    with LocalStack(
        model=str(tiny_model_dir),
        data_dir=tmp_path_factory.mktemp("stack"),
        redis_url=redis_url,
        namespace=f"seal-it-{uuid.uuid4().hex[:8]}",
        threads=1,
        extra_flags={"student": ["--train-batch", "3"]},
    ) as running:
        yield running
    delete_namespace(redis_url, running.namespace)


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> GatewayClient:
    return GatewayClient(stack.addresses["gateway"], token=stack.operator_token)


@pytest.fixture(scope="module")
def finished_job(client: GatewayClient) -> Job:
    from gateway.api import parse_job_spec

    job = client.submit(parse_job_spec(SMALL_JOB))
    return wait_finished(client, job.id)


def test_job_completes_with_every_self_edit_trained_and_audited(finished_job: Job) -> None:
    job = finished_job
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.progress.audited == job.progress.self_edits == 2 * (2 + 1)
    for doc in job.documents:
        formats = [e.self_edit.format for e in doc.edits]
        assert formats.count(EditFormat.IMPLICATIONS) == 2 and formats[-1] == EditFormat.PASSAGE
        for edit in doc.edits:
            v = edit.verdict
            assert edit.adapter is not None and v is not None
            assert v.adapter_sha256 == edit.adapter.sha256
            assert v.reward == pytest.approx(v.adapted_accuracy - v.baseline_accuracy)
            assert len(v.adapted_scores) == len(job.spec.documents[doc.doc_index].questions)
            assert edit.adapter.train_seconds > 0 and v.eval_seconds > 0
        assert doc.best_self_edit_id in {e.self_edit.id for e in doc.edits if e.self_edit.index >= 0}


def test_the_student_trains_a_rounds_updates_together(stack: LocalStack, finished_job: Job) -> None:
    """--train-batch 3: a document's three apply tasks, enqueued together, train in one batched pass."""
    adapters = stack.data_dir / "student" / "adapters"
    together = [
        json.loads((adapters / e.adapter.sha256 / "provenance.json").read_text()).get("trained_together", 1)
        for doc in finished_job.documents
        for e in doc.edits
        if e.adapter is not None
    ]
    assert len(together) == 6 and max(together) > 1, together


def test_verdicts_carry_the_auditors_valid_signature(stack: LocalStack, finished_job: Job) -> None:
    with grpc.insecure_channel(stack.addresses["auditor"]) as channel:
        key = auditor_pb2_grpc.AuditorStub(channel).GetSigningKey(auditor_pb2.GetSigningKeyRequest())
    verdicts = [e.verdict for d in finished_job.documents for e in d.edits]
    assert all(verify_verdict(v, key.public_key) for v in verdicts)
    forged = from_dict(type(verdicts[0]), {**to_dict(verdicts[0]), "reward": 1.0})
    assert not verify_verdict(forged, key.public_key)


def test_audit_rpc_scores_only_the_questions_the_gateway_registered(
    stack: LocalStack, finished_job: Job
) -> None:
    """The foundation's AuditAdapter took the document from the caller: the adapter's own answers as
    gold passed. Now the request has no document; τ comes from the job the gateway registered."""
    from seal import convert
    from seal.digests import document_sha256
    from seal.v1 import types_pb2

    assert "document" not in auditor_pb2.AuditAdapterRequest.DESCRIPTOR.fields_by_name
    edit = finished_job.documents[1].edits[0]
    request = auditor_pb2.AuditAdapterRequest(
        self_edit=convert.to_pb(edit.self_edit, types_pb2.SelfEdit),
        adapter=convert.to_pb(edit.adapter, types_pb2.AdapterRef),
    )
    with grpc.insecure_channel(stack.addresses["auditor"]) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        verdict = convert.from_pb(type(edit.verdict), stub.AuditAdapter(request, timeout=120))
        assert verdict.document_sha256 == document_sha256(finished_job.spec.documents[1])
        assert [s.question for s in verdict.adapted_scores] == [
            q.question for q in finished_job.spec.documents[1].questions
        ]
        # A self-edit naming a job the gateway never registered has no questions to be scored on.
        stray = convert.to_pb(dataclasses.replace(edit.self_edit, job_id="0" * 16), types_pb2.SelfEdit)
        with pytest.raises(grpc.RpcError) as err:
            stub.AuditAdapter(
                auditor_pb2.AuditAdapterRequest(self_edit=stray, adapter=request.adapter), timeout=60
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_adapter_bytes_travel_over_grpc_from_the_registered_student_and_match_their_manifest(
    stack: LocalStack, finished_job: Job, tmp_path: Path
) -> None:
    adapter = finished_job.documents[0].edits[0].adapter
    registry = StudentRegistry(WorkPlane(redis.Redis.from_url(stack.redis_url), stack.namespace))
    address = registry.address(adapter.student_id)
    assert address == stack.addresses["student"]  # the adapter names an id; the registry has the address
    assert adapter.student_id in registry.holders(adapter.sha256)
    with grpc.insecure_channel(address) as channel:
        chunks = list(
            student_pb2_grpc.StudentStub(channel).FetchAdapter(
                student_pb2.FetchAdapterRequest(sha256=adapter.sha256)
            )
        )
    files = {c.filename for c in chunks}
    assert {"adapter_model.safetensors", "adapter_config.json", "provenance.json"} <= files
    assert {f.name for f in adapter.files} == files
    assert manifest_sha256(adapter.files) == adapter.sha256
    for f in adapter.files:
        data = b"".join(c.data for c in chunks if c.filename == f.name)
        assert hashlib.sha256(data).hexdigest() == f.sha256 and len(data) == f.size
    provenance = json.loads(b"".join(c.data for c in chunks if c.filename == "provenance.json"))
    assert provenance["self_edit_id"] == adapter.self_edit_id
    assert provenance["base_fingerprint"] == adapter.base_fingerprint


def test_job_is_readable_over_http(stack: LocalStack, finished_job: Job) -> None:
    body = _http("GET", stack, f"/v1/jobs/{finished_job.id}")
    assert body["state"] == "succeeded"
    assert len(body["documents"]) == 2
    assert finished_job.id in _http("GET", stack, "/v1/jobs")["jobs"]


def test_http_submit_runs_a_job(stack: LocalStack, client: GatewayClient) -> None:
    one_doc = {
        **SMALL_JOB,
        "n_self_edits": 1,
        "passage_control": False,
        "documents": SMALL_JOB["documents"][1:],
    }
    created = _http("POST", stack, "/v1/jobs", one_doc, expect=201)
    job = wait_finished(client, created["id"])
    assert job.state == JobState.SUCCEEDED, job.error
    assert [e.self_edit.index for e in job.documents[0].edits] == [0]


BAD_INPUTS = [
    ("documents", lambda j: j.update(documents=[])),
    ("documents[0].context", lambda j: j["documents"][0].update(context="")),
    ("documents[0].context", lambda j: j["documents"][0].update(context="x" * 9000)),
    ("documents[0].questions", lambda j: j["documents"][0].update(questions=[])),
    ("documents[0].questions[0].answer", lambda j: j["documents"][0]["questions"][0].update(answer="")),
    ("n_self_edits", lambda j: j.update(n_self_edits=0)),
    ("n_self_edits", lambda j: j.update(n_self_edits=1000)),
    ("lora.rank", lambda j: j.update(lora={"rank": 0})),
    ("lora.learning_rate", lambda j: j.update(lora={"learning_rate": 5.0})),
    ("model", lambda j: j.update(model="no-such-model")),
]


def _bad_job(mutate) -> dict:  # noqa: ANN001
    job = json.loads(json.dumps(SMALL_JOB))
    mutate(job)
    return job


@pytest.mark.parametrize(("field", "mutate"), BAD_INPUTS)
def test_bad_input_over_grpc_is_invalid_argument_and_enqueues_nothing(stack, field, mutate) -> None:  # noqa: ANN001
    from google.protobuf import json_format

    queued = _propose_len(stack)
    request = json_format.ParseDict(_bad_job(mutate), gateway_pb2.JobSpec())
    with grpc.insecure_channel(stack.addresses["gateway"]) as channel, pytest.raises(grpc.RpcError) as err:
        gateway_pb2_grpc.GatewayStub(channel).SubmitJob(
            request, metadata=[("authorization", f"Bearer {stack.operator_token}")]
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")
    assert _propose_len(stack) == queued


@pytest.mark.parametrize(("field", "mutate"), BAD_INPUTS)
def test_bad_input_over_http_is_400_naming_the_field(stack, field, mutate) -> None:  # noqa: ANN001
    queued = _propose_len(stack)
    body = _http("POST", stack, "/v1/jobs", _bad_job(mutate), expect=400)
    assert body["error"]["field"] == field
    assert body["error"]["code"] == "bad_request"
    assert _propose_len(stack) == queued


def test_malformed_http_bodies_are_400(stack: LocalStack) -> None:
    assert "JSON" in _http("POST", stack, "/v1/jobs", b"{not json", expect=400)["error"]["message"]
    assert _http("POST", stack, "/v1/jobs", [1, 2], expect=400)["error"]["field"] == "body"
    assert (
        _http("POST", stack, "/v1/jobs", {**SMALL_JOB, "edit_format": "poem"}, expect=400)["error"]["field"]
        == "edit_format"
    )


def test_unknown_job_is_not_found(stack: LocalStack, client: GatewayClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.get("does-not-exist")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "does-not-exist" in _http("GET", stack, "/v1/jobs/does-not-exist", expect=404)["error"]["message"]


def test_every_service_reports_health_and_reflection(stack: LocalStack) -> None:
    expected = {
        "teacher": "seal.v1.Teacher",
        "student": "seal.v1.Student",
        "auditor": "seal.v1.Auditor",
        "gateway": "seal.v1.Gateway",
    }
    for kind, service in expected.items():
        with grpc.insecure_channel(stack.addresses[kind]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name for r in replies for s in r.list_services_response.service}
            assert service in names


def test_services_log_json(stack: LocalStack, finished_job: Job) -> None:
    lines = [ln for ln in stack.log_path("student").read_text().splitlines() if ln.startswith("{")]
    entries = [json.loads(ln) for ln in lines]
    assert any(e["msg"] == "serving" and e["service"] == "student" for e in entries)


def test_a_job_survives_a_gateway_restart(
    stack: LocalStack, client: GatewayClient, finished_job: Job
) -> None:
    """Job state lives in Redis: a new gateway process serves the jobs of the old one."""
    old = stack.processes["gateway"]
    old.send_signal(signal.SIGTERM)
    assert old.wait(timeout=30) == 0  # drained cleanly
    stack.processes["gateway"] = stack._spawn("gateway")
    stack._wait_healthy("gateway", time.monotonic() + 60)
    assert GatewayClient(stack.addresses["gateway"], token=stack.operator_token).get(
        finished_job.id
    ) == client.get(finished_job.id)


def _propose_len(stack: LocalStack) -> int:
    return int(redis.Redis.from_url(stack.redis_url).xlen(f"{stack.namespace}:stream:propose"))


def _http(method: str, stack: LocalStack, path: str, body=None, expect: int = 200):  # noqa: ANN001
    data = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        f"http://{stack.http_address}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {stack.operator_token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    assert status == expect, payload
    return json.loads(payload)


def test_direct_rpcs_validate_their_input(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.addresses["student"]) as channel:
        stub = student_pb2_grpc.StudentStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ApplySelfEdit(student_pb2.ApplySelfEditRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchAdapter(student_pb2.FetchAdapterRequest(sha256="0" * 64)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchAdapter(student_pb2.FetchAdapterRequest(sha256="../etc")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_teacher_proposes_self_edits_over_grpc(stack: LocalStack) -> None:
    from seal.v1 import teacher_pb2, teacher_pb2_grpc, types_pb2

    request = teacher_pb2.ProposeSelfEditsRequest(
        passage=types_pb2.Passage(title="Alpha", context="Alpha is a town by the sea."),
        n=2,
        sampling=types_pb2.SamplingSettings(max_new_tokens=8),
    )
    with grpc.insecure_channel(stack.addresses["teacher"]) as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        reply = stub.ProposeSelfEdits(request)
        assert [e.id for e in reply.self_edits] == ["adhoc/0/0", "adhoc/0/1"]
        assert all(e.format == types_pb2.EDIT_FORMAT_IMPLICATIONS for e in reply.self_edits)  # UNSPECIFIED
        assert reply.self_edits[0].passage.title == "Alpha"
        request.n = 0
        with pytest.raises(grpc.RpcError) as err:
            stub.ProposeSelfEdits(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("n: must be in [1, 16]")


def test_the_kill_switch_stops_every_service_and_shows_in_their_health(
    stack: LocalStack, client: GatewayClient, finished_job: Job
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gateway.api import parse_job_spec
    from seal.killswitch import ADAPTATION_HEALTH

    def adaptation(kind: str) -> int:
        with grpc.insecure_channel(stack.addresses[kind]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=ADAPTATION_HEALTH), timeout=5).status

    def every(status: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(adaptation(kind) == status for kind in ("teacher", "student", "auditor")):
                return True
            time.sleep(0.5)
        return False

    serving, stopped = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert every(serving)
    client.set_kill_switch(True, "drill")
    try:
        assert every(stopped)
        with pytest.raises(grpc.RpcError) as refused:
            client.submit(parse_job_spec(SMALL_JOB))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details().startswith("kill_switch: ") and "drill" in refused.value.details()
        with pytest.raises(grpc.RpcError) as no_promotion:
            doc = finished_job.documents[0]
            client.promote("faq", finished_job.id, doc.best_self_edit_id)
        assert no_promotion.value.details().startswith("kill_switch: ")
    finally:
        client.set_kill_switch(False)
    assert every(serving)
    assert client.get_kill_switch().on is False


def test_the_gateway_serves_a_version_built_from_a_students_adapter(
    stack: LocalStack, finished_job: Job
) -> None:
    """The serving path across real processes: the gateway verifies a version, fetches its adapter
    from the student that holds it (over gRPC, digest checked), merges it and answers the `openai`
    client. The tiny model learns nothing, so no verdict of this job passed: the test signs a passing
    verdict and certificate for the student's real adapter with this stack's own auditor key."""
    import openai
    import redis

    from gateway.deployments import DeploymentStore
    from gateway.jobs import JobStore
    from seal.digests import document_sha256
    from seal.records import Certificate, DocumentAccuracy, Layer, LearnedDocument, VersionState, to_json
    from seal.signing import TrustedKeys, VerdictSigner, version_fingerprint
    from seal.workplane import WorkPlane

    signer = VerdictSigner.load_or_create(stack.signing_key_path())
    edit = finished_job.documents[0].edits[0]
    adapter, verdict = edit.adapter, edit.verdict
    passing = signer.sign(dataclasses.replace(verdict, passed=True, checks=("tau_leak:pass",)))
    doc = finished_job.spec.documents[0]
    learned = LearnedDocument(finished_job.id, 0, doc.title, document_sha256(doc), doc.signoff_questions)
    plane = WorkPlane(redis.Redis.from_url(stack.redis_url), stack.namespace)
    keys = TrustedKeys.of(signer.public_key_bytes())
    registry = DeploymentStore(plane, JobStore(plane), keys)
    base = registry._ensure("served", adapter.base_fingerprint).versions[0]
    fingerprint = version_fingerprint(adapter.base_fingerprint, [adapter.sha256])
    certificate = signer.sign_certificate(
        Certificate(
            deployment="served",
            version=1,
            fingerprint=fingerprint,
            base_fingerprint=adapter.base_fingerprint,
            adapter_sha256s=(adapter.sha256,),
            documents=(DocumentAccuracy(finished_job.id, 0, learned.document_sha256, 1.0),),
            passed=True,
        )
    )
    version = dataclasses.replace(
        base,
        version=1,
        parent=0,
        fingerprint=fingerprint,
        state=VersionState.PROMOTED,
        certificate=certificate,
        layers=(
            Layer(adapter=adapter, verdict=passing, self_edit_text=edit.self_edit.text, document=learned),
        ),
    )
    plane.redis.hset(plane.key("deploy", "served", "versions"), "1", to_json(version))
    plane.redis.hset(plane.key("deploy", "served", "aliases"), "production", 1)

    client = openai.OpenAI(
        base_url=f"http://{stack.http_address}/v1", api_key=stack.operator_token, max_retries=0
    )
    assert {"base", "served", "served@0", "served@1"} <= {m.id for m in client.models.list().data}
    for model in ("served", "served@0", "base"):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is Alpha?"}], max_tokens=6, temperature=0
        )
        assert reply.model == model and reply.choices[0].finish_reason in ("stop", "length")
    assert (stack.data_dir / "gateway" / "served-adapters" / adapter.sha256).is_dir()  # fetched, verified

    # A version whose verdict no trusted key signed is never loaded.
    forged = dataclasses.replace(
        version,
        version=2,
        layers=(dataclasses.replace(version.layers[0], verdict=VerdictSigner.generate().sign(verdict)),),
    )
    plane.redis.hset(plane.key("deploy", "served", "versions"), "2", to_json(forged))
    with pytest.raises(openai.BadRequestError, match="unknown_key"):
        client.chat.completions.create(
            model="served@2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
