"""Promotion on real Redis with real adapters: every refusal has its own code; a promoted version is
certified by the auditor's certification core on the merged model; the OpenAI-compatible API serves it
and a rollback restores the base's answers, with no restart; the audit log records it all.

Verdicts are signed here with a real Ed25519 key the gateway trusts, as an auditor would sign them
(the auditor's scoring is tested on its own); what is under test is what the gateway does with them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import openai
import pytest

from auditor.certify import certify
from gateway.api import GatewayApi
from gateway.auth import Authenticator
from gateway.deployments import DeploymentStore, PromotionRefused
from gateway.events import event_handler
from gateway.http import HttpLimits, build_app, start_http
from gateway.jobs import JobStore
from gateway.served import DeploymentModels
from gateway.serving import serving_routes
from seal.auditlog import AuditLog
from seal.digests import document_sha256, self_edit_sha256
from seal.models import load_model, model_fingerprint
from seal.records import (
    QA,
    AdapterRef,
    Audited,
    Certified,
    Document,
    EditFormat,
    Event,
    JobSpec,
    LoraSettings,
    Proposed,
    SelfEdit,
    Trained,
    Verdict,
    VersionState,
    to_dict,
)
from seal.signing import TrustedKeys, VerdictSigner
from seal.tasks import encode
from seal.validation import Limits
from student.artifacts import save_adapter
from student.training import train_adapter

AUDITOR = VerdictSigner.generate()
KEYS = TrustedKeys.of(AUDITOR.public_key_bytes())


def _doc(title: str) -> Document:
    return Document(
        title,
        f"{title} is a harbour town with a red lighthouse.",
        (QA(f"What does {title} have?", "a red lighthouse"), QA(f"What is {title}?", "a harbour town")),
    )


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real LoRA adapters of the tiny model, trained hard enough to change its greedy answers."""
    model, tokenizer = load_model(tiny_model_dir)
    out = {}
    for i, text in enumerate(["Zeta is a harbour town with a red lighthouse.", "Eta has a blue bridge."]):
        peft_model, _ = train_adapter(
            model, tokenizer, [text], LoraSettings(rank=8, epochs=30, learning_rate=2e-2, seed=i)
        )
        sha, directory, _ = save_adapter(peft_model, tmp_path_factory.mktemp(f"adapters-{i}"), {"text": text})
        peft_model.unload()
        out[sha] = directory
    return out


@pytest.fixture()
def registry(plane, tiny_model_dir: Path, adapters):  # noqa: ANN001, ANN201
    jobs = JobStore(plane, signoff_fraction=0.5)
    log = AuditLog(plane.redis, plane.key(""))
    deployments = DeploymentStore(
        plane,
        jobs,
        KEYS,
        required_approvals=0,
        max_knowledge_drop=0.25,
        audit=lambda kind, actor, subject, body: log.append(kind, actor, subject, body),
    )
    api = GatewayApi(jobs, Limits(signoff_fraction=0.5), "tiny", deployments=deployments)
    handle = event_handler(jobs, KEYS, deployments)
    return jobs, deployments, api, handle, log


def _audited_job(jobs: JobStore, handle, sha: str, fingerprint: str, title: str = "Zeta", **verdict):  # noqa: ANN001, ANN003, ANN202
    """A finished job whose one self-edit was trained into adapter `sha` and judged by `verdict`."""
    job = jobs.create(JobSpec(documents=(_doc(title),), n_self_edits=1, passage_control=False))
    doc = job.spec.documents[0]
    assert len(doc.questions) == 1 and len(doc.signoff_questions) == 1  # split by the gateway
    edit = SelfEdit(
        id=f"{job.id}/0/0",
        job_id=job.id,
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=doc.passage(),
        text=doc.context,
        lines=(doc.context,),
        lora=LoraSettings(),
        teacher_model="teacher",
    )
    adapter = AdapterRef(
        sha256=sha,
        self_edit_id=edit.id,
        base_model="tiny",
        base_fingerprint=fingerprint,
        size_bytes=1,
        train_seconds=1.0,
        steps=1,
        final_loss=0.1,
        student_id="student-1",
    )
    fields = dict(
        job_id=job.id,
        doc_index=0,
        self_edit_id=edit.id,
        adapter_sha256=sha,
        base_fingerprint=fingerprint,
        baseline_accuracy=0.0,
        adapted_accuracy=1.0,
        reward=1.0,
        baseline_scores=(),
        adapted_scores=(),
        eval_seconds=1.0,
        passed=True,
        checks=("tau_leak:pass", "signoff:pass"),
        self_edit_sha256=self_edit_sha256(edit),
        document_sha256=document_sha256(doc),
        teacher_model="teacher",
        signoff_baseline_accuracy=0.0,
        signoff_adapted_accuracy=1.0,
    )
    fields.update({k: v for k, v in verdict.items() if k != "ttl_s"})
    signed = AUDITOR.sign(Verdict(**fields), ttl_s=verdict.get("ttl_s", 3600.0))
    handle(encode(Event(job_id=job.id, proposed=Proposed(doc_index=0, self_edits=(edit,)))))
    handle(encode(Event(job_id=job.id, trained=Trained(self_edit_id=edit.id, adapter=adapter))))
    handle(encode(Event(job_id=job.id, audited=Audited(self_edit_id=edit.id, verdict=signed))))
    return jobs.get(job.id), edit, adapter


