"""The registry of served models: deployments, their versions and aliases, promotion and rollback.

A deployment is a named line of models on one base. Version 0 is the base itself; every promotion
makes a new version that is its parent's layers plus one adapter, merged in order, and moves an alias
(`production`, `candidate` or `shadow`) to it once an auditor has certified it. `Rollback` moves an
alias to any earlier promoted version. Nothing is ever deleted, so every version keeps its lineage:
base fingerprint, each adapter's digest, self-edit text, teacher policy, scores and signed verdict.

Promotion, in order (each refusal is a PromotionRefused with its own code):
  1. the kill switch is off                                              kill_switch
  2. the job holds a verdict for this self-edit's run                    no_verdict
  3. the verdict verifies under a trusted key and names this job,        unknown_key, bad_signature,
     self-edit, questions, adapter and base, and has not expired          altered, wrong_*, expired
  4. it passed every guardrail, the sign-off included                    failed_guardrail
  5. enough distinct operators approved this adapter                     missing_approvals
  6. the version (parent + this adapter) is certified by an auditor: every document the deployment
     learned is re-checked on its sign-off questions, and retention     (asynchronously, on seal:certify)
     on the merged model; a refusal there is recorded on the version:    failed_guardrail,
                                                                         knowledge_lost
  7. production still is the version it was built on when it is certified  stale_parent
     (two promotions from one parent: the first certified wins, the other must be promoted again)
Redis keys (no TTL: the registry is permanent):
  deployments                       set of names
  deploy:<name>                     JSON {name, base_fingerprint, created_at}
  deploy:<name>:versions            hash version -> DeploymentVersion JSON
  deploy:<name>:aliases             hash alias -> version
  deploy:<name>:next                the last version number handed out
  approvals:<name>:<adapter>        hash operator -> approval JSON
  kill-switch                       JSON KillSwitch
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import redis

from gateway.events import NotRecordedYet, expected_for
from gateway.jobs import JobStore
from seal.digests import document_sha256
from seal.errors import FailedPrecondition, InvalidArgument, NotFound, Refused
from seal.gate import Gate, document_gate
from seal.records import (
    FORGETTING_UNCHECKED,
    Alias,
    Approval,
    Certificate,
    CertifyTask,
    Deployment,
    DeploymentVersion,
    Job,
    KillSwitch,
    Layer,
    LearnedDocument,
    VersionState,
    from_json,
    to_json,
)
from seal.signing import (
    TrustedKeys,
    VerdictRejected,
    check_verdict,
    layer_gate_sha256s,
    version_fingerprint,
)
from seal.tasks import encode
from seal.workplane import Task, WorkPlane

log = logging.getLogger(__name__)

ALIASES = ("production", "candidate", "shadow")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
"""Deployment names appear in model ids ("faq", "faq@3", "faq:shadow") and Redis keys."""

AuditHook = Callable[[str, str, str, dict[str, Any]], None]
"""(kind, actor, subject, body): where every registry change is written (the audit log)."""


_FINISH_ATTEMPTS = 20
"""Tries at finishing a version while other gateways write the same deployment's keys."""


class PromotionRefused(Refused):
    """A promotion the registry will not make; `code` names the check that refused it."""


def gate_fields(gate: Gate | None) -> dict[str, Any]:
    """A LearnedDocument's gate fields for `gate` (none: an ungated layer)."""
    return {"gate_words": gate.words, "gate_min_hits": gate.min_hits} if gate is not None else {}


def check_name(name: str) -> str:
    if name == "base":
        raise InvalidArgument("deployment", "'base' names the base model itself; choose another name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            "deployment",
            f"{name!r} is not a deployment name: 1-63 of a-z 0-9 _ -, starting with a letter or digit",
        )
    return name


def check_alias(alias: str) -> str:
    if alias not in ALIASES:
        raise InvalidArgument("alias", f"must be one of {', '.join(ALIASES)}, got {alias!r}")
    return alias


def knowledge_losses(before: Certificate | None, after: Certificate, max_drop: float) -> list[str]:
    """The earlier documents whose sign-off accuracy fell by more than `max_drop` from `before` (the
    parent version's certificate) to `after`; pure."""
    if before is None:
        return []
    now = {(d.job_id, d.doc_index): d.accuracy for d in after.documents}
    lost = []
    for doc in before.documents:
        acc = now.get((doc.job_id, doc.doc_index))
        if acc is None:
            lost.append(f"{doc.job_id}/{doc.doc_index} was not re-checked")
        elif doc.accuracy - acc > max_drop + 1e-9:
            lost.append(f"{doc.job_id}/{doc.doc_index} {doc.accuracy:.2f} -> {acc:.2f}")
    return lost


