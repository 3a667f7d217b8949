"""Where registered students can be reached, and which of them hold which adapter.

Students register their id and address in Redis and keep the entry alive with a heartbeat; every
adapter a student holds is listed under its address key. The auditor dials only addresses it finds
here (never one named in a task or request), so a payload cannot make it connect anywhere else, and
any registered student that holds an adapter can serve it, under whatever address it has now.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

from seal.workplane import RESULT_TTL_S, WorkPlane

# A student that has not renewed its entry for this long is taken to be gone.
REGISTRATION_TTL_S = 30


def student_id_for(data_dir: Path, kind: str = "student") -> str:
    """A service's stable id: its kind, host and data directory, so a restart on another port keeps it."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    return f"{kind}-{socket.gethostname()}-{digest}"


class StudentRegistry:
    def __init__(self, plane: WorkPlane, ttl_s: int = REGISTRATION_TTL_S) -> None:
        self.plane = plane
        self.ttl_s = ttl_s

    def _student_key(self, student_id: str) -> str:
        return self.plane.key("students", student_id)

    def _holders_key(self, sha256: str) -> str:
        return self.plane.key("adapter-holders", sha256)

    def register(self, student_id: str, address: str) -> None:
        """Announce (or renew) that `student_id` answers at `address` for the next ttl_s seconds."""
        entry = json.dumps({"address": address, "renewed_at": time.time()})
        self.plane.redis.set(self._student_key(student_id), entry, ex=self.ttl_s)

    def unregister(self, student_id: str) -> None:
        self.plane.redis.delete(self._student_key(student_id))

    def address(self, student_id: str) -> str | None:
        """The live address of `student_id`, or None if it is not registered now."""
        raw = self.plane.redis.get(self._student_key(student_id)) if student_id else None
        return None if raw is None else str(json.loads(raw)["address"])

    def add_holder(self, sha256: str, student_id: str) -> None:
        key = self._holders_key(sha256)
        pipe = self.plane.redis.pipeline(transaction=True)
        pipe.sadd(key, student_id)
        pipe.expire(key, RESULT_TTL_S)
        pipe.execute()

    def remove_holder(self, sha256: str, student_id: str) -> None:
        self.plane.redis.srem(self._holders_key(sha256), student_id)

    def holders(self, sha256: str) -> list[str]:
        members: set[bytes] = self.plane.redis.smembers(self._holders_key(sha256))  # type: ignore[assignment]
        return sorted(m.decode() for m in members)
