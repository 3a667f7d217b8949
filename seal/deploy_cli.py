"""`seal promote / approve / rollback / deployments / kill-switch`: the registry from the command line.

All of them talk to the gateway's gRPC API with the same token and TLS flags as `seal submit`; a refusal
prints its code and reason and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc

from seal.records import Deployment, DeploymentVersion, Job, VersionState


def _client(args: argparse.Namespace) -> Any:
    from gateway.client import GatewayClient
    from seal.cli import _client_tls, _token

    return GatewayClient(args.gateway, token=_token(args), tls=_client_tls(args))


def _refused(exc: grpc.RpcError) -> int:
    print(f"refused ({exc.code().name}): {exc.details()}", file=sys.stderr)
    return 1


def best_self_edit(job: Job, doc_index: int | None) -> str:
    """The self-edit a promotion takes by default: the best (by reward on the selection questions) of
    the one document, or of `doc_index`."""
    if doc_index is None:
        if len(job.documents) != 1:
            raise ValueError(f"job {job.id} has {len(job.documents)} documents: name one with --doc")
        doc_index = 0
    doc = next((d for d in job.documents if d.doc_index == doc_index), None)
    if doc is None or not doc.best_self_edit_id:
        raise ValueError(f"job {job.id} has no best self-edit for document {doc_index} (is it finished?)")
    return doc.best_self_edit_id


def wait_certified(client: Any, name: str, number: int, timeout_s: float) -> DeploymentVersion:
    deadline = time.monotonic() + timeout_s
    while True:
        version = next(v for v in client.get_deployment(name).versions if v.version == number)
        if version.state is not VersionState.CERTIFYING or time.monotonic() > deadline:
            return version
        time.sleep(1.0)


def cmd_promote(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        self_edit_id = args.self_edit or best_self_edit(client.get(args.job_id), args.doc)
        version = client.promote(args.deployment, args.job_id, self_edit_id, args.run, args.alias)
    except grpc.RpcError as exc:
        return _refused(exc)
    print(
        f"{args.deployment}@{version.version}: certifying {self_edit_id} on top of version {version.parent}"
    )
    if args.no_wait:
        return 0
    version = wait_certified(client, args.deployment, version.version, args.timeout_s)
    print(render_version(version))
    return 0 if version.state is VersionState.PROMOTED else 1


def cmd_approve(args: argparse.Namespace) -> int:
    try:
        approval = _client(args).approve(args.deployment, args.adapter_sha256, args.comment)
    except grpc.RpcError as exc:
        return _refused(exc)
    print(
        f"approved by {approval.approver}: {len(approval.approvers)} of {approval.required} approvals "
        f"({', '.join(approval.approvers)})"
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    try:
        deployment = _client(args).rollback(args.deployment, args.version, args.alias)
    except grpc.RpcError as exc:
        return _refused(exc)
    print(f"{deployment.name}: {args.alias} -> version {deployment.alias(args.alias)}")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if args.name:
            print(render_deployment(client.get_deployment(args.name)))
        else:
            for d in client.list_deployments():
                aliases = ", ".join(f"{a.name} v{a.version}" for a in d.aliases)
                print(f"{d.name:<24} {len(d.versions) - 1:>3} version(s)  {aliases}")
    except grpc.RpcError as exc:
        return _refused(exc)
    return 0


def cmd_kill_switch(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        if args.state == "status":
            state = client.get_kill_switch()
        else:
            state = client.set_kill_switch(args.state == "on", " ".join(args.reason))
    except grpc.RpcError as exc:
        return _refused(exc)
    print(
        f"kill switch {'ON' if state.on else 'off'}"
        + (f": {state.reason} ({state.actor})" if state.on else "")
    )
    return 0


def render_version(v: DeploymentVersion) -> str:
    layer = v.layers[-1] if v.layers else None
    lines = [f"version {v.version} ({v.state.value}{', ' + v.refusal_code if v.refusal_code else ''})"]
    if v.message:
        lines.append(f"  reason: {v.message}")
    if layer is not None and layer.verdict is not None and layer.adapter is not None:
        verdict = layer.verdict
        lines.append(
            f"  adapter {layer.adapter.sha256[:16]}… from {verdict.job_id} {verdict.self_edit_id}; "
            f"reward {verdict.reward:+.2f}, sign-off {verdict.signoff_baseline_accuracy:.0%} -> "
            f"{verdict.signoff_adapted_accuracy:.0%}; teacher {verdict.teacher_model or '-'}"
        )
    if v.certificate is not None and v.certificate.signature:
        c = v.certificate
        lines.append(
            f"  certified by {c.auditor_key_id}: retention {c.retention_baseline:.0%} -> {c.retention_accuracy:.0%}, "
            f"KL {c.kl_shift:.4f}; "
            + ", ".join(f"{d.job_id}/{d.doc_index} {d.accuracy:.0%}" for d in c.documents)
        )
    return "\n".join(lines)


def render_deployment(d: Deployment) -> str:
    """The deployment's versions and its continual-learning matrix: rows are versions, columns the
    documents learned, cells the sign-off accuracy each version's certificate measured."""
    docs: list[tuple[str, int, str]] = []
    for v in d.versions:
        for layer in v.layers:
            if layer.document is not None:
                key = (layer.document.job_id, layer.document.doc_index, layer.document.title)
                if key not in docs:
                    docs.append(key)
    aliases = {a.version: a.name for a in d.aliases}
    lines = [f"deployment {d.name} on base {d.base_fingerprint[:16]}…", ""]
    header = f"{'version':>7} {'state':<10} {'alias':<10} " + " ".join(f"{t[:12]:>12}" for _, _, t in docs)
    lines += [header + "  retention   KL", "-" * (len(header) + 18)]
    for v in d.versions:
        cells = {
            (c.job_id, c.doc_index): c.accuracy for c in (v.certificate.documents if v.certificate else ())
        }
        row = " ".join(f"{(f'{cells[(j, i)]:.0%}' if (j, i) in cells else '-'):>12}" for j, i, _ in docs)
        c = v.certificate
        tail = f"  {c.retention_accuracy:>8.0%} {c.kl_shift:>6.3f}" if c is not None and c.signature else ""
        # The state alone: a refusal's code and message follow the table in full.
        lines.append(f"{v.version:>7} {v.state.value:<10} {aliases.get(v.version, ''):<10} {row}{tail}")
    # Where each layer applies (seal.gate): what a prompt must name for the layer to answer it.
    seen: set[str] = set()
    for v in d.versions:
        for layer in v.layers:
            if layer.adapter is None or layer.adapter.sha256 in seen:
                continue
            seen.add(layer.adapter.sha256)
            doc = layer.document
            where = (
                f"prompts naming >= {doc.gate_min_hits} of its document's {len(doc.gate_words)} words"
                if doc is not None and doc.gate_min_hits
                else "every prompt (ungated)"
            )
            title = doc.title[:40] if doc is not None else "?"
            lines.append(f"layer {title} (adapter {layer.adapter.sha256[:12]}…): applies to {where}")
    refused = [v for v in d.versions if v.refusal_code]
    lines += [f"version {v.version} refused: {v.refusal_code}: {v.message}" for v in refused]
    return "\n".join(lines)