def _tamper(jobs: JobStore, job_id: str, self_edit_id: str, change) -> None:  # noqa: ANN001
    """Rewrite a recorded verdict in Redis, as someone with write access to it could."""
    key = jobs.plane.key("job", job_id, "parts")
    raw = json.loads(jobs.redis.hget(key, f"{self_edit_id}|verdict"))
    jobs.redis.hset(key, f"{self_edit_id}|verdict", json.dumps(change(raw)))


def _fingerprint(tiny_model_dir: Path) -> str:
    return model_fingerprint(tiny_model_dir)


def _refusal(api: GatewayApi, job_id: str, edit_id: str) -> str:
    with pytest.raises(PromotionRefused) as refused:
        api.promote("faq", job_id, edit_id)
    return refused.value.code


def test_every_refusal_has_its_own_code(registry, adapters, tiny_model_dir: Path) -> None:
    jobs, deployments, api, handle, log = registry
    sha = next(iter(adapters))
    fp = _fingerprint(tiny_model_dir)

    job, edit, _ = _audited_job(
        jobs, handle, sha, fp, reward=0.0, passed=False, checks=("tau_leak:pass", "signoff:fail:0 -> 0")
    )
    assert _refusal(api, job.id, edit.id) == "failed_guardrail"

    other = VerdictSigner.generate()
    tampering = {
        "unknown_key": lambda v: to_dict(
            other.sign(Verdict(**{**_record(v), "statement": "", "signature": ""}))
        ),
        "bad_signature": lambda v: {**v, "signature": "00" * 64},
        "altered": lambda v: {**v, "reward": 9.0},
    }
    for code, change in tampering.items():
        job, edit, _ = _audited_job(jobs, handle, sha, fp)
        _tamper(jobs, job.id, edit.id, change)
        assert _refusal(api, job.id, edit.id) == code, code

    # A policy-training round's reward-only verdict, even with a reward and passed forced true: refused,
    # saying why (retention and KL were never measured).
    job, edit, _ = _audited_job(
        jobs,
        handle,
        sha,
        fp,
        checks=("tau_leak:pass", "signoff:pass", "forgetting_unchecked:fail:reward-only"),
    )
    with pytest.raises(PromotionRefused) as refused:
        api.promote("faq", job.id, edit.id)
    assert refused.value.code == "failed_guardrail" and "reward-only audit" in refused.value.message

    # The student's record of the adapter changed after the verdict: the verdict names another one.
    job, edit, adapter = _audited_job(jobs, handle, sha, fp)
    key = jobs.plane.key("job", job.id, "parts")
    jobs.redis.hset(
        key, f"{edit.id}|adapter", json.dumps(to_dict(dataclasses.replace(adapter, sha256="c" * 64)))
    )
    assert _refusal(api, job.id, edit.id) == "wrong_adapter"

    job, edit, _ = _audited_job(jobs, handle, sha, fp, ttl_s=0.5)
    time.sleep(0.6)
    assert _refusal(api, job.id, edit.id) == "expired"

    job, edit, _ = _audited_job(jobs, handle, sha, fp)
    _tamper(jobs, job.id, edit.id, lambda v: v)  # untouched: it would pass, but...
    deployments.set_kill_switch(True, "incident 42", "alice")
    assert _refusal(api, job.id, edit.id) == "kill_switch"
    with pytest.raises(Exception, match="kill_switch"):  # new jobs are refused too
        api.submit(JobSpec(documents=(_doc("Theta"),), n_self_edits=1))
    deployments.set_kill_switch(False, "", "alice")

    trusted = KEYS
    strict = DeploymentStore(jobs.plane, jobs, trusted, required_approvals=2)
    with pytest.raises(PromotionRefused) as missing:
        strict.promote("faq", job.id, edit.id, 0, "", "bob")
    assert missing.value.code == "missing_approvals" and "0 of 2" in missing.value.message

    job_without_verdict = jobs.create(
        JobSpec(documents=(_doc("Iota"),), n_self_edits=1, passage_control=False)
    )
    lone = dataclasses.replace(edit, id=f"{job_without_verdict.id}/0/0", job_id=job_without_verdict.id)
    handle(encode(Event(job_id=lone.job_id, proposed=Proposed(doc_index=0, self_edits=(lone,)))))
    assert _refusal(api, lone.job_id, lone.id) == "no_verdict"

    kinds = [e.kind for e in log.entries()]
    assert kinds.count("promotion_refused") >= 8 and "kill_switch" in kinds and "verdict" in kinds
    assert log.verify().ok