def certificate_problem(version: DeploymentVersion, certificate: Certificate) -> str:
    """Why `certificate` is not about `version` ("" when it names exactly this version and its documents)."""
    want_docs = {
        (layer.document.job_id, layer.document.doc_index, layer.document.document_sha256)
        for layer in version.layers
        if layer.document is not None
    }
    got_docs = {(d.job_id, d.doc_index, d.document_sha256) for d in certificate.documents}
    shas = [layer.adapter.sha256 for layer in version.layers if layer.adapter is not None]
    if version.layers and version.fingerprint != version_fingerprint(
        version.base_fingerprint, shas, layer_gate_sha256s(version.layers)
    ):
        return "the version's fingerprint is not that of its layers and gates (an edited record?)"
    checks = (
        ("deployment", certificate.deployment, version.deployment),
        ("version", certificate.version, version.version),
        ("fingerprint", certificate.fingerprint, version.fingerprint),
        ("base_fingerprint", certificate.base_fingerprint, version.base_fingerprint),
        (
            "adapter_sha256s",
            list(certificate.adapter_sha256s),
            [layer.adapter.sha256 for layer in version.layers if layer.adapter is not None],
        ),
        ("documents", sorted(got_docs), sorted(want_docs)),
    )
    for name, got, want in checks:
        if got != want:
            return f"certificate names {name} {got!r}, the version has {want!r}"
    return ""


