"""``recops feedback pull``: the router's Kafka feedback events into a JSONL file, for ``recops retrain``.

One pull reads, for one consumer group, every message after the group's committed offsets up to the
end offsets the partitions had when the pull started (later messages wait for the next pull), appends
them to the output file as JSONL lines (the messages' values: the file log's lines), fsyncs the file
and its folder, and only THEN commits the end offsets. So:

* a rerun reads only newer events (the group's offsets moved);
* a crash before the commit re-reads the same events next time; they are then in the file twice,
  and ``recops retrain`` merges each event once (user, item, event, timestamp, request_id);
* nothing is lost: offsets never move past what is durably on disk.

The file is appended to, never truncated, so a pull never destroys events an earlier pull wrote and no
retrain read yet. A partial last line left by a crash is isolated on a line of its own (as the router's
file log does; ``read_events`` marks it malformed).

The consumer assigns the topic's partitions itself (no group membership, so no rebalance wait); the
group is used for its committed offsets only. Run one pull per group at a time.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from recops.serving.router.feedback_log import LogFile

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer


class PullError(RuntimeError):
    """The pull could not run (unreachable broker, missing topic, bad argument); nothing was committed."""


@dataclass
class PullResult:
    """What one pull did: events appended, and per partition the offsets it read from and committed."""

    events: int
    out: Path
    start_offsets: dict[int, int] = field(default_factory=dict)
    end_offsets: dict[int, int] = field(default_factory=dict)


def pull_feedback(
    bootstrap_servers: str, topic: str, group: str, out: Path, *, timeout_s: float = 30.0
) -> PullResult:
    """Append the group's new messages on ``topic`` to ``out`` (fsynced), then commit; see the module doc.

    Raises :class:`PullError` (naming the address or topic) when the broker cannot be reached in
    ``timeout_s``, the topic does not exist, or reading stalls.
    """
    if not bootstrap_servers.strip():
        raise PullError("--kafka: give the broker's host:port (comma-separated for several)")
    if not topic:
        raise PullError("--topic: empty")
    if not group:
        raise PullError("--group: empty")
    return asyncio.run(_pull(bootstrap_servers, topic, group, out, timeout_s))


async def _pull(bootstrap_servers: str, topic: str, group: str, out: Path, timeout_s: float) -> PullResult:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        bootstrap_servers=[server.strip() for server in bootstrap_servers.split(",")],
        group_id=group,
        enable_auto_commit=False,  # offsets move only after the file is fsynced
        auto_offset_reset="earliest",
        request_timeout_ms=int(timeout_s * 1000),
        client_id="recops-feedback-pull",
    )
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await consumer.start()
        except (KafkaError, OSError, TimeoutError) as error:
            raise PullError(f"cannot reach the Kafka broker at {bootstrap_servers}: "
                            f"{error or type(error).__name__}") from None
        try:
            async with asyncio.timeout(timeout_s):
                return await _read_and_commit(consumer, topic, out)
        except TimeoutError:
            raise PullError(f"kafka {bootstrap_servers} topic {topic}: no progress in {timeout_s:.0f} s; "
                            "nothing committed") from None
        except KafkaError as error:
            raise PullError(f"kafka {bootstrap_servers} topic {topic}: {error}; nothing committed") from None
    finally:
        try:
            async with asyncio.timeout(10):
                await consumer.stop()
        except Exception:  # the pull's outcome is already decided; a failed close must not mask it
            pass


async def _read_and_commit(consumer: AIOKafkaConsumer, topic: str, out: Path) -> PullResult:
    from aiokafka import TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    # aiokafka's public topics() drops the partition lists it fetched, and partitions_for_topic() only
    # knows subscribed topics: ask the client for the metadata itself (tested against a real broker).
    cluster = await consumer._client.fetch_all_metadata()
    if topic not in cluster.topics():
        raise PullError(f"--topic: no topic {topic!r} on the broker (the router creates it with its first event)")
    partitions = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
    consumer.assign(partitions)
    ends = await consumer.end_offsets(partitions)  # the pull stops here: later events wait for the next one
    beginnings = await consumer.beginning_offsets(partitions)
    result = PullResult(0, out)
    todo: dict[TopicPartition, int] = {}
    for tp in partitions:
        committed = await consumer.committed(tp)
        # Nothing committed yet, or the committed offset's messages already expired: from the oldest kept.
        start = beginnings[tp] if committed is None or committed < beginnings[tp] else committed
        # max(): never move a group's offset backwards (a committed offset past the end means a recreated topic).
        result.start_offsets[tp.partition], result.end_offsets[tp.partition] = start, max(start, ends[tp])
        if start < ends[tp]:
            consumer.seek(tp, start)
            todo[tp] = ends[tp]
    if not todo:
        return result
    consumer.pause(*[tp for tp in partitions if tp not in todo])
    log = await asyncio.to_thread(LogFile, out, 0)
    try:
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=1000)
            blobs: list[bytes] = []
            for tp, records in batches.items():
                end = todo.get(tp)
                if end is None:
                    continue
                for record in records:
                    if record.offset < end and record.value is not None:
                        blobs.append(record.value.rstrip(b"\n") + b"\n")
            if blobs:
                await asyncio.to_thread(log.write, blobs)
                result.events += len(blobs)
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:  # past the end (gaps: compaction, markers)
                    consumer.pause(tp)
                    del todo[tp]
        await asyncio.to_thread(log.sync)
    finally:
        await asyncio.to_thread(log.close)
    await asyncio.to_thread(_sync_directory, out.parent)  # a newly created file's name must be durable too
    offsets = {TopicPartition(topic, p): OffsetAndMetadata(end, "") for p, end in result.end_offsets.items()}
    await consumer.commit(offsets)
    return result


def _sync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