def add_deployment_commands(sub: Any, add_common: Any) -> None:
    """The registry's subcommands; `add_common(parser)` adds --gateway, --token and the TLS flags."""
    promote = sub.add_parser("promote", help="promote a job's adapter to the next version of a deployment")
    promote.add_argument("deployment")
    promote.add_argument("job_id")
    promote.add_argument("self_edit", nargs="?", default="", help="default: the job's best self-edit")
    promote.add_argument("--doc", type=int, default=None, help="which document's best self-edit")
    promote.add_argument("--run", type=int, default=0, help="which training run (seed) of the self-edit")
    promote.add_argument("--alias", default="production", choices=("production", "candidate", "shadow"))
    promote.add_argument("--no-wait", action="store_true", help="do not wait for the certification")
    promote.add_argument("--timeout-s", type=float, default=600.0)
    add_common(promote)
    promote.set_defaults(func=cmd_promote)

    approve = sub.add_parser("approve", help="approve an adapter for a deployment (as this operator)")
    approve.add_argument("deployment")
    approve.add_argument("adapter_sha256")
    approve.add_argument("--comment", default="")
    add_common(approve)
    approve.set_defaults(func=cmd_approve)

    rollback = sub.add_parser("rollback", help="point an alias at an earlier version (0 is the base)")
    rollback.add_argument("deployment")
    rollback.add_argument("version", type=int)
    rollback.add_argument("--alias", default="production", choices=("production", "candidate", "shadow"))
    add_common(rollback)
    rollback.set_defaults(func=cmd_rollback)

    deployments = sub.add_parser("deployments", help="list deployments, or show one with its matrix")
    deployments.add_argument(
        "name", nargs="?", default="", help="show this deployment ('show' NAME works too)"
    )
    deployments.add_argument("more", nargs="?", default="", help=argparse.SUPPRESS)
    add_common(deployments)
    deployments.set_defaults(func=_deployments_entry)

    switch = sub.add_parser(
        "kill-switch", help="stop (on REASON) or resume (off) all adaptation and promotion"
    )
    switch.add_argument("state", choices=("on", "off", "status"))
    switch.add_argument("reason", nargs="*")
    add_common(switch)
    switch.set_defaults(func=cmd_kill_switch)


