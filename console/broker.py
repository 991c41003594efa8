"""The Celery broker transport for distributed mode: kombu's Redis transport, made to survive
losing Redis.

When the connection to Redis drops while tasks are in flight, kombu's Redis channel closes,
and two things then touch the closed channel: pushing the in-flight messages back to Redis,
and acknowledging a task that finishes afterwards. Both raise (``'NoneType' object has no
attribute 'hostname'`` / ``'client'`` in ``_connparams``), and the error takes the whole worker
down. Switchboard needs neither: each message is an outbox row until the transaction that
handles it commits, and the sweep relays whatever is still there (orchestration/outbox.py),
while a message left unacknowledged in Redis comes back after its visibility timeout and finds
its work done. So the worker stays up, reconnects, and nothing is lost.
"""

from __future__ import annotations

import logging

from kombu.transport import redis

log = logging.getLogger("switchboard.broker")


class QoS(redis.QoS):
    restore_at_shutdown = False

    def _closed(self) -> bool:
        connection = getattr(self.channel, "connection", None)
        return connection is None or getattr(connection, "client", None) is None

    def ack(self, delivery_tag: str) -> None:
        if self._closed():
            log.warning("broker connection lost: message %s stays unacknowledged (its "
                        "outbox row, if any, was consumed with its work)", delivery_tag)
            self._delivered.pop(delivery_tag, None)
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._closed():
            self._delivered.pop(delivery_tag, None)
            return
        super().reject(delivery_tag, requeue=requeue)


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
