"""The kill switch, as every service reads it: one Redis key that stops all adaptation and promotion.

An operator sets it through the gateway (`seal kill-switch on REASON`, written to the audit log). While
it is on, every teacher, student and auditor worker stops taking new tasks (a task in flight
finishes), the gateway refuses new jobs and promotions, and each service's gRPC health reports the
service "seal.v1.Adaptation" NOT_SERVING (the gateway's /healthz shows the switch too). Reads are
cached for a second, so a busy worker does not ask Redis on every poll.
"""

from __future__ import annotations

import threading
import time

import redis

from seal.records import KillSwitch, from_json
from seal.workplane import WorkPlane

ADAPTATION_HEALTH = "seal.v1.Adaptation"
"""The health-check service name that is NOT_SERVING while the kill switch is on."""


def kill_switch_key(plane: WorkPlane) -> str:
    return plane.key("kill-switch")


class KillSwitchWatch:
    def __init__(self, plane: WorkPlane, cache_s: float = 1.0) -> None:
        self.plane = plane
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._state = KillSwitch()
        self._read_at = float("-inf")

    def state(self) -> KillSwitch:
        with self._lock:
            if time.monotonic() - self._read_at >= self.cache_s:
                try:
                    raw = self.plane.redis.get(kill_switch_key(self.plane))
                    self._state = KillSwitch() if raw is None else from_json(KillSwitch, raw)
                except redis.RedisError:
                    pass  # keep the last state; the worker's own Redis calls report the outage
                self._read_at = time.monotonic()
            return self._state

    def on(self) -> bool:
        return self.state().on