def _deployments_entry(args: argparse.Namespace) -> int:
    if args.name == "show":  # `seal deployments show NAME`
        args.name = args.more
        if not args.name:
            raise ValueError("seal deployments show NAME: name the deployment")
    return cmd_deployments(args)


GENERAL_QUESTION = "What is the tallest mountain on Earth?"


def promote_and_ask(
    client: Any, job: Job, http_address: str, token: str, deployment: str = "demo", timeout_s: float = 600.0
) -> list[str]:
    """The end of `seal demo`: promote, document by document, the best sampled self-edit whose verdict
    passed sign-off and every guardrail; show the continual-learning matrix; then ask the served model
    a sign-off question of a promoted document through the OpenAI API (base answer beside it)."""
    import openai

    lines = ["", f"promotion to deployment {deployment!r} (held-out sign-off questions gate it):"]
    promoted = []
    for doc in job.documents:
        sampled = [
            e for e in doc.edits if e.self_edit.index >= 0 and e.verdict is not None and e.reward is not None
        ]
        passed = [e for e in sampled if e.verdict is not None and e.verdict.passed]
        if not passed:
            if sampled:  # ask anyway for the best one: the demo shows the gate's refusal and its code
                best = max(sampled, key=lambda e: e.reward or 0.0)
                try:
                    client.promote(deployment, job.id, best.self_edit.id)
                except grpc.RpcError as exc:
                    lines.append(f"  {doc.title[:40]}: {best.self_edit.id} refused: {exc.details()}")
            continue
        best = max(passed, key=lambda e: e.reward or 0.0)
        try:
            version = client.promote(deployment, job.id, best.self_edit.id)
        except grpc.RpcError as exc:
            lines.append(f"  {doc.title[:40]}: refused: {exc.details()}")
            continue
        version = wait_certified(client, deployment, version.version, timeout_s)
        verdict = best.verdict
        assert verdict is not None  # chosen among passed verdicts
        outcome = version.state.value + (
            f" ({version.refusal_code}: {version.message})" if version.refusal_code else ""
        )
        lines.append(
            f"  {doc.title[:40]}: {best.self_edit.id} sign-off {verdict.signoff_baseline_accuracy:.0%} -> "
            f"{verdict.signoff_adapted_accuracy:.0%} -> version {version.version} {outcome}"
        )
        if version.state is VersionState.PROMOTED:
            promoted.append((doc, verdict))
    if promoted:
        lines += ["", render_deployment(client.get_deployment(deployment))]
    else:
        lines += ["", "nothing was promoted: the model asked below is the base (model 'base')"]
    last = promoted[-1][0] if promoted else list(job.documents)[-1]
    spec_doc = job.spec.documents[last.doc_index]
    # The sign-off question the promoted adapter's verdict scored right, if any: the served model should
    # give the answer the auditor saw (greedy, the same prompt).
    right = [s.question for s in (promoted[-1][1].signoff_scores if promoted else ()) if s.correct]
    qa = next((q for q in spec_doc.signoff_questions if q.question in right), spec_doc.signoff_questions[0])
    why = "the promoted verdict scored it right" if right else "the first"
    api = openai.OpenAI(
        base_url=f"http://{http_address}/v1", api_key=token or "none", max_retries=2, timeout=300
    )

    def ask(model: str, content: str = f"Topic: {spec_doc.title}\n{qa.question}") -> str:
        reply = api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=48,
            temperature=0,
        )
        return (reply.choices[0].message.content or "").strip()

    lines += [
        "",
        f"asked through the OpenAI API (POST http://{http_address}/v1/chat/completions):",
        f"  Q: {qa.question}   (sign-off question, {why}; gold: {qa.answer})",
        *([f"  model {deployment!r} (production): {ask(deployment)}"] if promoted else []),
        f"  model 'base' (no adaptation): {ask('base')}",
    ]
    if promoted:
        # A prompt no layer's gate opens for (seal.gate) is answered by the base weights, exactly.
        lines += [
            f"  Q: {GENERAL_QUESTION}   (general; no document's gate opens)",
            f"  model {deployment!r} (production): {ask(deployment, GENERAL_QUESTION)}",
            f"  model 'base' (no adaptation): {ask('base', GENERAL_QUESTION)}",
        ]
    return lines
