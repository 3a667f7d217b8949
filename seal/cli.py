"""The `seal` command: serve one service, start a local stack, run the demo, submit and watch jobs."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from seal.config import SERVICE_KINDS, add_config_flags, load_config

DEFAULT_GATEWAY = "127.0.0.1:50051"
# kind -> module with serve(config); imported only for the service being started.
SERVICE_MODULES = {kind: f"{kind}.service" for kind in SERVICE_KINDS}


def cmd_serve(args: argparse.Namespace) -> int:
    from seal.logs import configure_logging

    config = load_config(args.kind, vars(args))
    configure_logging(args.kind)
    process = importlib.import_module(SERVICE_MODULES[args.kind]).serve(config)
    process.wait()
    return 0


def _stack(args: argparse.Namespace, supervise: bool = False):  # noqa: ANN202
    from seal.models import resolve_model
    from seal.stack import MAX_STUDENTS, LocalStack

    if args.retention_questions < 0:
        raise SystemExit(f"--retention-questions must be >= 0 (0: all), got {args.retention_questions}")
    if not 1 <= args.students <= MAX_STUDENTS:
        raise SystemExit(f"--students must be between 1 and {MAX_STUDENTS}, got {args.students}")
    print(f"model: {args.model} (fetching and caching it on first use)", flush=True)
    resolve_model(args.model)  # once here, rather than three services at a time
    if args.teacher_model:
        resolve_model(args.teacher_model)
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or os.environ.get("SEAL_REDIS_URL", "")
    print("starting redis (embedded unless REDIS_URL is set) and the four services…", flush=True)
    return LocalStack(
        gateway_listen=args.gateway_listen,
        http_listen=args.http_listen,
        model=args.model,
        teacher_model=args.teacher_model,
        data_dir=Path(args.data_dir),
        redis_url=redis_url,
        threads=args.threads,
        students=args.students,
        supervise=supervise,
        # 0 passes nothing, so the auditor's own setting (SEAL_RETENTION_QUESTIONS, else all) holds.
        extra_flags=(
            {"auditor": ["--retention-questions", str(args.retention_questions)]}
            if args.retention_questions
            else {}
        ),
        # Mutual TLS between the services, with a CA and certificates made once under the data dir.
        tls_dir=Path(args.data_dir) / "tls",
    ).start()


def _interrupt_once() -> None:
    """SIGTERM or SIGINT raises KeyboardInterrupt once; later ones are ignored while the stack drains."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def cmd_up(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="seal up: %(message)s")
    _interrupt_once()  # from here on, a signal stops whatever has started (start() cleans up)
    stack = _stack(args, supervise=True)
    try:
        addresses = {"redis": stack.redis_url, **stack.addresses, "http": stack.http_address}
        metrics = {f"{kind} metrics": address for kind, address in stack.metrics_addresses.items()}
        print(json.dumps({**addresses, **metrics}, indent=2))
        token_file = Path(args.data_dir) / "gateway" / "operator-token"
        print(f"logs in {Path(args.data_dir) / 'logs'}; Ctrl-C stops the stack", flush=True)
        print(f"API operator token in {token_file} (seal submit/status read it from there)", flush=True)
        while True:  # the supervisor restarts whatever dies
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the stack…", file=sys.stderr, flush=True)
        return 0
    finally:
        stack.stop()


