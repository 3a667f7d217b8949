"""An append-only, hash-chained audit log in Redis: what changed a user's adapted model, and who did it.

Every submission, verdict, promotion (and refused promotion), approval, rollback and kill-switch change
is one entry. `seal audit verify` detects an entry that was edited, reordered or removed afterwards.

Format (enough to write a verifier in another language)
-------------------------------------------------------
An entry is a JSON object with exactly these fields:

    seq      integer, 0 for the first entry, then +1 per entry
    ts       number, seconds since the Unix epoch (UTC), microsecond precision
    kind     string: submission, verdict, promotion, promotion_refused, approval, rollback, kill_switch
    actor    string: who caused it (an API token's subject, a service name)
    subject  string: what it is about, "<type>:<id>" (e.g. "job:abc", "deployment:faq@3")
    body     object: the details of this kind of entry
    prev     string: the previous entry's `hash`; 64 "0" characters for seq 0
    hash     string: lowercase hex SHA-256 of the canonical JSON of the seven other fields, as UTF-8

Canonical JSON is Python's `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`: object keys sorted by code point at every depth, no whitespace, non-ASCII characters
written as themselves (UTF-8), floats in their shortest round-trip form with a "." or an exponent
(1718000000.5, 1718000000.0, 1e-07), integers without one. A verifier in a language whose JSON writer
formats floats differently (JavaScript writes 1718000000.0 as 1718000000) must format them this way.

Redis keys, under a prefix such as "seal:" (the stack's namespace and a colon):

    {prefix}audit:entries   a list; element i is the canonical JSON of entry i, `hash` included
    {prefix}audit:head      a string: JSON {"seq": <last seq>, "hash": <last hash>}; absent while empty

An append WATCHes both keys, reads the head, and in one MULTI/EXEC pushes the entry and rewrites the
head, so concurrent appenders (threads or processes) never fork the chain, and a removed last entry
shows as a head that names an entry the list no longer has.

An export (`seal audit export PATH`) is JSON lines: the stored entries in order, as stored, then one
final line {"head": {"seq": ..., "hash": ...}} ({"head": null} for an empty log).

What it does not protect against: a writer with Redis access who rewrites every entry after the one
they change and the head as well. Exporting the log (or just its head) somewhere they cannot write,
and verifying a later log against it, catches that too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

SUBMISSION = "submission"
VERDICT = "verdict"
PROMOTION = "promotion"
REFUSAL = "promotion_refused"
APPROVAL = "approval"
ROLLBACK = "rollback"
KILL_SWITCH = "kill_switch"
KINDS = (SUBMISSION, VERDICT, PROMOTION, REFUSAL, APPROVAL, ROLLBACK, KILL_SWITCH)

GENESIS = "0" * 64
"""The `prev` of entry 0."""
FIELDS = ("seq", "ts", "kind", "actor", "subject", "body", "prev", "hash")
APPEND_ATTEMPTS = 100
"""How often an append retries when other appenders keep moving the head under it."""


class AuditLogError(RuntimeError):
    """The audit log cannot take an entry now (contention, or a log whose head is gone)."""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: float
    kind: str
    actor: str
    subject: str
    body: dict[str, Any]
    prev: str
    hash: str

    def to_json(self) -> str:
        """The entry as stored: canonical JSON of every field, `hash` included."""
        return canonical_json(asdict(self))


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    count: int
    """How many entries were checked."""
    problems: list[str]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of every entry field except `hash` itself."""
    content = {name: fields[name] for name in FIELDS if name != "hash"}
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def chain_entry(
    previous: AuditEntry | None, kind: str, actor: str, subject: str, body: Mapping[str, Any], ts: float
) -> AuditEntry:
    """The entry that follows `previous` (None: the first entry), with its hash."""
    if kind not in KINDS:
        raise ValueError(f"audit entry kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not actor or not subject:
        raise ValueError(f"an audit entry needs an actor and a subject, got {actor!r} and {subject!r}")
    try:
        # Round-trip, so the body hashed is the body a reader decodes (tuples become lists, int keys strings).
        plain_body = json.loads(json.dumps(dict(body), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"an audit entry's body must be plain JSON (no NaN, no objects): {exc}") from None
    fields = {
        "seq": 0 if previous is None else previous.seq + 1,
        "ts": round(float(ts), 6),
        "kind": kind,
        "actor": actor,
        "subject": subject,
        "body": plain_body,
        "prev": GENESIS if previous is None else previous.hash,
    }
    return AuditEntry(**fields, hash=entry_hash(fields))


def parse_entry(raw: AuditEntry | Mapping[str, Any] | str | bytes) -> AuditEntry:
    """An entry from its stored JSON (or decoded object); ValueError says what is malformed."""
    if isinstance(raw, AuditEntry):
        return raw
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"not a JSON object but {type(raw).__name__}")
    missing = [name for name in FIELDS if name not in raw]
    extra = sorted(set(raw) - set(FIELDS))
    if missing or extra:
        raise ValueError(f"missing fields {missing}, unknown fields {extra}")
    wrong = [name for name, ok in _field_checks(raw).items() if not ok]
    if wrong:
        raise ValueError("wrong type or form of " + ", ".join(f"{n}={raw[n]!r:.40}" for n in wrong))
    return AuditEntry(**{name: raw[name] for name in FIELDS})


def _field_checks(raw: Mapping[str, Any]) -> dict[str, bool]:
    def is_hex64(value: Any) -> bool:
        return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)

    return {
        "seq": isinstance(raw["seq"], int) and not isinstance(raw["seq"], bool) and raw["seq"] >= 0,
        "ts": isinstance(raw["ts"], (int, float)) and not isinstance(raw["ts"], bool),
        "kind": isinstance(raw["kind"], str) and bool(raw["kind"]),
        "actor": isinstance(raw["actor"], str),
        "subject": isinstance(raw["subject"], str),
        "body": isinstance(raw["body"], dict),
        "prev": is_hex64(raw["prev"]),
        "hash": is_hex64(raw["hash"]),
    }