def _record(v: dict) -> dict:
    from seal.records import from_dict

    return dataclasses.asdict(from_dict(Verdict, v))


def _certified(certificate) -> dict:  # noqa: ANN001
    """The auditor's certified event for `certificate`, as it reaches the gateway's event handler."""
    return encode(
        Event(job_id=f"deployment:{certificate.deployment}", certified=Certified(certificate=certificate))
    )


def _certify(model, tokenizer, version, adapters):  # noqa: ANN001, ANN202
    dirs = [adapters[layer.adapter.sha256] for layer in version.layers]
    certificate = certify(
        model,
        tokenizer,
        version.deployment,
        version.version,
        version.fingerprint,
        version.base_fingerprint,
        dirs,
        [layer.adapter.sha256 for layer in version.layers],
        [layer.document for layer in version.layers],
        gates=[layer.document.gate() for layer in version.layers],  # as the auditor's service passes them
    )
    return AUDITOR.sign_certificate(certificate)


def test_promote_certify_serve_and_roll_back_through_the_openai_api(
    registry, adapters, tiny_model_dir: Path
) -> None:
    jobs, deployments, api, handle, log = registry
    fp = _fingerprint(tiny_model_dir)
    model, tokenizer = load_model(tiny_model_dir)
    first, second = list(adapters)

    job, edit, _ = _audited_job(jobs, handle, first, fp)
    version = api.promote("faq", job.id, edit.id)
    assert version.state is VersionState.CERTIFYING and version.version == 1 and version.parent == 0
    tasks = jobs.redis.xrange(jobs.plane.stream_key("certify"))
    assert len(tasks) == 1  # the auditor's certification task
    certificate = _certify(model, tokenizer, version, adapters)
    handle(_certified(certificate))
    promoted = deployments.get("faq")
    assert promoted.alias("production") == 1 and promoted.versions[1].state is VersionState.PROMOTED
    assert [d.job_id for d in promoted.versions[1].certificate.documents] == [job.id]

    served = DeploymentModels(
        deployments, KEYS, base=lambda: (model, tokenizer), fetch=lambda ref: adapters[ref.sha256]
    )
    limits = HttpLimits()
    app = build_app(
        api,
        Authenticator(None),
        limits=limits,
        extra_routes=serving_routes(served, Authenticator(None), limits),
    )
    http = start_http(app, "127.0.0.1:0", limits)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0)

        # The layer's gate opens for prompts naming at least two words of its document.
        question = "What does the harbour town of Zeta have?"

        def ask(name: str, content: str = question) -> str:
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": content}],
                max_tokens=12,
                temperature=0,
            )
            return reply.choices[0].message.content

        assert {"faq", "faq@0", "faq@1"} <= {m.id for m in client.models.list().data}
        adapted = ask("faq")
        base = ask("faq@0")
        assert adapted != base  # the promoted adapter changed what the model says
        # ... about its document only: a prompt its gate stays closed for gets the base's answer.
        assert ask("faq", "What does Zeta have?") == ask("faq@0", "What does Zeta have?")

        stream = client.chat.completions.create(
            model="faq",
            messages=[{"role": "user", "content": question}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == adapted

        api.rollback("faq", "production", 0)
        assert ask("faq") == base  # rolled back: the base's answer, no restart
        api.rollback("faq", "production", 1)
        assert ask("faq") == adapted

        # A second document on top: the certificate re-checks the first one too (a row of the matrix).
        job2, edit2, _ = _audited_job(jobs, handle, second, fp, title="Eta")
        v2 = api.promote("faq", job2.id, edit2.id)
        assert v2.parent == 1 and len(v2.layers) == 2
        handle(_certified(_certify(model, tokenizer, v2, adapters)))
        assert deployments.get("faq").alias("production") == 2
        assert [d.job_id for d in deployments.version("faq", 2).certificate.documents] == [job.id, job2.id]

        # A shadow version answers the same requests after the client has its answer; both are logged.
        api.rollback("faq", "production", 1)
        v3 = api.promote("faq", job2.id, edit2.id, alias="shadow")
        handle(_certified(_certify(model, tokenizer, v3, adapters)))
        assert deployments.get("faq").alias("shadow") == 3
        assert ask("faq") == adapted  # production (version 1) still answers the client
        log_key = deployments.plane.key("shadow-log")
        deadline = time.monotonic() + 30
        while not jobs.redis.xlen(log_key) and time.monotonic() < deadline:
            time.sleep(0.2)
        entry = json.loads(jobs.redis.xrange(log_key)[-1][1][b"entry"])
        assert entry["model"] == "faq" and entry["answer"] == adapted and "shadow_answer" in entry
        api.rollback("faq", "production", 2)

        with pytest.raises(openai.NotFoundError):
            ask("faq@9")
        # A version whose stored verdict was edited in Redis is never loaded.
        key = deployments.plane.key("deploy", "faq", "versions")
        raw = json.loads(jobs.redis.hget(key, "2"))
        raw["layers"][0]["verdict"]["reward"] = 5.0
        jobs.redis.hset(key, "2", json.dumps(raw))
        with pytest.raises(openai.APIStatusError):
            ask("faq")
    finally:
        http.stop()

    kinds = [e.kind for e in log.entries()]
    assert kinds.count("rollback") == 4 and kinds.count("promotion") >= 6
    assert log.verify().ok


def test_a_certificate_that_loses_earlier_knowledge_is_refused(
    registry, adapters, tiny_model_dir: Path
) -> None:
    jobs, deployments, api, handle, _ = registry
    fp = _fingerprint(tiny_model_dir)
    first, second = list(adapters)
    job, edit, _ = _audited_job(jobs, handle, first, fp)
    v1 = api.promote("faq", job.id, edit.id)
    cert1 = _cert(v1, {job.id: 1.0})
    deployments.certified(cert1)
    job2, edit2, _ = _audited_job(jobs, handle, second, fp, title="Eta")
    v2 = api.promote("faq", job2.id, edit2.id)
    done = deployments.certified(_cert(v2, {job.id: 0.0, job2.id: 1.0}))
    assert done.state is VersionState.REFUSED and done.refusal_code == "knowledge_lost"
    assert f"{job.id}/0 1.00 -> 0.00" in done.message
    assert deployments.get("faq").alias("production") == 1  # the last good version stays serving

    job3, edit3, _ = _audited_job(jobs, handle, second, fp, title="Theta")
    v3 = api.promote("faq", job3.id, edit3.id)
    forged = dataclasses.replace(_cert(v3, {job.id: 1.0, job3.id: 1.0}), fingerprint="0" * 64)
    assert deployments.certified(forged).refusal_code == "altered"
    job4, edit4, _ = _audited_job(jobs, handle, second, fp, title="Kappa")
    v4 = api.promote("faq", job4.id, edit4.id)
    other = dataclasses.replace(v4, fingerprint="1" * 64)
    assert deployments.certified(_cert(other, {job.id: 1.0, job4.id: 1.0})).refusal_code == "wrong_version"


def test_of_two_promotions_from_one_version_the_second_certified_is_refused_not_lost(
    registry, adapters, tiny_model_dir: Path
) -> None:
    """Both are built on production = v1; whichever is certified first serves, and the other would
    drop what it added, so it is refused with its own code instead of silently replacing it."""
    jobs, deployments, api, handle, log = registry
    fp = _fingerprint(tiny_model_dir)
    first, second = list(adapters)
    job, edit, _ = _audited_job(jobs, handle, first, fp)
    deployments.certified(_cert(api.promote("faq", job.id, edit.id), {job.id: 1.0}))
    job_b, edit_b, _ = _audited_job(jobs, handle, second, fp, title="Eta")
    # (certificates are signed by hand here, so the third adapter need not exist on disk)
    job_c, edit_c, _ = _audited_job(jobs, handle, "e" * 64, fp, title="Theta")
    v_b = api.promote("faq", job_b.id, edit_b.id)
    v_c = api.promote("faq", job_c.id, edit_c.id)
    assert (v_b.parent, v_c.parent) == (1, 1)
    won = deployments.certified(_cert(v_c, {job.id: 1.0, job_c.id: 1.0}))
    assert won.state is VersionState.PROMOTED and deployments.get("faq").alias("production") == v_c.version
    lost = deployments.certified(_cert(v_b, {job.id: 1.0, job_b.id: 1.0}))
    assert lost.state is VersionState.REFUSED and lost.refusal_code == "stale_parent"
    assert f"production moved from version 1 to {v_c.version}" in lost.message
    assert deployments.get("faq").alias("production") == v_c.version  # the winner still serves
    assert deployments.version("faq", v_b.version).refusal_code == "stale_parent"
    refusals = [e for e in log.entries() if e.kind == "promotion_refused"]
    assert refusals[-1].body["code"] == "stale_parent" and log.verify().ok
    # Promoted again, the adapter builds on the winner and keeps both documents.
    again = api.promote("faq", job_b.id, edit_b.id)
    assert again.parent == v_c.version and len(again.layers) == 3


def _cert(version, accuracies: dict[str, float]):  # noqa: ANN001, ANN202
    from seal.records import Certificate, DocumentAccuracy

    rows = tuple(
        DocumentAccuracy(
            layer.document.job_id, 0, layer.document.document_sha256, accuracies[layer.document.job_id]
        )
        for layer in version.layers
    )
    certificate = Certificate(
        deployment=version.deployment,
        version=version.version,
        fingerprint=version.fingerprint,
        base_fingerprint=version.base_fingerprint,
        adapter_sha256s=tuple(x.adapter.sha256 for x in version.layers),
        documents=rows,
        checks=("retention:pass", "kl_shift:pass"),
        passed=True,
    )
    return AUDITOR.sign_certificate(certificate)


@pytest.mark.parametrize("gate", [0, 2], ids=["ungated", "gated"])
def test_an_adapter_trained_to_forget_on_purpose_is_refused(
    registry, tiny_model_dir: Path, tmp_path: Path, gate: int
) -> None:
    """The auditor's real verdict on an update of repetitive nonsense at a high rate: it drifts from
    the base on general prompts, fails the KL check, and its promotion is refused. Gated, the adapter
    is judged on the prompts its gate opens for: its document is written from the auditor's general
    prompts, so the gate opens on them and the drift is there to be measured."""
    from auditor.core import audit, base_retention
    from auditor.retention import load_kl_prompts

    jobs, deployments, api, handle, _ = registry
    model, tokenizer = load_model(tiny_model_dir)
    fp = _fingerprint(tiny_model_dir)
    peft_model, _ = train_adapter(
        model,
        tokenizer,
        ["zq zq zq zq zq zq zq zq"] * 4,
        LoraSettings(rank=8, epochs=10, learning_rate=1e-2, schedule="constant"),
    )
    sha, path, _ = save_adapter(peft_model, tmp_path, {})
    peft_model.unload()
    everyday = dataclasses.replace(_doc("Zeta"), context=" ".join(load_kl_prompts()))
    spec = JobSpec(documents=(everyday,), n_self_edits=1, passage_control=False, lora=LoraSettings(gate=gate))
    job = jobs.create(spec)
    doc = job.spec.documents[0]
    edit = SelfEdit(
        id=f"{job.id}/0/0",
        job_id=job.id,
        doc_index=0,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=doc.passage(),
        text="zq zq",
        lines=("zq zq",),
        lora=LoraSettings(gate=gate),
        teacher_model="teacher",
    )
    adapter = AdapterRef(sha, edit.id, "tiny", fp, 1, 1.0, 1, 0.1, student_id="student-1")
    # The tiny model's distributions are nearly flat: the KL limit is scaled to it (see the unit test).
    retention = dataclasses.replace(base_retention(model, tokenizer), max_kl=1e-3)
    verdict = AUDITOR.sign(audit(model, tokenizer, doc, edit, path, sha, fp, job.id, retention=retention))
    handle(encode(Event(job_id=job.id, proposed=Proposed(doc_index=0, self_edits=(edit,)))))
    handle(encode(Event(job_id=job.id, trained=Trained(self_edit_id=edit.id, adapter=adapter))))
    handle(encode(Event(job_id=job.id, audited=Audited(self_edit_id=edit.id, verdict=verdict))))
    with pytest.raises(PromotionRefused) as refused:
        api.promote("faq", job.id, edit.id)
    assert refused.value.code == "failed_guardrail" and "kl_shift:fail" in refused.value.message
