"""Bearer tokens with roles for the gateway's public API (HTTP and gRPC).

The token file (config `api_tokens`) holds only sha256 digests, never a token in clear:
    {"tokens": [{"sha256": "<hex sha256 of the token>", "subject": "alice", "role": "submitter"}]}
A submitter submits jobs and sees only its own; an operator sees and does everything. With no token
file the API is open (local use): every caller is an anonymous operator.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc

from seal.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

SUBJECT_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
"""Subjects name Redis keys (the per-owner job index), so they keep to a safe alphabet."""


class Role(str, Enum):
    SUBMITTER = "submitter"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role

    @property
    def owner_filter(self) -> str | None:
        """Whose jobs this caller may see: None for an operator (everyone's), else its own subject."""
        return None if self.role is Role.OPERATOR else self.subject


ANONYMOUS = Principal(subject="", role=Role.OPERATOR)
"""The caller of an open API (no token file): allowed everything, as before tokens existed."""

# What each action needs. Anything not listed (promotion, kill switch, any RPC added later) is an
# operator's: a new method is closed until someone opens it here.
ACTION_ROLES: dict[str, frozenset[Role]] = {
    "submit_job": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "get_job": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "watch_job": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "list_jobs": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "list_jobs_of_any_owner": frozenset({Role.OPERATOR}),
    # Policy versions are shared by every tenant: a submitter names one in a job.
    "list_policies": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "get_policy": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "use_model": frozenset({Role.SUBMITTER, Role.OPERATOR}),  # the OpenAI-compatible serving API
    # The registry is readable by every tenant (they call its models); changing it is an operator's:
    # promote, approve, rollback and set_kill_switch are not listed, so they need the operator role.
    "list_deployments": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "get_deployment": frozenset({Role.SUBMITTER, Role.OPERATOR}),
    "get_kill_switch": frozenset({Role.SUBMITTER, Role.OPERATOR}),
}
GRPC_ACTIONS = {
    "/seal.v1.Gateway/SubmitJob": "submit_job",
    "/seal.v1.Gateway/GetJob": "get_job",
    "/seal.v1.Gateway/WatchJob": "watch_job",
    "/seal.v1.Gateway/ListPolicies": "list_policies",
    "/seal.v1.Gateway/GetPolicy": "get_policy",
    "/seal.v1.Gateway/Promote": "promote",
    "/seal.v1.Gateway/Approve": "approve",
    "/seal.v1.Gateway/Rollback": "rollback",
    "/seal.v1.Gateway/ListDeployments": "list_deployments",
    "/seal.v1.Gateway/GetDeployment": "get_deployment",
    "/seal.v1.Gateway/SetKillSwitch": "set_kill_switch",
    "/seal.v1.Gateway/GetKillSwitch": "get_kill_switch",
}


def authorize(principal: Principal, action: str) -> None:
    allowed = ACTION_ROLES.get(action, frozenset({Role.OPERATOR}))
    if principal.role not in allowed:
        needed = " or ".join(sorted(r.value for r in allowed))
        raise PermissionDenied(
            f"{action} needs the role {needed}; {principal.subject!r} has the role {principal.role.value}"
        )


# --- the token file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    subject: str
    role: Role


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def generate_token() -> str:
    """A new random API token (256 bits, URL-safe); hand it to its holder, store only its digest."""
    return "seal_" + secrets.token_urlsafe(32)


def token_entry(token: str, subject: str, role: Role | str) -> dict[str, str]:
    """The token file's line for `token`: its digest, never the token itself."""
    entry = {"sha256": token_digest(token).hex(), "subject": subject, "role": Role(role).value}
    _parse_entry(entry, 0)  # the same checks as loading, so a written file always loads
    return entry


def write_token_file(path: Path | str, entries: Iterable[tuple[str, str, Role | str]]) -> Path:
    """Write a token file of (token, subject, role) entries, readable by its owner only.

    `seal up` uses it to make an operator token with no setup:
        token = generate_token(); write_token_file(data_dir / "api-tokens.json", [(token, "operator", "operator")])
    """
    return _write_entries(Path(path), [token_entry(token, subject, role) for token, subject, role in entries])


def add_token(path: Path | str, subject: str, role: Role | str) -> str:
    """A new token for `subject` with `role`, its digest appended to the token file (made if missing);
    returns the token, which is stored nowhere."""
    path = Path(path)
    existing = load_token_file(path) if path.exists() else ()  # a malformed file is refused, not replaced
    token = generate_token()
    entries = [{"sha256": e.digest.hex(), "subject": e.subject, "role": e.role.value} for e in existing]
    _write_entries(path, [*entries, token_entry(token, subject, role)])
    return token


def _write_entries(path: Path, entries: list[dict[str, str]]) -> Path:
    document = {"tokens": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=2)
    os.replace(staging, path)
    return path


def local_operator_token(directory: Path | str) -> tuple[str, Path]:
    """(token, token file) of a local stack's operator, made on first use and kept in `directory`
    (both files 0600), so `seal up` needs no setup and a restarted stack keeps the same token.

    The token itself is kept in `<directory>/operator-token` for local clients to read; the gateway
    is given `<directory>/api-tokens.json`, which holds its digest only.
    """
    directory = Path(directory)
    token_path, tokens_file = directory / "operator-token", directory / "api-tokens.json"
    if token_path.exists() and tokens_file.exists():
        token = token_path.read_text(encoding="utf-8").strip()
        if any(hmac.compare_digest(token_digest(token), e.digest) for e in load_token_file(tokens_file)):
            return token, tokens_file
    token = generate_token()
    write_token_file(tokens_file, [(token, "operator", Role.OPERATOR)])
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, tokens_file


def load_token_file(path: Path | str) -> tuple[TokenEntry, ...]:
    """The entries of a token file; a malformed file is a ValueError naming the entry to fix."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"api_tokens: no token file at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"api_tokens: {path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("tokens"), list):
        raise ValueError(f'api_tokens: {path} must be {{"tokens": [{{"sha256", "subject", "role"}}, ...]}}')
    entries = tuple(_parse_entry(raw, i) for i, raw in enumerate(document["tokens"]))
    if not entries:
        raise ValueError(
            f"api_tokens: {path} lists no tokens; add one, or leave api_tokens empty for an open API"
        )
    if len({e.digest for e in entries}) != len(entries):
        raise ValueError(f"api_tokens: {path} lists the same token twice")
    return entries


def _parse_entry(raw: Any, index: int) -> TokenEntry:
    where = f"api_tokens: tokens[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f'{where} must be an object {{"sha256", "subject", "role"}}')
    digest, subject, role = raw.get("sha256"), raw.get("subject"), raw.get("role")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ValueError(f"{where}.sha256 must be the 64 hex digits of the token's sha256, got {digest!r}")
    if not isinstance(subject, str) or not SUBJECT_PATTERN.fullmatch(subject):
        raise ValueError(f"{where}.subject must be 1-64 characters of A-Z a-z 0-9 . _ @ -, got {subject!r}")
    if role not in {r.value for r in Role}:
        raise ValueError(f"{where}.role must be one of {', '.join(r.value for r in Role)}, got {role!r}")
    return TokenEntry(bytes.fromhex(digest), subject, Role(role))


# --- authentication -------------------------------------------------------------------------------


class Authenticator:
    """Turns an Authorization value ("Bearer <token>") into a Principal; None entries: an open API."""

    def __init__(self, entries: tuple[TokenEntry, ...] | None) -> None:
        self.entries = entries

    @classmethod
    def from_config(cls, api_tokens: str) -> Authenticator:
        if not api_tokens:
            log.warning("api_tokens is not set: the gateway API is open to anyone who can reach it")
            return cls(None)
        entries = load_token_file(api_tokens)
        log.info("api tokens loaded", extra={"tokens": len(entries)})
        return cls(entries)

    @property
    def open(self) -> bool:
        return self.entries is None

    def authenticate(self, authorization: str | None) -> Principal:
        if self.entries is None:
            return ANONYMOUS
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send the API token as 'Authorization: Bearer <token>'")
        presented = token_digest(token.strip())
        found = None
        # Compare with every entry, in constant time each, so timing tells nothing about the digests.
        for entry in self.entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry
        if found is None:
            raise Unauthenticated("unknown API token; ask an operator for one")
        return Principal(found.subject, found.role)


# --- gRPC: an interceptor for the Gateway service only ---------------------------------------------

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("seal_principal")


def current_principal() -> Principal:
    """The caller of the gRPC method being served (set by BearerAuthInterceptor)."""
    try:
        return _principal.get()
    except LookupError:
        raise RuntimeError(
            "no authenticated caller: serve this servicer behind BearerAuthInterceptor"
        ) from None


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` metadata and the caller's role for each method.

    Refusals raise Unauthenticated / PermissionDenied inside the handler, so the server's error
    interceptor turns them into UNAUTHENTICATED / PERMISSION_DENIED like any other error.
    """

    def __init__(self, authenticator: Authenticator, actions: Mapping[str, str] = GRPC_ACTIONS) -> None:
        self.authenticator = authenticator
        self.actions = actions

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            principal = self.authenticator.authenticate(metadata.get("authorization"))
            authorize(principal, self.actions.get(handler_call_details.method, handler_call_details.method))
        except (Unauthenticated, PermissionDenied) as exc:
            return _refusing(handler, exc)
        return _as(handler, principal)


def _as(handler: Any, principal: Principal) -> Any:
    if handler.unary_unary:
        inner = handler.unary_unary

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            token = _principal.set(principal)
            try:
                return inner(request, context)
            finally:
                _principal.reset(token)

        return handler._replace(unary_unary=unary)
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = _principal.set(principal)
            try:
                yield from inner_stream(request, context)
            finally:
                _principal.reset(token)

        return handler._replace(unary_stream=stream)
    raise TypeError("BearerAuthInterceptor serves unary-unary and unary-stream methods only")


def _refusing(handler: Any, exc: Exception) -> Any:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        raise exc

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        raise exc
        yield  # a generator, like the handler it replaces

    if handler.unary_unary:
        return handler._replace(unary_unary=refuse)
    return handler._replace(unary_stream=refuse_stream)


class _InterceptedHandler(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.GenericRpcHandler, interceptor: grpc.ServerInterceptor) -> None:
        self.handler = handler
        self.interceptor = interceptor

    def service(self, handler_call_details: Any) -> Any:
        return self.interceptor.intercept_service(self.handler.service, handler_call_details)


class _CollectHandlers:
    """Stands in for a grpc.Server to collect what a generated add_*Servicer_to_server registers."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        # Registered handlers would be found before (and without) the interceptor: leave them out.
        pass


def add_intercepted_servicer(
    add_servicer: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.Server,
    interceptor: grpc.ServerInterceptor,
) -> None:
    """Register a generated servicer behind `interceptor`, which then sees only that service's calls
    (health and reflection on the same server stay open)."""
    collected = _CollectHandlers()
    add_servicer(servicer, collected)
    server.add_generic_rpc_handlers(tuple(_InterceptedHandler(h, interceptor) for h in collected.generic))
