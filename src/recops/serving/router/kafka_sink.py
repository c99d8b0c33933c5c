"""The Kafka feedback transport: the router's accepted events as messages on one topic.

A :class:`~recops.serving.router.feedback_log.Sink` for :class:`~recops.serving.router.feedback_log.FeedbackLog`,
so the semantics are the file log's: accepted = queued, queue full = 503, one writer task, failed
writes retried with back-off while the process lives, closing delivers everything accepted.

Each JSONL line becomes one message: the value is the line itself (the same JSON object as in the file
log, without its newline), the key its ``user_id`` (Kafka's default partitioner hashes the key, so one
user's events land on one partition, in order). The producer is idempotent with ``acks=all``: a write
returns only when the in-sync replicas have every message, and the broker drops the producer's own
internal retries as duplicates. A retry by the writer task (after a send failed) is a new send, so the
delivery is at-least-once; ``recops retrain`` merges each event once, which absorbs such duplicates.

aiokafka (asyncio-native, pure Python with optional C speed-ups) runs on the router's event loop: no
thread, no native librdkafka to ship in the image.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import orjson

from recops.serving.router.feedback_log import SinkWriteError

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from recops.serving.router.config import KafkaFeedbackConfig

log = logging.getLogger("recops.router")


def message_key(line: bytes) -> bytes | None:
    """The partition key of one JSONL line: its ``user_id`` (None for a line without one)."""
    try:
        user = orjson.loads(line).get("user_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return str(user).encode() if user is not None else None


class CancelledSend(Exception):
    """aiokafka cancelled a send (the producer was stopping)."""

    retriable = True


class KafkaSink:
    """Sends JSONL lines to a topic with an idempotent ``acks=all`` aiokafka producer."""

    needs_sync = False  # an acknowledged message is on the in-sync replicas: nothing to fsync here

    def __init__(self, config: KafkaFeedbackConfig) -> None:
        self.config = config
        self.description = f"kafka://{config.bootstrap_servers}/{config.topic}"
        self._producer: AIOKafkaProducer | None = None
        self._stuck: list[tuple[bytes, asyncio.Future]] = []  # sends still in flight when a write timed out

    def _new_producer(self) -> AIOKafkaProducer:
        from aiokafka import AIOKafkaProducer  # imported here: only routers with a Kafka transport need it

        config = self.config
        return AIOKafkaProducer(
            bootstrap_servers=config.bootstrap_servers.split(","),
            client_id=config.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=config.linger_ms,
            request_timeout_ms=int(config.delivery_timeout_seconds * 1000),
            retry_backoff_ms=200,
        )

    async def _ready_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = self._new_producer()
            try:
                await producer.start()
            except BaseException:
                await _stop_quietly(producer)
                raise
            self._producer = producer
        return self._producer

    async def open(self) -> None:
        """Connect now if the broker answers; if not, the writer task keeps trying (the router still starts).

        Why not refuse to start: recommendations do not need Kafka, and the queue absorbs a short outage;
        a broker that stays away shows as ``recops_router_feedback_log_write_errors_total`` and 503s.
        """
        try:
            await self._ready_producer()
        except Exception as error:
            log.error("feedback log %s: cannot connect yet (%s); events queue until it answers",
                      self.description, error)

    async def write(self, blobs: list[bytes]) -> None:
        """Send every line and wait (up to deliveryTimeoutSeconds) for the acknowledgements.

        The lines not acknowledged in time are the ones to retry. A send still in flight is not sent
        again on the retry: aiokafka keeps retrying it internally (it does not expire batches while the
        broker is unreachable), so the retry waits for the same future; resending would pile up copies.
        """
        lines = [line for blob in blobs for line in blob.splitlines() if line]
        timeout = self.config.delivery_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                producer = await self._ready_producer()
        except Exception as error:
            raise SinkWriteError(blobs, error) from error
        sent: list[tuple[bytes, asyncio.Future]] = []
        stuck, self._stuck = self._stuck, []
        if stuck and [line for line, _ in stuck] == lines[: len(stuck)]:
            sent = stuck  # the retry of lines still in flight: wait for them, do not send them twice
        unsent = lines[len(sent):]
        failure: BaseException | None = None
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                while unsent:  # no metadata in time, producer closed, ...: the line and the rest wait
                    line = unsent[0]
                    sent.append((line, await producer.send(self.config.topic, value=line, key=message_key(line))))
                    unsent = unsent[1:]
        except Exception as error:
            failure = error
        futures = [future for _, future in sent]
        if futures:
            await asyncio.wait(futures, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        failed: list[bytes] = []
        for line, future in sent:
            if not future.done():
                self._stuck.append((line, future))
            elif future.cancelled() or future.exception() is not None:
                failed.append(line)
                failure = failure or (CancelledSend() if future.cancelled() else future.exception())
        if not (self._stuck or failed or unsent):
            return
        if failure is None:
            failure = TimeoutError(f"{len(self._stuck)} messages not acknowledged in {timeout:g} s")
        if _fatal(failure):
            # The idempotent producer's state is broken (fenced, out of sequence, closed): start a fresh one
            # for the next attempt (what the old one still had in flight is then sent again).
            self._producer, self._stuck = None, []
            await _stop_quietly(producer)
        remaining = [line for line, _ in self._stuck] + failed + unsent
        raise SinkWriteError([line + b"\n" for line in remaining], failure)

    async def sync(self) -> None:
        """Nothing to do: :meth:`write` returns only once the replicas acknowledged."""

    async def close(self) -> None:
        """Stop the producer (every accepted line was acknowledged or given up on by now)."""
        producer, self._producer = self._producer, None
        self._stuck = []
        if producer is not None:
            await _stop_quietly(producer)


def _fatal(error: BaseException) -> bool:
    from aiokafka import errors

    fatal = (errors.ProducerFenced, errors.OutOfOrderSequenceNumber, errors.InvalidProducerEpoch,
             errors.InvalidProducerIdMapping, errors.ProducerClosed, errors.IllegalStateError)
    return isinstance(error, fatal)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        async with asyncio.timeout(10):
            await producer.stop()
    except Exception as error:  # closing a producer whose broker is gone must not stop the router's shutdown
        log.warning("kafka producer: stopping failed: %s", error)