class DeploymentStore:
    def __init__(
        self,
        plane: WorkPlane,
        jobs: JobStore,
        keys: TrustedKeys,
        required_approvals: int = 0,
        max_knowledge_drop: float = 0.25,
        audit: AuditHook | None = None,
    ) -> None:
        self.plane = plane
        self.redis = plane.redis
        self.jobs = jobs
        self.keys = keys
        self.required_approvals = required_approvals
        self.max_knowledge_drop = max_knowledge_drop
        self._audit = audit

    def _k(self, *parts: str) -> str:
        return self.plane.key(*parts)

    def audit(self, kind: str, actor: str, subject: str, body: dict[str, Any]) -> None:
        if self._audit is not None:
            self._audit(kind, actor, subject, body)

    # --- kill switch ---------------------------------------------------------------------------

    def kill_switch(self) -> KillSwitch:
        raw = self.redis.get(self._k("kill-switch"))
        return KillSwitch() if raw is None else from_json(KillSwitch, raw)

    def set_kill_switch(self, on: bool, reason: str, actor: str) -> KillSwitch:
        if on and not reason.strip():
            raise InvalidArgument(
                "reason", "say why the kill switch is turned on; operators read it in every health check"
            )
        state = KillSwitch(on=on, reason=reason, actor=actor, changed_at=time.time())
        self.redis.set(self._k("kill-switch"), to_json(state))
        self.audit("kill_switch", actor, "kill-switch", {"on": on, "reason": reason})
        return state

    # --- reading -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        members: set[bytes] = self.redis.smembers(self._k("deployments"))  # type: ignore[assignment]
        return sorted(m.decode() for m in members)

    def get(self, name: str) -> Deployment:
        check_name(name)
        raw = self.redis.get(self._k("deploy", name))
        if raw is None:
            raise NotFound(f"no deployment {name!r}; `seal deployments` lists them")
        meta = json.loads(raw)
        versions = sorted(
            (from_json(DeploymentVersion, v) for v in self.redis.hvals(self._k("deploy", name, "versions"))),
            key=lambda v: v.version,
        )
        aliases = self.redis.hgetall(self._k("deploy", name, "aliases"))
        return Deployment(
            name=name,
            base_fingerprint=meta["base_fingerprint"],
            aliases=tuple(
                sorted(
                    (Alias(k.decode(), int(v)) for k, v in aliases.items()),
                    key=lambda a: ALIASES.index(a.name),
                )
            ),
            versions=tuple(versions),
            created_at=meta["created_at"],
        )

    def list(self) -> list[Deployment]:
        return [self.get(name) for name in self.names()]

    def version(self, name: str, number: int) -> DeploymentVersion:
        raw = self.redis.hget(self._k("deploy", check_name(name), "versions"), str(number))
        if raw is None:
            self.get(name)  # NotFound for the deployment first
            raise NotFound(f"deployment {name!r} has no version {number}")
        return from_json(DeploymentVersion, raw)

    def resolve(self, name: str, alias: str = "production") -> DeploymentVersion:
        """The version an alias points at; NotFound when the deployment or the alias does not exist."""
        number = self.redis.hget(self._k("deploy", check_name(name), "aliases"), check_alias(alias))
        if number is None:
            self.get(name)
            raise NotFound(f"deployment {name!r} has no {alias} version")
        return self.version(name, int(number))

    # --- approvals -----------------------------------------------------------------------------

    def approve(self, name: str, adapter_sha256: str, approver: str, comment: str = "") -> Approval:
        check_name(name)
        if not re.fullmatch(r"[0-9a-f]{64}", adapter_sha256 or ""):
            raise InvalidArgument("adapter_sha256", "must be the adapter's 64-hex manifest digest")
        now = time.time()
        key = self._k("approvals", name, adapter_sha256)
        self.redis.hsetnx(key, approver, json.dumps({"at": now, "comment": comment}))
        self.audit(
            "approval", approver, f"deployment:{name}", {"adapter_sha256": adapter_sha256, "comment": comment}
        )
        return Approval(
            deployment=name,
            adapter_sha256=adapter_sha256,
            approver=approver,
            approved_at=now,
            approvers=tuple(self.approvers(name, adapter_sha256)),
            required=self.required_approvals,
        )

    def approvers(self, name: str, adapter_sha256: str) -> list[str]:
        return sorted(k.decode() for k in self.redis.hkeys(self._k("approvals", name, adapter_sha256)))

    # --- promotion -----------------------------------------------------------------------------

    def promote(
        self, name: str, job_id: str, self_edit_id: str, run: int, alias: str, actor: str
    ) -> DeploymentVersion:
        """Check the adapter's verdict and approvals, then open a new version for certification."""
        check_name(name)
        check_alias(alias or "production")
        alias = alias or "production"
        request = {"job_id": job_id, "self_edit_id": self_edit_id, "run": run, "alias": alias}
        try:
            return self._promote(name, job_id, self_edit_id, run, alias, actor)
        except PromotionRefused as exc:
            self.audit(
                "promotion_refused",
                actor,
                f"deployment:{name}",
                {**request, "code": exc.code, "reason": exc.message},
            )
            raise

    def _promote(
        self, name: str, job_id: str, self_edit_id: str, run: int, alias: str, actor: str
    ) -> DeploymentVersion:
        switch = self.kill_switch()
        if switch.on:
            raise PromotionRefused(
                "kill_switch", f"the kill switch is on ({switch.reason}, by {switch.actor or 'anonymous'})"
            )
        job = self.jobs.get(job_id)
        edit = next((e for d in job.documents for e in d.edits if e.self_edit.id == self_edit_id), None)
        if edit is None:
            raise NotFound(f"job {job_id} has no self-edit {self_edit_id!r}")
        seed_run = next((r for r in edit.runs() if r.run == run), None)
        if seed_run is None or seed_run.verdict is None or seed_run.adapter is None:
            raise PromotionRefused(
                "no_verdict", f"run {run} of self-edit {self_edit_id} has no verdict from an auditor (yet)"
            )
        verdict, adapter = seed_run.verdict, seed_run.adapter
        try:
            check_verdict(verdict, self.keys, expected_for(job, self_edit_id, run))
        except VerdictRejected as exc:
            raise PromotionRefused(exc.code, str(exc).split(": ", 1)[-1]) from None
        except NotRecordedYet as exc:
            raise PromotionRefused("no_verdict", str(exc)) from None
        failed = [c for c in verdict.checks if ":fail" in c]
        if FORGETTING_UNCHECKED in verdict.failed_checks():
            raise PromotionRefused(
                "failed_guardrail",
                f"the verdict of self-edit {self_edit_id} is a policy-training round's reward-only audit: "
                "retention and KL were never measured; promote an adapter of an ordinary job",
            )
        if not verdict.passed or failed:
            why = "; ".join(failed) if failed else f"reward {verdict.reward:+.3f} is not above 0"
            raise PromotionRefused("failed_guardrail", f"the verdict did not pass: {why}")
        doc = job.spec.documents[edit.self_edit.doc_index]
        if not doc.signoff_questions:
            raise PromotionRefused(
                "failed_guardrail",
                "the job kept no sign-off questions (signoff_fraction 0): nothing signs it off",
            )
        approvers = self.approvers(name, adapter.sha256)
        if len(approvers) < self.required_approvals:
            raise PromotionRefused(
                "missing_approvals",
                f"{len(approvers)} of {self.required_approvals} operator approvals for adapter "
                f"{adapter.sha256[:12]}… (`seal approve {name} {adapter.sha256}`)",
            )
        deployment = self._ensure(name, adapter.base_fingerprint)
        if deployment.base_fingerprint != adapter.base_fingerprint:
            raise PromotionRefused(
                "wrong_base",
                f"deployment {name} serves base {deployment.base_fingerprint[:16]}…, the adapter was trained on "
                f"{adapter.base_fingerprint[:16]}…",
            )
        parent = self.resolve(name, "production")
        if any(
            layer.adapter is not None and layer.adapter.sha256 == adapter.sha256 for layer in parent.layers
        ):
            raise InvalidArgument(
                "self_edit_id", f"adapter {adapter.sha256[:12]}… is already in version {parent.version}"
            )
        learned = LearnedDocument(
            job_id=job.id,
            doc_index=edit.self_edit.doc_index,
            title=doc.title,
            document_sha256=document_sha256(doc),
            signoff_questions=doc.signoff_questions,
            # The gate the verdict was judged behind: the same document, the self-edit's own setting.
            **gate_fields(document_gate(doc.title, doc.context, edit.self_edit.lora.gate)),
        )
        layer = Layer(
            adapter=adapter,
            verdict=verdict,
            self_edit_text=edit.self_edit.text,
            policy_version=edit.self_edit.policy_version,
            document=learned,
        )
        layers = (*parent.layers, layer)
        number = int(self.redis.incr(self._k("deploy", name, "next")))
        version = DeploymentVersion(
            deployment=name,
            version=number,
            parent=parent.version,
            fingerprint=version_fingerprint(
                deployment.base_fingerprint,
                [x.adapter.sha256 for x in layers if x.adapter],
                layer_gate_sha256s(layers),
            ),
            base_fingerprint=deployment.base_fingerprint,
            layers=layers,
            state=VersionState.CERTIFYING,
            promoted_by=actor,
            created_at=time.time(),
            alias=alias,
            approvers=tuple(approvers),
        )
        task = CertifyTask(
            deployment=name,
            version=number,
            fingerprint=version.fingerprint,
            base_fingerprint=version.base_fingerprint,
            layers=tuple(x.adapter for x in layers if x.adapter is not None),
            documents=tuple(x.document for x in layers if x.document is not None),
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._k("deploy", name, "versions"), str(number), to_json(version))
        self.plane.enqueue(Task("certify", f"{name}/{number}", encode(task)), pipeline=pipe)
        pipe.execute()
        self.audit(
            "promotion",
            actor,
            f"deployment:{name}@{number}",
            {
                "state": "certifying",
                "job_id": job.id,
                "self_edit_id": self_edit_id,
                "run": run,
                "adapter_sha256": adapter.sha256,
                "verdict_signature": verdict.signature,
                "parent": parent.version,
                "alias": alias,
                "approvers": approvers,
            },
        )
        return version

    def _ensure(self, name: str, base_fingerprint: str) -> Deployment:
        """The deployment, created on its first promotion with version 0 (the base) as production."""
        meta = json.dumps({"name": name, "base_fingerprint": base_fingerprint, "created_at": time.time()})
        if self.redis.set(self._k("deploy", name), meta, nx=True):
            base = DeploymentVersion(
                deployment=name,
                version=0,
                fingerprint=version_fingerprint(base_fingerprint, []),
                base_fingerprint=base_fingerprint,
                state=VersionState.PROMOTED,
                created_at=time.time(),
            )
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(self._k("deploy", name, "versions"), "0", to_json(base))
            pipe.hsetnx(self._k("deploy", name, "aliases"), "production", 0)
            pipe.sadd(self._k("deployments"), name)
            pipe.execute()
        return self.get(name)

    def certified(self, certificate: Certificate) -> DeploymentVersion | None:
        """Finish a certifying version with the auditor's certificate: promote it and move its alias,
        or refuse it with the reason. A second certificate for a finished version changes nothing."""
        version = self.version(certificate.deployment, certificate.version)
        if version.state is not VersionState.CERTIFYING:
            log.warning("certificate for a finished version ignored", extra={"version": version.version})
            return None
        try:
            self._check_certificate(version, certificate)
        except PromotionRefused as exc:
            return self._finish(version, VersionState.REFUSED, certificate, exc.code, exc.message)
        return self._finish(version, VersionState.PROMOTED, certificate, "", "")

    def _check_certificate(self, version: DeploymentVersion, certificate: Certificate) -> None:
        try:
            statement = self.keys.verify_certificate(certificate)
        except VerdictRejected as exc:
            raise PromotionRefused(exc.code, str(exc).split(": ", 1)[-1]) from None
        problem = certificate_problem(version, certificate)
        if problem:
            raise PromotionRefused("wrong_version", problem)
        if time.time() > statement.expires_at:
            raise PromotionRefused("expired", f"certificate expired at {statement.expires_at:.0f}")
        failed = [c for c in certificate.checks if ":fail" in c]
        if failed or not certificate.passed:
            raise PromotionRefused("failed_guardrail", "the merged model failed: " + "; ".join(failed))
        parent = self.version(version.deployment, version.parent)
        lost = knowledge_losses(parent.certificate, certificate, self.max_knowledge_drop)
        if lost:
            raise PromotionRefused(
                "knowledge_lost",
                f"earlier documents' sign-off accuracy fell by more than {self.max_knowledge_drop:.2f}: "
                + "; ".join(lost),
            )
        switch = self.kill_switch()
        if switch.on:
            raise PromotionRefused(
                "kill_switch", f"the kill switch went on during certification ({switch.reason})"
            )

    def _finish(
        self,
        version: DeploymentVersion,
        state: VersionState,
        certificate: Certificate,
        code: str,
        message: str,
    ) -> DeploymentVersion:
        done = dataclasses.replace(
            version,
            state=state,
            certificate=certificate,
            refusal_code=code,
            message=message,
            finished_at=time.time(),
        )
        key = self._k("deploy", version.deployment, "versions")
        aliases = self._k("deploy", version.deployment, "aliases")
        # Both keys are watched: a version or alias written by another gateway between the reads
        # and the write makes the transaction fail, and the whole check runs again on fresh state.
        for _ in range(_FINISH_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key, aliases)
                    current = pipe.hget(key, str(version.version))
                    if (
                        current is None
                        or from_json(DeploymentVersion, current).state is not VersionState.CERTIFYING
                    ):
                        return None  # type: ignore[return-value]  # another gateway finished it first
                    production = pipe.hget(aliases, "production")
                    if (
                        state is VersionState.PROMOTED
                        and production is not None
                        and int(production) != version.parent
                    ):
                        # Two promotions built on the same production version: the second to be
                        # certified would drop what the first added (its layers are parent + one).
                        # A rollback meanwhile is refused the same way: N is not built on production.
                        state, code = VersionState.REFUSED, "stale_parent"
                        message = (
                            f"production moved from version {version.parent} to {int(production)} "
                            f"while version {version.version} was certifying, and version "
                            f"{version.version} is built on {version.parent}: promote the adapter "
                            f"again to build on {int(production)}"
                        )
                        done = dataclasses.replace(done, state=state, refusal_code=code, message=message)
                    pipe.multi()
                    pipe.hset(key, str(version.version), to_json(done))
                    if state is VersionState.PROMOTED:
                        pipe.hset(aliases, version.alias, version.version)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        else:
            raise redis.WatchError(f"version {version.version} of {version.deployment}: registry busy")
        subject = f"deployment:{version.deployment}@{version.version}"
        body = {
            "state": state.value,
            "alias": version.alias,
            "fingerprint": version.fingerprint,
            "certificate_signature": certificate.signature,
        }
        if code:
            body.update(code=code, reason=message)
        self.audit(
            "promotion" if state is VersionState.PROMOTED else "promotion_refused",
            "auditor:" + certificate.auditor_key_id,
            subject,
            body,
        )
        return done

    def fail_certification(self, name: str, number: int, reason: str) -> None:
        """A certification task that could not be done (dead-lettered): the version is refused with why."""
        try:
            version = self.version(name, number)
        except NotFound:
            return
        if version.state is VersionState.CERTIFYING:
            self._finish(version, VersionState.REFUSED, Certificate(), "certification_failed", reason)

    # --- rollback ------------------------------------------------------------------------------

    def rollback(self, name: str, alias: str, number: int, actor: str) -> Deployment:
        """Point `alias` at an earlier promoted version (the base is version 0); nothing restarts."""
        check_alias(alias or "production")
        alias = alias or "production"
        version = self.version(name, number)
        if version.state is not VersionState.PROMOTED:
            raise FailedPrecondition(
                f"version {number} of {name} was {version.state.value}"
                f"{' (' + version.refusal_code + ')' if version.refusal_code else ''}; only promoted versions can serve"
            )
        current = self.redis.hget(self._k("deploy", name, "aliases"), alias)
        self.redis.hset(self._k("deploy", name, "aliases"), alias, number)
        self.audit(
            "rollback",
            actor,
            f"deployment:{name}",
            {"alias": alias, "from": None if current is None else int(current), "to": number},
        )
        return self.get(name)

    def job_of(self, job_id: str) -> Job:
        return self.jobs.get(job_id)
