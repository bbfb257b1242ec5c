"""The producer's durable store-and-forward spool: an append-only, FIFO, crash-safe queue of Kafka
records on local disk, used while Kafka is unreachable.

Layout of a spool directory (one producer per directory, enforced with a `flock` on `lock`):
    seg-00000000000000000001.spool   append-only segment files, drained in file-number order
    seg-00000000000000000002.spool
    cursor                           "<segment> <offset>": everything before it was acked by Kafka
    lock

Record frame: `<u32 length><u32 crc32(body)>` then the body `<u8 topic_len><u16 key_len>topic key
value` (key_len 0xFFFF = no key), little endian. On open every segment is scanned from the cursor;
a frame that is incomplete or fails its CRC (a torn write at a crash) ends the segment: the file
is truncated there, the lost bytes are counted in `truncated_bytes` and logged.

Durability: `append()` writes with `os.write` (in the OS page cache at return: a process crash
loses nothing); `await flush()` fsyncs (group commit: one fsync covers every append before it,
run in a thread). The producer awaits `flush()` before `send()` returns, so with `fsync=True`
(the default) a spooled reading also survives a power loss. The cursor file is replaced
atomically but not fsynced: a stale cursor after a power loss only re-sends acked records, which
the sink drops as duplicates by (device, seq) — never a loss.

Records are deleted only after Kafka acked them: `read_batch()` returns the oldest records
without removing them, `ack(batch)` moves the cursor past them and deletes segments that are
wholly acked (and every file once the spool is empty).

Overflow policy (stated, counted, never silent): the spool holds at most `max_bytes` on disk.
When a record does not fit, it and every later record of the same `append()` are refused and
counted in `dropped`; `append()` returns how many it accepted. The oldest data is kept because
FIFO drain and per-device order depend on it; the sink sees the hole as a sequence gap. Space
frees up as the drainer acks and deletes segments.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from podwatch.errors import PodwatchError
from podwatch.logs import fields

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("<II")  # body length, crc32(body)
BODY_HEADER = struct.Struct("<BH")  # topic length, key length
NO_KEY = 0xFFFF
MAX_BODY_BYTES = 64 * 1024 * 1024  # sanity bound: a larger length field is corruption
SEGMENT_PREFIX, SEGMENT_SUFFIX = "seg-", ".spool"


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    topic: str
    key: bytes | None
    value: bytes


@dataclass(slots=True)
class SpoolBatch:
    """The oldest un-acked records; `end` = (segment, offset) just past the last one."""

    records: list[SpoolRecord]
    end: tuple[int, int]

    def __len__(self) -> int:
        return len(self.records)


@dataclass(slots=True)
class _Segment:
    seg_id: int
    path: Path
    size: int  # bytes on disk (valid frames only after recovery)
    records: int  # frames in the file


def encode_frame(record: SpoolRecord) -> bytes:
    topic = record.topic.encode()
    if len(topic) > 255:
        raise ValueError(f"topic name longer than 255 bytes: {record.topic[:40]}...")
    key = record.key
    if key is not None and len(key) >= NO_KEY:
        raise ValueError(f"record key of {len(key)} bytes is too long for the spool (< 65535)")
    body = b"".join((BODY_HEADER.pack(len(topic), NO_KEY if key is None else len(key)), topic, key or b"", record.value))
    return FRAME_HEADER.pack(len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes | memoryview) -> SpoolRecord:
    topic_len, key_len = BODY_HEADER.unpack_from(body, 0)
    pos = BODY_HEADER.size
    topic = bytes(body[pos:pos + topic_len]).decode()
    pos += topic_len
    if key_len == NO_KEY:
        key = None
    else:
        key = bytes(body[pos:pos + key_len])
        pos += key_len
    return SpoolRecord(topic, key, bytes(body[pos:]))


def _scan(data: bytes, start: int = 0):
    """Yield (frame_start, frame_end, body) of valid frames; stop at the first torn/corrupt one."""
    pos, end = start, len(data)
    view = memoryview(data)
    while pos + FRAME_HEADER.size <= end:
        length, crc = FRAME_HEADER.unpack_from(data, pos)
        body_start = pos + FRAME_HEADER.size
        if length < BODY_HEADER.size or length > MAX_BODY_BYTES or body_start + length > end:
            return
        body = view[body_start:body_start + length]
        if zlib.crc32(body) != crc:
            return
        yield pos, body_start + length, body
        pos = body_start + length


class Spool:
    """FIFO on-disk record queue. Not thread-safe: use it from one asyncio event loop.

    Lifecycle: `Spool(dir, ...)` opens (locks, recovers); `append`, `await flush`,
    `read_batch`, `ack` any number of times; `close()` (idempotent) fsyncs and unlocks."""

    def __init__(self, directory: str | Path, max_bytes: int = 256 * 1024 * 1024,
                 segment_bytes: int = 8 * 1024 * 1024, fsync: bool = True) -> None:
        if segment_bytes > max_bytes:
            raise ValueError(f"segment_bytes {segment_bytes} > max_bytes {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.dropped = 0  # records refused by the overflow policy (since open)
        self.truncated_bytes = 0  # torn/corrupt bytes removed at open
        self.pending_records = 0
        self._segments: dict[int, _Segment] = {}  # insertion order = FIFO order
        self._cursor = (0, 0)
        self._tail_fd: int | None = None
        self._retired_fds: list[int] = []  # rolled-over fds, closed when no fsync is running
        self._write_gen = 0
        self._synced_gen = 0
        self._dir_dirty = False
        self._sync_task: asyncio.Task | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._open()

    # ------------------------------------------------------------------ open / recover

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise PodwatchError(f"spool {self.directory} is in use by another producer process") from None
            raise
        ids = self._all_segment_ids()
        cursor = self._read_cursor()
        if not ids or cursor[0] not in ids:
            # no cursor, or its segment was deleted after it was fully acked: start at the oldest file
            cursor = (ids[0], 0) if ids else (1, 0)
        ids = [i for i in ids if i >= cursor[0]]
        for seg_id in [i for i in self._all_segment_ids() if i < cursor[0]]:
            self._unlink(seg_id)  # wholly acked; a crash came between the ack and the delete
        for seg_id in ids:
            path = self._path(seg_id)
            data = path.read_bytes()
            start = min(cursor[1], len(data)) if seg_id == cursor[0] else 0
            if seg_id == cursor[0]:
                cursor = (seg_id, start)
            valid_end, count = start, 0
            for _, frame_end, _ in _scan(data, start):
                valid_end = frame_end
                count += 1
            if valid_end < len(data):
                lost = len(data) - valid_end
                self.truncated_bytes += lost
                log.warning("spool segment had a torn or corrupt tail; truncated it",
                            extra=fields(segment=path.name, kept_bytes=valid_end, lost_bytes=lost))
                with open(path, "r+b") as fh:
                    fh.truncate(valid_end)
                    os.fsync(fh.fileno())
            self._segments[seg_id] = _Segment(seg_id, path, valid_end, count)
            self.pending_records += count
        self._cursor = cursor
        if not self._segments:
            self._new_segment(cursor[0])
            self._cursor = (cursor[0], 0)
        tail = next(reversed(self._segments.values()))
        self._tail_fd = os.open(tail.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.pending_records:
            log.info("spool opened with records to drain", extra=fields(spool=str(self.directory),
                     records=self.pending_records, bytes=self.pending_bytes))

    def _all_segment_ids(self) -> list[int]:
        return sorted(int(p.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]) for p in self.directory.iterdir()
                      if p.name.startswith(SEGMENT_PREFIX) and p.name.endswith(SEGMENT_SUFFIX)
                      and p.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)].isdigit())

    def _path(self, seg_id: int) -> Path:
        return self.directory / f"{SEGMENT_PREFIX}{seg_id:020d}{SEGMENT_SUFFIX}"

    def _read_cursor(self) -> tuple[int, int]:
        try:
            seg, off = (self.directory / "cursor").read_text().split()
            return int(seg), int(off)
        except (OSError, ValueError):
            return (-1, 0)  # missing or unreadable: re-send from the oldest segment (duplicates, never loss)

    def _write_cursor(self) -> None:
        tmp = self.directory / "cursor.tmp"
        tmp.write_text(f"{self._cursor[0]} {self._cursor[1]}\n")
        os.replace(tmp, self.directory / "cursor")

    def _new_segment(self, seg_id: int) -> _Segment:
        path = self._path(seg_id)
        path.touch()
        seg = _Segment(seg_id, path, 0, 0)
        self._segments[seg_id] = seg
        self._dir_dirty = True
        return seg

    def _unlink(self, seg_id: int) -> None:
        try:
            self._path(seg_id).unlink()
        except FileNotFoundError:
            pass
        self._dir_dirty = True

    # ------------------------------------------------------------------ sizes

    @property
    def disk_bytes(self) -> int:
        """Bytes in segment files (acked parts of the head segment included): what max_bytes bounds."""
        return sum(s.size for s in self._segments.values())

    @property
    def pending_bytes(self) -> int:
        """Bytes of records not yet acked."""
        return self.disk_bytes - self._cursor[1]

    def __len__(self) -> int:
        return self.pending_records

    # ------------------------------------------------------------------ append / flush

    def append(self, records: list[SpoolRecord]) -> int:
        """Write records at the tail; return how many were accepted (the rest are counted in
        `dropped`, see the overflow policy). Durable against a process crash on return; await
        `flush()` for durability against power loss."""
        self._check_open()
        frames = [encode_frame(record) for record in records]  # a bad record raises before anything is written
        disk = self.disk_bytes
        tail = next(reversed(self._segments.values()))
        chunk: list[bytes] = []
        chunk_bytes = 0
        accepted = 0
        for frame in frames:
            if disk + len(frame) > self.max_bytes:
                refused = len(records) - accepted
                self.dropped += refused
                log.warning("spool full: records refused", extra=fields(spool=str(self.directory), refused=refused,
                            max_bytes=self.max_bytes, dropped_total=self.dropped))
                break
            if tail.size + chunk_bytes + len(frame) > self.segment_bytes and tail.size + chunk_bytes > 0:
                self._write_all(chunk)
                tail.size += chunk_bytes
                chunk, chunk_bytes = [], 0
                tail = self._roll()
            chunk.append(frame)
            chunk_bytes += len(frame)
            tail.records += 1
            disk += len(frame)
            accepted += 1
        if chunk:
            self._write_all(chunk)
            tail.size += chunk_bytes
        self.pending_records += accepted
        if accepted:
            self._write_gen += 1
        return accepted

    def _write_all(self, frames: list[bytes]) -> None:
        data = memoryview(b"".join(frames))
        while data:
            written = os.write(self._tail_fd, data)
            data = data[written:]

    def _roll(self) -> _Segment:
        old_fd = self._tail_fd
        if self.fsync:
            os.fsync(old_fd)  # rare (once per segment); keeps flush() about the tail only
        self._retired_fds.append(old_fd)
        last = next(reversed(self._segments))
        seg = self._new_segment(last + 1)
        self._tail_fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._close_retired()
        return seg

    def _close_retired(self) -> None:
        if self._sync_task is None:  # never close an fd a thread may be fsyncing
            for fd in self._retired_fds:
                os.close(fd)
            self._retired_fds.clear()

    async def flush(self) -> None:
        """Return once every record appended before the call is fsynced (no-op with fsync=False).
        Concurrent callers share one fsync (group commit)."""
        if not self.fsync:
            return
        target = self._write_gen
        while self._synced_gen < target and not self._closed:
            if self._sync_task is None:
                self._sync_task = asyncio.get_running_loop().create_task(self._sync_once())
            await asyncio.shield(self._sync_task)

    async def _sync_once(self) -> None:
        try:
            gen, fd, dir_dirty = self._write_gen, self._tail_fd, self._dir_dirty
            self._dir_dirty = False
            await asyncio.to_thread(self._fsync_files, fd, dir_dirty)
            self._synced_gen = max(self._synced_gen, gen)
        finally:
            self._sync_task = None
            if not self._closed:
                self._close_retired()

    def _fsync_files(self, fd: int, dir_dirty: bool) -> None:
        os.fsync(fd)
        if dir_dirty:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # ------------------------------------------------------------------ read / ack

    def read_batch(self, max_records: int = 5000, max_bytes: int = 4 * 1024 * 1024) -> SpoolBatch | None:
        """The oldest un-acked records (at least one, at most max_records / about max_bytes), or
        None when the spool is empty. Nothing is removed until `ack(batch)`."""
        self._check_open()
        if self.pending_records == 0:
            return None
        records: list[SpoolRecord] = []
        read_bytes = 0
        end = self._cursor
        for seg in list(self._segments.values()):
            start = self._cursor[1] if seg.seg_id == self._cursor[0] else 0
            if seg.seg_id < self._cursor[0] or start >= seg.size:
                continue
            with open(seg.path, "rb") as fh:
                fh.seek(start)
                data = fh.read(min(seg.size - start, max(max_bytes - read_bytes, 0) + 64 * 1024))
                if len(data) >= FRAME_HEADER.size:
                    first_frame = FRAME_HEADER.size + FRAME_HEADER.unpack_from(data, 0)[0]
                    if first_frame > len(data):  # one record larger than the chunk: read it whole
                        data += fh.read(min(first_frame, seg.size - start) - len(data))
            for frame_start, frame_end, body in _scan(data):
                records.append(_decode_body(body))
                read_bytes += frame_end - frame_start
                end = (seg.seg_id, start + frame_end)
                if len(records) >= max_records or read_bytes >= max_bytes:
                    return SpoolBatch(records, end)
            if end != (seg.seg_id, seg.size):
                break  # the chunk ended mid-segment; the next read continues from there
        return SpoolBatch(records, end) if records else None

    def ack(self, batch: SpoolBatch) -> None:
        """Kafka acked every record of `batch` (the oldest ones): move the cursor past them and
        delete wholly acked segments. Batches must be acked in the order they were read."""
        self._check_open()
        self.pending_records -= len(batch.records)
        end_seg, end_off = batch.end
        for seg_id in [i for i in self._segments if i < end_seg]:
            del self._segments[seg_id]
            self._unlink(seg_id)
        self._cursor = (end_seg, end_off)
        tail_id = next(reversed(self._segments))
        if self.pending_records == 0:
            # empty: start a fresh file so that the disk budget is free again
            self._retired_fds.append(self._tail_fd)
            for seg_id in list(self._segments):
                del self._segments[seg_id]
                self._unlink(seg_id)
            seg = self._new_segment(tail_id + 1)
            self._tail_fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._cursor = (seg.seg_id, 0)
            self._close_retired()
        elif end_seg != tail_id and end_off >= self._segments[end_seg].size:
            del self._segments[end_seg]
            self._unlink(end_seg)
            self._cursor = (next(iter(self._segments)), 0)
        self._write_cursor()

    # ------------------------------------------------------------------ close

    def _check_open(self) -> None:
        if self._closed:
            raise PodwatchError(f"spool {self.directory} is closed")

    def close(self) -> None:
        """fsync (when enabled), close the files and release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tail_fd is not None:
            if self.fsync:
                try:
                    os.fsync(self._tail_fd)
                except OSError:
                    log.exception("spool fsync at close failed", extra=fields(spool=str(self.directory)))
            os.close(self._tail_fd)
            self._tail_fd = None
        if self._sync_task is None:
            for fd in self._retired_fds:
                os.close(fd)
            self._retired_fds.clear()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
