"""The Kombu channel: declarations (exchanges, queues, bindings) and the
``basic_*`` API, on the transport's session (:mod:`pgbroker.broker.transport`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from queue import Empty
from typing import TYPE_CHECKING, Any

import psycopg
from amqp.protocol import queue_declare_ok_t
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.uuid import uuid

from pgbroker.broker.messages import _json, _ms_to_seconds, to_raw
from pgbroker.broker.routing import topic_pattern
from pgbroker.errors import NameTooLong
from pgbroker.logs import recovery

if TYPE_CHECKING:
    from pgbroker.broker.transport import Transport

logger = logging.getLogger("pgbroker.broker")

#: Longest queue, exchange or routing key name, in bytes: AMQP's limit
#: (shortstr). PostgreSQL would fail later and less clearly: a btree index
#: row holds at most 2,704 bytes, and a binding's key holds three names.
MAX_NAME_BYTES = 255


class QoS(virtual.QoS):
    """Prefetch accounting; unacked messages go back through PostgreSQL."""

    _delivered: Any

    def restore_unacked(self) -> list[Any]:
        self._flush()  # type: ignore[no-untyped-call]
        tags = list(self._delivered)
        self._delivered.clear()
        if tags:
            # Handed back as the channel closes, perhaps never processed:
            # never dead-lettered here for max_deliveries (see requeue).
            self.channel.connection.requeue(tags, counted=False)
        return []

    def restore_unacked_once(self, stderr: Any = None) -> None:
        # The virtual QoS dumps messages it cannot restore to a file; here a
        # message that cannot be requeued now (connection lost) is still in
        # PostgreSQL, reserved by a dead session, and the sweep requeues it.
        self._on_collect.cancel()
        if not self.restore_at_shutdown or getattr(self._delivered, "restored", False):
            return
        try:
            self.restore_unacked()
        except psycopg.Error as exc:
            logger.info(
                "unacked messages left to the sweep: %s",
                exc,
                extra=recovery("session_lost", reason=type(exc).__name__),
            )
        finally:
            self._delivered.restored = True


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    from_transport_options = ()  # type: ignore[assignment]
    # Bodies are stored as bytes; no base64 round trip.
    body_encoding = None  # type: ignore[assignment]
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)  # type: ignore[no-untyped-call]
        self._no_ack_queues: set[str] = set()

    # --- declarations ------------------------------------------------------

    def exchange_declare(
        self,
        exchange: str | None = None,
        type: str = "direct",
        durable: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        nowait: bool = False,
        passive: bool = False,
    ) -> None:
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        check_name("exchange", exchange)
        t = self.connection
        if passive:
            if t.run("exchange_type", name=exchange) is None:
                raise ChannelError(
                    f"NOT_FOUND - no exchange {exchange!r}",
                    (50, 10),
                    "Channel.exchange_declare",
                    "404",
                )
            return
        if type not in ("direct", "topic", "fanout"):
            raise ChannelError(
                f"exchange {exchange!r}: pgbroker supports direct, topic and fanout "
                f"exchanges, not {type!r}"
            )
        existing = t.run(
            "declare_exchange",
            name=exchange,
            type=type,
            durable=durable,
            auto_delete=auto_delete,
            arguments=_json(arguments),
        )
        if existing is not None and existing[0] != type:
            raise virtual.NotEquivalentError(
                f"exchange {exchange!r} exists with type {existing[0]!r}, "
                f"not {type!r}: delete it or use another name"
            )

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        self.connection.run("delete_exchange", name=exchange)

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        # Queue(message_ttl=..., expires=...) become x-message-ttl and
        # x-expires (ms), as for AMQP; the base channel would drop them.
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        queue = queue or f"amq.gen-{uuid()}"
        check_name("queue", queue)
        t = self.connection
        if passive:
            if not self._has_queue(queue):
                raise ChannelError(
                    f"NOT_FOUND - no queue {queue!r}",
                    (50, 10),
                    "Channel.queue_declare",
                    "404",
                )
            return queue_declare_ok_t(queue, self._size(queue), 0)
        arguments = kwargs.get("arguments") or {}
        # An exclusive queue goes with this connection: it belongs to the
        # session's consumer, whose end (close or death) drops it.
        exclusive = bool(kwargs.get("exclusive"))
        row = t.run(
            "declare_queue",
            name=queue,
            durable=kwargs.get("durable", True),
            auto_delete=kwargs.get("auto_delete", False),
            message_ttl=_ms_to_seconds(arguments.get("x-message-ttl")),
            expires=_ms_to_seconds(arguments.get("x-expires")),
            arguments=_json(arguments),
            exclusive_to=t._ensure_consumer() if exclusive else None,
        )
        t._declared_exclusive |= exclusive
        return queue_declare_ok_t(queue, row[0] if row else 0, 0)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self._size(queue):
            return
        self.connection.run("delete_queue", name=queue)

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_name("queue", queue)
        check_name("exchange", exchange)
        check_name("routing key", routing_key)
        self.connection.run(
            "bind",
            exchange=exchange or "amq.direct",
            routing_key=routing_key or "",
            queue=queue,
            pattern=topic_pattern(routing_key or ""),
        )

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.connection.run(
            "unbind",
            exchange=exchange or "amq.direct",
            routing_key=routing_key or "",
            queue=queue,
        )

    def list_bindings(self) -> Iterable[tuple[str, str, str]]:
        return [tuple(r) for r in self.connection.run_all("list_bindings")]

    def get_exchanges(self) -> list[str]:
        raise NotImplementedError("list exchanges with SQL: SELECT name FROM <schema>.exchange")

    # --- publishing ---------------------------------------------------------

    def basic_publish(
        self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any
    ) -> None:
        self.connection.publish(message, exchange or "", routing_key or "", self)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.connection.publish(message, "", queue, self)

    def _restore(self, message: Any) -> None:
        self.connection.requeue([message.delivery_tag], counted=False)

    def _restore_at_beginning(self, message: Any) -> None:
        self._restore(message)

    # --- consuming ----------------------------------------------------------

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        check_name("queue", queue)
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)  # type: ignore[no-untyped-call]
        self.connection.attach(queue)
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)  # type: ignore[no-untyped-call]
        if queue is not None and queue not in self._active_queues:
            self._no_ack_queues.discard(queue)
            if self.connection is not None:
                self.connection.detach(queue)
        return result

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        rows = self.connection.claim(queue, 1, no_ack)
        if not rows:
            return None
        consumer = None if no_ack else self.connection.consumer_id
        conn = self.connection
        raw = to_raw(rows[0], conn._lock_oid, consumer, conn.origin, conn._timeline)
        message = self.Message(raw, channel=self)  # type: ignore[no-untyped-call]
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.connection.ack(delivery_tag)
        self.qos.ack(delivery_tag)

    def basic_reject(self, delivery_tag: int, requeue: bool = False) -> None:
        if requeue:
            self.connection.requeue([delivery_tag])
        else:
            self.connection.dead_letter([delivery_tag])
        self.qos.ack(delivery_tag)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        rows = self.connection.claim(queue, 1, no_ack=True)
        if not rows:
            raise Empty()
        return to_raw(rows[0], self.connection._lock_oid)

    def _size(self, queue: str) -> int:
        row = self.connection.run("size", queue=queue)
        return int(row[0]) if row else 0

    def _purge(self, queue: str) -> int:
        return self.connection.run_count("purge", queue=queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        row = self.connection.run("queue_exists", name=queue)
        return bool(row and row[0])

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.queue_declare(queue, **kwargs)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.queue_delete(queue)

    def drain_events(self, timeout: float | None = None, callback: Any = None) -> None:
        self.connection.drain_events(self.connection, timeout=timeout)


def check_name(kind: str, name: str | None) -> None:
    """Refuse a name longer than MAX_NAME_BYTES before any SQL runs."""
    if name and len(name.encode()) > MAX_NAME_BYTES:
        raise NameTooLong(
            f"{kind} name of {len(name.encode())} bytes ({name[:40]!r}...): pgbroker takes "
            f"names of at most {MAX_NAME_BYTES} bytes (as AMQP does); use a shorter name"
        )
