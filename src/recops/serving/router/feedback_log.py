"""The durable feedback log: JSONL lines in the event-log contract, written by one background task.

Handlers call :meth:`FeedbackLog.offer` (synchronous, O(1)): an event is *accepted* when it enters
the bounded in-memory queue, and refused (the caller answers 503) when the queue is full — never
dropped silently. One writer task takes everything queued and hands it to a :class:`Sink`: by default
:class:`FileSink`, which appends to the file with one ``write`` on a worker thread, so the event loop
never waits on the disk; or a Kafka topic (:mod:`recops.serving.router.kafka_sink`). Whatever the
sink, a failed write is retried with back-off until it succeeds (the queue fills meanwhile, then the
router answers 503), and closing delivers everything accepted.

Lines follow :mod:`recops.data.schema` (``user_id, item_id, event, timestamp, request_id, value``)
plus ``arm`` and ``experiment``; :func:`recops.data.io.read_events` reads the files as they are.

Durability (``fsync``): ``always`` fsyncs after every write, ``interval`` (default) at most
``fsyncIntervalSeconds`` after a write, ``never`` leaves it to the OS. Closing always writes and
fsyncs everything accepted, so after a clean shutdown every accepted event is on disk.

Rotation: before a write that would take the file past ``rotateBytes``, the file is fsynced and
renamed to ``<stem>-<UTC time YYYYmmddTHHMMSSffffffZ>[-n]<suffix>`` beside it (names sort in time
order) and a new file is started. Rotation never splits a request's lines, so a file may exceed the
limit by one request. A path that is not a regular file (a FIFO, ``/dev/stdout``) is never rotated
or fsynced.

A crash can leave a partial last line; on start a newline is appended after it, so the damage stays
one malformed line (which ``read_events`` marks) instead of merging with the next event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger("recops.router")

FsyncPolicy = Literal["always", "interval", "never"]
_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # back-off between failed writes (disk full, I/O error, broker down)
_CLOSE_RETRIES = 3  # at shutdown, give up on a broken disk (or an unreachable broker) after this many failed writes


class SinkWriteError(Exception):
    """A write that failed, perhaps part-way: ``remaining`` is what the sink did not take (to retry)."""

    def __init__(self, remaining: list[bytes], cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.remaining = remaining
        self.cause = cause


class Sink(Protocol):
    """Where the writer task puts accepted lines; one call at a time, from the writer task only.

    ``write`` takes blobs of whole newline-terminated JSONL lines and returns once they are durable
    (for a file: written, and fsynced when ``sync`` runs; for Kafka: acknowledged by the in-sync
    replicas); on failure it raises :class:`SinkWriteError` naming what is still to be written.
    """

    description: str  # for log messages: the file path, or kafka://servers/topic
    needs_sync: bool  # False when write alone makes lines durable: the fsync policy then does nothing

    async def open(self) -> None: ...

    async def write(self, blobs: list[bytes]) -> None: ...

    async def sync(self) -> None: ...

    async def close(self) -> None: ...


class _PartialWrite(OSError):
    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(error.errno, error.strerror)
        self.written = written


class LogFile:
    """The open log file (blocking I/O: called on a worker thread, one call at a time)."""

    def __init__(self, path: Path, rotate_bytes: int) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.fd = -1
        self.size = 0
        self.regular = True
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        info = os.fstat(self.fd)
        self.regular = stat.S_ISREG(info.st_mode)
        self.size = info.st_size if self.regular else 0
        if self.size and not self._ends_with_newline():
            self._write_all(b"\n")  # isolate a partial line left by a crash

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as existing:
            existing.seek(-1, os.SEEK_END)
            return existing.read(1) == b"\n"

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):
            try:
                written += os.write(self.fd, view[written:])
            except OSError as error:
                self.size += written
                raise _PartialWrite(written, error) from error
        self.size += written

    def write(self, blobs: list[bytes]) -> None:
        """Append blobs (each one or more whole lines), rotating between blobs when the file is full.

        On failure raises :class:`_PartialWrite` with the number of bytes of ``blobs`` already written.
        """
        done = 0

        def put(data: bytes) -> None:
            nonlocal done
            try:
                self._write_all(data)
            except _PartialWrite as error:
                raise _PartialWrite(done + error.written, error) from error
            done += len(data)

        try:
            if self.fd < 0:  # a failed rotation could not reopen the file: try again
                self._open()
            if not (self.regular and self.rotate_bytes):
                put(b"".join(blobs))
                return
            start, pending = 0, 0
            for index, blob in enumerate(blobs):
                if self.size + pending + len(blob) > self.rotate_bytes and self.size + pending > 0:
                    if pending:
                        put(b"".join(blobs[start:index]))
                    self.rotate()
                    start, pending = index, 0
                pending += len(blob)
            put(b"".join(blobs[start:]))
        except _PartialWrite:
            raise
        except OSError as error:
            raise _PartialWrite(done, error) from error

    def sync(self) -> None:
        if self.regular:
            os.fsync(self.fd)

    def rotate(self) -> Path:
        """Close the current file under a timestamped name and start a new one."""
        self.sync()
        os.close(self.fd)
        self.fd = -1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.stem}-{stamp}-{n}{self.path.suffix}")
        try:
            os.rename(self.path, target)
        finally:
            self._open()  # a failed rename keeps appending to the same file
        self._sync_directory()
        return target

    def _sync_directory(self) -> None:
        # The rename and the new file's directory entry are durable only once the directory is.
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = -1


class FileSink:
    """The JSONL file (:class:`LogFile`), its blocking calls run on a worker thread."""

    needs_sync = True

    def __init__(self, path: Path, rotate_bytes: int = 0) -> None:
        self.path = path
        self.description = str(path)
        self.rotate_bytes = rotate_bytes
        self._file: LogFile | None = None

    async def open(self) -> None:
        """Open (creating folders); raises OSError when the file cannot be opened."""
        self._file = await asyncio.to_thread(LogFile, self.path, self.rotate_bytes)

    async def write(self, blobs: list[bytes]) -> None:
        """Append the blobs; on failure the remaining bytes (not on disk yet) are what to retry."""
        assert self._file is not None
        try:
            await asyncio.to_thread(self._file.write, blobs)
        except OSError as error:
            written = error.written if isinstance(error, _PartialWrite) else 0
            raise SinkWriteError([b"".join(blobs)[written:]], error) from error

    async def sync(self) -> None:
        """fsync the file."""
        assert self._file is not None
        await asyncio.to_thread(self._file.sync)

    async def close(self) -> None:
        """fsync and close."""
        if self._file is not None:
            await asyncio.to_thread(self._file.close)


class FeedbackLog:
    """Bounded queue of JSONL lines in front of a :class:`Sink` (a file by default), drained by one writer task."""

    def __init__(
        self,
        target: Path | Sink,
        *,
        capacity: int,
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 1.0,
        rotate_bytes: int = 0,
        on_written: Callable[[int], None] | None = None,
        on_write_error: Callable[[], None] | None = None,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        """``target``: a file path (a :class:`FileSink` with ``rotate_bytes``) or any :class:`Sink`."""
        self.sink: Sink = FileSink(target, rotate_bytes) if isinstance(target, Path) else target
        self.capacity = capacity
        # A sink whose writes are already durable (Kafka, acks=all) has nothing to fsync.
        self.fsync: FsyncPolicy = fsync if self.sink.needs_sync else "never"
        self.fsync_interval_s = fsync_interval_s
        self._on_written = on_written
        self._on_write_error = on_write_error
        self._on_lost = on_lost
        self._pending: list[bytes] = []
        self._pending_lines = 0
        self._open = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Events accepted and not yet handed to the disk."""
        return self._pending_lines

    def offer(self, blob: bytes, lines: int = 1, headroom: int = 0) -> bool:
        """Accept ``lines`` JSONL lines (``blob``, newline-terminated) unless the queue is full.

        ``headroom``: refuse unless that many slots stay free afterwards (lets impressions leave room
        for feedback). All or nothing: a refused blob is not queued at all.
        """
        if not self._open or self._pending_lines + lines + headroom > self.capacity:
            return False
        self._pending.append(blob)
        self._pending_lines += lines
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.is_set():
            wakeup.set()
        return True

    async def start(self) -> None:
        """Open the sink (a file: creating folders; raises OSError) and start the writer task."""
        await self.sink.open()
        self._wakeup = asyncio.Event()
        self._open = True
        self._task = asyncio.create_task(self._run(), name="recops-feedback-log")

    async def close(self) -> None:
        """Stop accepting, write (and fsync) everything accepted, close the sink."""
        if self._task is None:
            return
        self._open = False
        assert self._wakeup is not None
        self._wakeup.set()
        await self._task
        self._task = None

    async def _run(self) -> None:
        assert self._wakeup is not None
        sink, wakeup = self.sink, self._wakeup
        dirty_since: float | None = None  # monotonic time of the first write not yet fsynced
        try:
            while True:
                if not self._pending:
                    if not self._open:
                        break
                    timeout = None
                    if dirty_since is not None:  # only "interval" leaves writes unsynced this long
                        timeout = max(0.0, dirty_since + self.fsync_interval_s - time.monotonic())
                    try:
                        async with asyncio.timeout(timeout):
                            await wakeup.wait()
                    except TimeoutError:
                        await sink.sync()
                        dirty_since = None
                        continue
                wakeup.clear()
                batch, lines = self._pending, self._pending_lines
                self._pending, self._pending_lines = [], 0
                if not await self._write(batch, lines):
                    break
                if self.fsync == "always":
                    await sink.sync()
                elif self.fsync == "interval":
                    now = time.monotonic()
                    if dirty_since is None:
                        dirty_since = now
                    elif now - dirty_since >= self.fsync_interval_s:
                        await sink.sync()
                        dirty_since = None
        finally:
            await sink.close()

    async def _write(self, batch: list[bytes], lines: int) -> bool:
        """Write one batch, retrying a failing sink; False when it had to give up (only while closing)."""
        failures = 0
        closing_failures = 0  # the shutdown's own attempts: failures while still open do not use them up
        where = self.sink.description
        while True:
            try:
                await self.sink.write(batch)
            except SinkWriteError as error:
                batch = error.remaining  # retry only what the sink did not take
                failures += 1
                if self._on_write_error is not None:
                    self._on_write_error()
                if failures == 1:
                    log.error("feedback log %s: write failed (%s); retrying, the queue fills meanwhile", where, error)
                closing_failures += not self._open
                if closing_failures >= _CLOSE_RETRIES:
                    lost = sum(blob.count(b"\n") for blob in batch) + self._pending_lines
                    log.error("feedback log %s: giving up at shutdown; %d accepted events lost", where, lost)
                    if self._on_lost is not None:
                        self._on_lost(lost)
                    return False
                await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S)) - 1])
                continue
            if failures:
                log.warning("feedback log %s: writing again after %d failed attempts", where, failures)
            if self._on_written is not None:
                self._on_written(lines)
            return True