def load_example(name: str = "demo.json") -> dict[str, Any]:
    return dict(json.loads(resources.files("seal.examples").joinpath(name).read_text()))


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.api import parse_job_spec
    from gateway.client import GatewayClient

    spec = parse_job_spec(json.loads(Path(args.file).read_text()) if args.file else load_example())
    started = time.monotonic()
    stack = None if args.gateway else _stack(args)
    try:
        token = _token(args) if args.gateway else stack.operator_token  # type: ignore[union-attr]
        tls = _client_tls(args) if args.gateway else stack.tls.get("client")  # type: ignore[union-attr]
        client = GatewayClient(args.gateway or stack.addresses["gateway"], token=token, tls=tls)  # type: ignore[union-attr]
        job = client.submit(spec)
        print(f"job {job.id}: {len(spec.documents)} passages × {spec.n_self_edits} self-edits", flush=True)
        job = watch_with_progress(client, job.id)
        print(render_table(job), flush=True)
        if stack is not None and job.state.value == "succeeded":
            from seal.deploy_cli import promote_and_ask

            # A deployment of its own per run: a rerun would otherwise stack the same documents' layers
            # again onto the last run's versions (which the knowledge check then refuses).
            deployment = f"demo-{job.id[:8]}"
            print("\n".join(promote_and_ask(client, job, stack.http_address, token, deployment)), flush=True)
        peaks = stack.peak_rss_mb() if stack is not None else {}
    finally:
        if stack is not None:
            stack.stop()
    if peaks:
        print("\npeak resident memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()))
    print(f"\nwall time: {time.monotonic() - started:.0f} s")
    return 0 if job.state.value == "succeeded" else 1


def watch_with_progress(client: Any, job_id: str) -> Any:
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    job = None
    for job in client.watch(job_id):
        p = job.progress
        totals = {"proposed": p.documents, "trained": p.self_edits, "audited": p.self_edits}
        if p.rounds:
            # A policy-training job: the stage bars follow the round under way.
            totals = {"round": p.rounds, **totals}
            if bars and "round" in bars and bars["round"].n != p.round:
                for stage in ("proposed", "trained", "audited"):
                    bars.pop(stage).close()
        for stage, total in totals.items():
            if stage not in bars:
                bars[stage] = tqdm(total=total, desc=f"{stage:>8}", unit="", leave=True)
            bars[stage].n = getattr(p, stage)
            bars[stage].refresh()
    for bar in bars.values():
        bar.close()
    return job


def render_table(job: Any) -> str:
    """Per passage: accuracy with no adaptation, after the passage alone, the mean over the sampled
    self-edits, and the best self-edit (chosen on the same questions: an oracle, labelled so), all on
    the selection questions; then the best one's accuracy on the held-out sign-off questions.
    A policy-training job shows its rounds instead."""
    lines = []
    if job.error:
        lines.append(f"job {job.id} {job.state.value}: {job.error}")
    if job.spec.policy_training is not None:
        return "\n".join(lines + render_rounds(job))
    header = (
        f"{'passage':<32} {'no adaptation':>14} {'passage only':>13} {'self-edits, mean':>17} "
        f"{'best (oracle)':>14} {'reward':>7} {'best: sign-off':>15}  checks of the best"
    )
    lines += ["", header, "-" * len(header)]
    for doc in job.documents:
        control = next((e for e in doc.edits if e.self_edit.format.value == "passage" and e.verdict), None)
        best = next((e for e in doc.edits if e.self_edit.id == doc.best_self_edit_id), None)
        sampled = [_adapted(e) for e in doc.edits if e.self_edit.index >= 0 and e.reward is not None]
        lines.append(
            f"{doc.title[:32]:<32} {_pct(doc.baseline_accuracy):>14} "
            f"{_pct(_adapted(control) if control else None):>13} "
            f"{_pct(_mean(sampled) if sampled else None):>17} "
            f"{_pct(_adapted(best) if best else None):>14} "
            f"{(f'{best.reward:+.2f}' if best else '-'):>7} {_signoff(best):>15}  {_guardrails(best)}"
        )
    lines += ["", *render_summary(job)]
    return "\n".join(lines)


def _adapted(edit: Any) -> float:
    """Adapted accuracy of a self-edit: the mean over its training runs (seeds)."""
    return _mean([r.verdict.adapted_accuracy for r in edit.runs() if r.verdict is not None])


def render_rounds(job: Any) -> list[str]:
    """A policy-training job's rounds: who wrote the self-edits, progress, mean reward, what was learnt."""
    p = job.progress
    lines = [
        "",
        f"policy training: round {p.round} of {p.rounds}, {len(job.spec.documents)} contexts, "
        f"N = {job.spec.n_self_edits}, seeds = {job.spec.seeds}, "
        f"{job.spec.policy_training.selection} / {job.spec.policy_training.policy.objective}",
    ]
    header = f"{'round':>5} {'sampled with':<14} {'contexts':>9} {'mean reward':>12} {'selected':>9}  trained version"
    lines += ["", header, "-" * len(header)]
    for r in job.rounds:
        trained = f"{r.trained.version[:12]} (loss {r.trained.final_loss:.3f})" if r.trained else "-"
        lines.append(
            f"{r.round:>5} {(r.policy_version[:12] or 'base'):<14} {f'{r.contexts_done}/{r.contexts}':>9} "
            f"{(f'{r.mean_reward:+.3f}' if r.mean_reward is not None else '-'):>12} {r.selected:>9}  {trained}"
        )
    if job.policy_version:
        lines += ["", f"latest policy version: {job.policy_version}"]
    return lines


def render_summary(job: Any) -> list[str]:
    """Mean seconds per stage and how often each guardrail failed, over every audited adapter."""
    edits = [e for doc in job.documents for e in doc.edits if e.verdict is not None]
    if not edits:
        return []
    sampled = [e.self_edit.generation_seconds for e in edits if e.self_edit.index >= 0]
    failures = {
        name: sum(name in e.verdict.failed_checks() for e in edits)
        for name in ("tau_leak", "retention", "kl_shift", "signoff")
    }
    judged = _judge_agreement(job)
    return judged + [
        f"per self-edit: generation {_mean(sampled):.1f} s, "
        f"training {_mean([e.adapter.train_seconds for e in edits]):.1f} s, "
        f"evaluation {_mean([e.verdict.eval_seconds for e in edits]):.1f} s (means over {len(edits)} adapters)",
        "guardrail failures: " + ", ".join(f"{name} {n}/{len(edits)}" for name, n in failures.items()),
    ]


def _judge_agreement(job: Any) -> list[str]:
    """How the LLM judge agreed with the deterministic grade, when the auditor had a judge."""
    from auditor.judge import agreement

    scores = [
        score
        for doc in job.documents
        for e in doc.edits
        for r in e.runs()
        if r.verdict is not None
        for score in (*r.verdict.baseline_scores, *r.verdict.adapted_scores)
    ]
    stats = agreement(scores)
    if stats["agreement"] is None:
        return []
    kappa = "undefined" if stats["kappa"] is None else f"{stats['kappa']:.2f}"
    model = next(
        (r.verdict.judge_model for d in job.documents for e in d.edits for r in e.runs() if r.verdict), ""
    )
    return [
        f"judge {model} agrees with the deterministic grade on {100 * stats['agreement']:.0f}% of {stats['judged']} answers (Cohen's kappa {kappa})"
    ]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _signoff(edit: Any) -> str:
    """The chosen self-edit's accuracy on the sign-off questions (never used to choose it): before -> after."""
    runs = [r.verdict for r in edit.runs() if r.verdict is not None] if edit is not None else []
    if not runs or not any(v.signoff_scores for v in runs):
        return "-"
    before, after = runs[0].signoff_baseline_accuracy, _mean([v.signoff_adapted_accuracy for v in runs])
    return f"{100 * before:.0f}% -> {100 * after:.0f}%"


def _guardrails(edit: Any) -> str:
    if edit is None:
        return "-"
    from seal.records import FORGETTING_UNCHECKED

    said = {FORGETTING_UNCHECKED: "reward only (no retention/KL)"}
    return ", ".join(said.get(name, f"{name} failed") for name in edit.verdict.failed_checks()) or "pass"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def cmd_submit(args: argparse.Namespace) -> int:
    from gateway.api import parse_job_spec
    from gateway.client import GatewayClient

    client = GatewayClient(args.gateway, token=_token(args), tls=_client_tls(args))
    job = client.submit(parse_job_spec(json.loads(Path(args.file).read_text())))
    print(job.id)
    if args.watch:
        job = watch_with_progress(client, job.id)
        print(render_table(job))
    return 0


# Where `seal up` (default data dir) keeps its operator token, so local commands need no flags.
LOCAL_TOKEN_FILE = Path(".seal") / "gateway" / "operator-token"


def _token(args: argparse.Namespace) -> str:
    """The gateway API token: --token, else $SEAL_API_TOKEN, else, for the local stack's gateway
    (`seal up` in this directory), its operator token, else none (an open gateway)."""
    if args.token or os.environ.get("SEAL_API_TOKEN"):
        return str(args.token or os.environ["SEAL_API_TOKEN"])
    local = _is_local_stack(args) and LOCAL_TOKEN_FILE.is_file()
    return LOCAL_TOKEN_FILE.read_text().strip() if local else ""


def _is_local_stack(args: argparse.Namespace) -> bool:
    """Whether the command talks to the gateway `seal up` serves: only then are .seal/'s token and
    client certificate meant for it."""
    return getattr(args, "gateway", None) == DEFAULT_GATEWAY


def _add_token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default="", help="gateway API bearer token (default: $SEAL_API_TOKEN)")


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.client import GatewayClient
    from seal.records import to_json

    job = GatewayClient(args.gateway, token=_token(args), tls=_client_tls(args)).get(args.job_id)
    print(to_json(job) if args.json else render_table(job))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Make (or read) an auditor signing key and list its public key in a trusted-keys file."""
    from seal.signing import VerdictSigner, trust_key

    signer = VerdictSigner.load_or_create(Path(args.key))
    if args.trust:
        trust_key(args.trust, signer.public_key_bytes())
    print(json.dumps({"key_id": signer.key_id, "key": args.key, "trusted_in": args.trust or None}))
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    """Add an API token for a subject and role to the gateway's token file; print the token once."""
    from gateway.auth import add_token

    print(add_token(args.file, args.subject, args.role))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from seal.models import model_fingerprint, resolve_model

    path = resolve_model(args.model)
    print(json.dumps({"model": args.model, "path": str(path), "fingerprint": model_fingerprint(path)}))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from seal.tls import LOCAL_SERVICES, make_local_pki, tls_env

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        raise ValueError("--hosts needs at least one host name or address, e.g. localhost,127.0.0.1")
    issued = make_local_pki(Path(args.out).resolve(), LOCAL_SERVICES, hosts)
    print(f"# CA and certificates for {', '.join(hosts)} in {Path(args.out).resolve()}")
    for name, tls in issued.items():
        print(f"\n# {name}")
        print("\n".join(f"{var}={value}" for var, value in tls_env(tls).items()))
    return 0