def verify_entries(
    entries: Sequence[AuditEntry | Mapping[str, Any] | str | bytes], head: Mapping[str, Any] | None
) -> VerifyReport:
    """Check a whole log: every hash matches its entry, seqs run 0, 1, 2, … in order, every `prev` is
    the hash before it, and `head` names the last entry. Entries may be stored JSON or decoded objects;
    `head` None means the head record is missing (a problem unless the log is empty)."""
    problems: list[str] = []
    previous: AuditEntry | None = None
    for position, raw in enumerate(entries):
        try:
            entry = parse_entry(raw)
        except ValueError as exc:
            problems.append(f"entry at position {position}: malformed: {exc}")
            previous = None  # nothing to chain the next entry to; its own checks still run
            continue
        problems += _chain_problems(entry, position, previous)
        previous = entry
    problems += _head_problems(entries, previous, head)
    return VerifyReport(ok=not problems, count=len(entries), problems=problems)


def _chain_problems(entry: AuditEntry, position: int, previous: AuditEntry | None) -> list[str]:
    problems = []
    try:
        edited = entry_hash(asdict(entry)) != entry.hash
    except ValueError:  # NaN or Infinity somewhere: no canonical form, so no hash can match
        edited = True
    if edited:
        problems.append(f"entry {entry.seq}: its hash does not match its content (edited)")
    if position == 0:
        if entry.seq != 0:
            problems.append(f"entry {entry.seq} at position 0: the log must start at seq 0 (entries removed)")
        if entry.prev != GENESIS:
            problems.append(f"entry {entry.seq}: it is the first entry but its prev is not 64 zeros")
    elif previous is not None:
        if entry.seq != previous.seq + 1:
            problems.append(
                f"entry {entry.seq} at position {position}: expected seq {previous.seq + 1} after "
                f"entry {previous.seq} (entries removed or reordered)"
            )
        if entry.prev != previous.hash:
            problems.append(
                f"entry {entry.seq}: its prev does not match the hash of entry {previous.seq} before it "
                "(an entry was edited, removed or reordered)"
            )
    return problems


