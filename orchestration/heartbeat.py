"""Workers say they are alive: every sweep round (orchestration/sweep.py), each worker process
writes the time into a Redis sorted set, and /health/ready (console/health.py) looks for a
recent one. Standalone mode has no separate workers and writes nothing."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from django.conf import settings

log = logging.getLogger("switchboard.heartbeat")
KEY = "switchboard:worker-heartbeats"
_clients: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()


def _client(url: str) -> Any:
    import redis

    with _lock:
        key = (os.getpid(), url)
        if key not in _clients:
            _clients[key] = redis.Redis.from_url(url, socket_timeout=2,
                                                 socket_connect_timeout=2)
        return _clients[key]


def name() -> str:
    return f"{socket.gethostname()[:48]}:{os.getpid()}"


def beat() -> None:
    """Record that this worker process is alive (never raises: Redis may be away)."""
    if not settings.REDIS_URL:
        return
    now = time.time()
    try:
        client = _client(settings.REDIS_URL)
        pipe = client.pipeline(transaction=False)
        pipe.zadd(KEY, {name(): now})
        # Forget workers gone for long (a restarted container's old pid).
        pipe.zremrangebyscore(KEY, "-inf", now - 10 * settings.SWITCHBOARD_WORKER_HEARTBEAT_SECONDS)
        pipe.execute()
    except Exception as exc:
        log.debug("could not write the worker heartbeat: %s", exc)


def latest(url: str) -> float | None:
    """When a worker last beat (a Unix time), or None when none ever did; raises when Redis is
    unreachable."""
    newest = _client(url).zrevrange(KEY, 0, 0, withscores=True)
    return float(newest[0][1]) if newest else None