# Where `seal up` (default data dir) keeps its CA and the client certificate local commands use.
LOCAL_TLS_DIR = Path(".seal") / "tls"


def _client_tls(args: argparse.Namespace):  # noqa: ANN202
    """mTLS files for talking to a gateway: --tls-ca/--tls-cert/--tls-key, else $SEAL_TLS_*, else, for
    the local stack's gateway (`seal up` in this directory), its client certificate, else none."""
    from types import SimpleNamespace

    from seal.tls import TlsFiles, tls_files

    names = ("tls_ca", "tls_cert", "tls_key")
    given = {n: getattr(args, n) or os.environ.get(f"SEAL_{n.upper()}", "") for n in names}
    if any(given.values()) or not _is_local_stack(args):
        return tls_files(SimpleNamespace(**given))
    local = TlsFiles(LOCAL_TLS_DIR / "ca.pem", LOCAL_TLS_DIR / "client.pem", LOCAL_TLS_DIR / "client.key")
    return local if all(Path(p).is_file() for p in (local.ca, local.cert, local.key)) else None


def _add_tls_flags(parser: argparse.ArgumentParser) -> None:
    for name in ("ca", "cert", "key"):
        default = f"$SEAL_TLS_{name.upper()}"
        parser.add_argument(f"--tls-{name}", default="", help=f"mTLS {name} PEM file (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    from seal.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="seal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service (teacher, student, auditor or gateway)")
    serve.add_argument("kind", choices=SERVICE_KINDS)
    add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    for name, func, text in (
        ("up", cmd_up, "start a local stack until Ctrl-C"),
        ("demo", cmd_demo, "run the bundled example and print the table"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", default=DEFAULT_MODEL)
        p.add_argument(
            "--teacher-model",
            default="",
            help="the teacher's model, if not --model (the student's and auditor's)",
        )
        p.add_argument("--data-dir", default=".seal")
        p.add_argument("--redis-url", default="", help="use this Redis instead of an embedded one")
        p.add_argument("--threads", type=int, default=0, help="torch threads per model service")
        # The demo asks a third of the retention set per audit, to stay within its time on a 2-core
        # CPU: a coarser guardrail (one question is 1/32 of the accuracy); `seal up` asks all 104.
        p.add_argument(
            "--retention-questions",
            type=int,
            default=32 if name == "demo" else 0,
            help="retention questions per audit, the first N of 104 (0: all)",
        )
        # Two students in the demo: its updates are the longest stage, one per passage, and on a
        # 2-core CPU one student training alone left a core idle while the others waited for it.
        p.add_argument(
            "--students",
            type=int,
            default=2 if name == "demo" else 1,
            help="student processes taking apply tasks side by side (each its own data dir)",
        )
        p.set_defaults(func=func)
        # `seal up` serves on known ports (for `seal submit`); the demo takes free ones.
        p.add_argument(
            "--gateway-listen",
            default=DEFAULT_GATEWAY if name == "up" else "",
            help="gateway gRPC address (empty: a free port)",
        )
        p.add_argument(
            "--http-listen",
            default="127.0.0.1:8080" if name == "up" else "",
            help="gateway HTTP/JSON address (empty: a free port)",
        )
        if name == "demo":
            p.add_argument("--file", help="a job JSON instead of the bundled example")
            p.add_argument("--gateway", help="use a running gateway (host:port) instead of a local stack")
            _add_token_flag(p)
            _add_tls_flags(p)

    submit = sub.add_parser("submit", help="submit a job JSON to a gateway")
    submit.add_argument("file")
    submit.add_argument("--gateway", default=DEFAULT_GATEWAY)
    submit.add_argument("--watch", action="store_true")
    _add_token_flag(submit)
    _add_tls_flags(submit)
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="show a job")
    status.add_argument("job_id")
    status.add_argument("--gateway", default=DEFAULT_GATEWAY)
    status.add_argument("--json", action="store_true")
    _add_token_flag(status)
    _add_tls_flags(status)
    status.set_defaults(func=cmd_status)

    keys = sub.add_parser(
        "keys",
        help="make an auditor signing key (kept if it exists) and add its public key to a trusted-keys file",
    )
    keys.add_argument("key", help="the auditor's private key file (PEM; made with mode 0600 if missing)")
    keys.add_argument("--trust", default="", help="trusted-keys JSON file of the gateway to add it to")
    keys.set_defaults(func=cmd_keys)

    tokens = sub.add_parser(
        "tokens", help="add a gateway API token (its digest goes to the token file); print the token once"
    )
    tokens.add_argument("file", help="the gateway's --api-tokens file (made 0600 if missing)")
    tokens.add_argument("--subject", required=True, help="who holds the token (owns the jobs it submits)")
    tokens.add_argument("--role", choices=("submitter", "operator"), default="submitter")
    tokens.set_defaults(func=cmd_tokens)

    model = sub.add_parser("model", help="fetch and cache a model; print its path and fingerprint")
    model.add_argument("--model", default=DEFAULT_MODEL)
    model.set_defaults(func=cmd_model)

    certs = sub.add_parser("certs", help="make a CA and per-service mTLS certificates; print settings")
    certs.add_argument("--out", required=True, help="directory of ca.pem, <service>.pem/.key (kept)")
    certs.add_argument("--hosts", default="localhost,127.0.0.1", help="names/addresses, comma-separated")
    certs.set_defaults(func=cmd_certs)

    from seal.auditlog import add_parser as add_audit_parser
    from seal.deploy_cli import add_deployment_commands

    def registry_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway", default=DEFAULT_GATEWAY)
        _add_token_flag(p)
        _add_tls_flags(p)

    add_deployment_commands(sub, registry_flags)
    add_audit_parser(sub)

    from seal.bench.knowledge import add_bench_commands

    bench = sub.add_parser(
        "bench", help="benchmarks: the SEAL results table and the recipe study (resumable)"
    )
    bench_commands = bench.add_subparsers(dest="bench", required=True)
    add_bench_commands(bench_commands)
    from seal.bench.inner_loop import add_inner_loop_command

    add_inner_loop_command(bench_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "retention"]:
        # The retention study keeps its own command line (seal.bench.retention.build_parser).
        from seal.bench.retention import main as retention_main

        return retention_main(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:  # bad configuration: say what to fix, no traceback
        parser.exit(2, f"seal: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