def _head_problems(
    entries: Sequence[Any], last: AuditEntry | None, head: Mapping[str, Any] | None
) -> list[str]:
    if head is None:
        return ["head: missing, so entries removed from the end cannot be ruled out"] if entries else []
    seq, digest = (head.get("seq"), head.get("hash")) if isinstance(head, Mapping) else (None, None)
    if not isinstance(seq, int) or not isinstance(digest, str):
        return [f'head: malformed: {head!r:.80}; expected {{"seq": <int>, "hash": <hex>}}']
    if not entries:
        return [f"head: it names entry {seq} but the log is empty (entries removed)"]
    if last is None:
        return [f"head: the last entry (position {len(entries) - 1}) is malformed, so it cannot match"]
    if seq > last.seq:
        return [
            f"head: it names entry {seq} but the log ends at entry {last.seq} (entries removed from the end)"
        ]
    if seq < last.seq:
        return [
            f"head: it names entry {seq} but the log goes on to entry {last.seq} "
            "(entries appended without updating the head: forged)"
        ]
    if digest != last.hash:
        return [f"head: its hash does not match entry {seq}'s hash (the last entry was replaced)"]
    return []


class AuditLog:
    """The audit log under one key prefix (e.g. "seal:") of one Redis."""

    def __init__(
        self, redis_client: redis.Redis, key_prefix: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis_client
        self.entries_key = f"{key_prefix}audit:entries"
        self.head_key = f"{key_prefix}audit:head"
        self.clock = clock

    def append(self, kind: str, actor: str, subject: str, body: Mapping[str, Any]) -> AuditEntry:
        """Add an entry at the end of the chain, atomically, even with other processes appending."""
        for attempt in range(APPEND_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.head_key, self.entries_key)
                    entry = chain_entry(self._head_entry(pipe), kind, actor, subject, body, self.clock())
                    pipe.multi()
                    pipe.rpush(self.entries_key, entry.to_json())
                    pipe.set(self.head_key, canonical_json({"seq": entry.seq, "hash": entry.hash}))
                    pipe.execute()
                    return entry
                except redis.WatchError:
                    # Another appender won this round; back off a little so we do not collide again.
                    time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
        raise AuditLogError(
            f"could not append to {self.entries_key} in {APPEND_ATTEMPTS} attempts: other writers kept "
            "changing it; retry later"
        )

    def _head_entry(self, pipe: redis.client.Pipeline) -> AuditEntry | None:
        """The entry the head names (what the next entry chains to); None for an empty log."""
        raw_head = pipe.get(self.head_key)
        if raw_head is None:
            if pipe.llen(self.entries_key):
                # The two reads are not one snapshot: an empty EXEC raises WatchError (and the caller
                # retries) if another appender wrote in between; if it passes, the head really is gone.
                pipe.multi()
                pipe.execute()
                raise AuditLogError(
                    f"{self.entries_key} has entries but {self.head_key} is missing; "
                    "run `seal audit verify` and restore the head before appending"
                )
            return None
        try:
            head = json.loads(raw_head)
            # Only seq and hash matter to chain on; the rest of the previous entry is not needed.
            return AuditEntry(int(head["seq"]), 0.0, "", "", "", {}, "", str(head["hash"]))
        except (ValueError, TypeError, KeyError):
            raise AuditLogError(
                f"{self.head_key} is malformed ({raw_head!r:.80}); run `seal audit verify` before appending"
            ) from None

    def _snapshot(self) -> tuple[list[bytes | str], Any]:
        """The stored entries and the head, read in one transaction so they agree."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrange(self.entries_key, 0, -1)
            pipe.get(self.head_key)
            raw_entries, raw_head = pipe.execute()
        return list(raw_entries), None if raw_head is None else _decode_head(raw_head)

    def entries(self, start: int = 0, count: int | None = None) -> list[AuditEntry]:
        """Entries from position `start` (negative counts from the end), at most `count` of them."""
        if count is not None and count <= 0:
            return []
        stop = -1 if count is None else start + count - 1
        if start < 0 <= stop:  # a window from the end must not wrap to the start
            stop = -1
        raw = self.redis.lrange(self.entries_key, start, stop)
        return [_parse_at(item, start + i) for i, item in enumerate(raw)]

    def __len__(self) -> int:
        return int(self.redis.llen(self.entries_key))

    def verify(self) -> VerifyReport:
        return verify_entries(*self._snapshot())

    def export(self, path: str | Path) -> int:
        """Write the log as JSON lines plus a final {"head": ...} line, atomically; returns the count."""
        raw_entries, head = self._snapshot()
        lines = [_text(item) for item in raw_entries] + [canonical_json({"head": head})]
        _write_atomically(Path(path), "".join(line + "\n" for line in lines))
        return len(raw_entries)

    @staticmethod
    def verify_file(path: str | Path) -> VerifyReport:
        return verify_file(path)


def _decode_head(raw: bytes | str) -> Any:
    """The head record, or the undecodable text itself (which verify_entries reports as malformed)."""
    try:
        return json.loads(raw)
    except ValueError:
        return _text(raw)


def _parse_at(raw: bytes | str, position: int) -> AuditEntry:
    try:
        return parse_entry(raw)
    except ValueError as exc:
        raise ValueError(f"audit entry at position {position} is malformed: {exc}") from None


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def verify_file(path: str | Path) -> VerifyReport:
    """Verify an export: its entry lines, against its final {"head": ...} line."""
    # Split on "\n" only: entries may hold U+2028 and other characters that splitlines() breaks at.
    text = Path(path).read_bytes().decode("utf-8")
    lines = [line for line in text.split("\n") if line.strip()]
    head_line = _head_line(lines[-1]) if lines else None
    if head_line is None:
        report = verify_entries(lines, None)
        problems = [*report.problems, f'{path}: no final {{"head": ...}} line (truncated export?)']
        return VerifyReport(ok=False, count=report.count, problems=problems)
    return verify_entries(lines[:-1], head_line["head"])


def _head_line(line: str) -> dict[str, Any] | None:
    try:
        decoded = json.loads(line)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) and set(decoded) == {"head"} else None


# ---- `seal audit …` (seal/cli.py adds it with add_parser) ----------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `audit verify | show | export PATH` to the `seal` command's subparsers."""
    audit = subparsers.add_parser("audit", help="verify, show or export the hash-chained audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = commands.add_parser("verify", help="check the chain; exit 1 and list problems if tampered")
    show = commands.add_parser("show", help="print the last entries")
    show.add_argument("--limit", type=int, default=20, help="how many of the latest entries (default 20)")
    show.add_argument("--json", action="store_true", help="one JSON object per line, as stored")
    export = commands.add_parser("export", help="write the log as JSON lines (head last), atomically")
    export.add_argument("path")
    for command in (verify, show, export):
        command.add_argument("--redis-url", default="", help="default: $SEAL_REDIS_URL, else local Redis")
        command.add_argument(
            "--namespace", default="", help="key prefix of the stack (default: $SEAL_NAMESPACE or seal)"
        )
        command.set_defaults(func=cmd_audit)
    return audit


def cmd_audit(args: argparse.Namespace) -> int:
    """Connect to the stack's Redis (flags, else $SEAL_REDIS_URL / $SEAL_NAMESPACE) and run."""
    from seal.config import ServiceConfig

    url = args.redis_url or os.environ.get("SEAL_REDIS_URL") or ServiceConfig.redis_url
    namespace = args.namespace or os.environ.get("SEAL_NAMESPACE") or ServiceConfig.namespace
    return run(args, redis.Redis.from_url(url), f"{namespace}:")


def run(args: argparse.Namespace, redis_client: redis.Redis, key_prefix: str) -> int:
    log = AuditLog(redis_client, key_prefix)
    return AUDIT_COMMANDS[args.audit_command](log, args)


def _cmd_verify(log: AuditLog, args: argparse.Namespace) -> int:
    report = log.verify()
    if report.ok:
        print(f"audit log intact: {report.count} entries")
        return 0
    print(f"audit log TAMPERED: {len(report.problems)} problems in {report.count} entries")
    print("\n".join(f"  {problem}" for problem in report.problems))
    return 1


def _cmd_show(log: AuditLog, args: argparse.Namespace) -> int:
    if args.limit <= 0:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    for entry in log.entries(start=-args.limit):
        print(entry.to_json() if args.json else _render(entry))
    return 0


def _render(entry: AuditEntry) -> str:
    when = datetime.fromtimestamp(entry.ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{entry.seq:>6}  {when}Z  {entry.kind:<17} {entry.actor:<16} {entry.subject}  {canonical_json(entry.body)}"


def _cmd_export(log: AuditLog, args: argparse.Namespace) -> int:
    count = log.export(args.path)
    print(f"exported {count} entries to {args.path}")
    return 0


AUDIT_COMMANDS: dict[str, Callable[[AuditLog, argparse.Namespace], int]] = {
    "verify": _cmd_verify,
    "show": _cmd_show,
    "export": _cmd_export,
}
