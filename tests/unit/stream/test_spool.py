"""The disk spool: FIFO order, reopen, torn-tail recovery, overflow policy, ack semantics."""

from __future__ import annotations

import asyncio

import pytest

from podwatch.errors import PodwatchError
from podwatch.stream.spool import FRAME_HEADER, Spool, SpoolRecord, encode_frame


def rec(i: int, device: str = "pdu-01", size: int = 20) -> SpoolRecord:
    return SpoolRecord("podwatch.telemetry.v1", device.encode(), f"{i:08d}".encode().ljust(size, b"."))


def drain_all(spool: Spool, max_records: int = 7) -> list[SpoolRecord]:
    out = []
    while (batch := spool.read_batch(max_records=max_records)) is not None:
        out.extend(batch.records)
        spool.ack(batch)
    return out


def segment_files(path):
    return sorted(p for p in path.iterdir() if p.name.startswith("seg-"))


def test_fifo_order_across_segments(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200) as spool:
        for i in range(0, 100, 10):
            assert spool.append([rec(j) for j in range(i, i + 10)]) == 10
        assert len(segment_files(tmp_path)) > 5  # it really rolled
        assert spool.pending_records == 100
        assert [r.value[:8] for r in drain_all(spool)] == [f"{i:08d}".encode() for i in range(100)]
        assert spool.pending_records == 0
        assert spool.disk_bytes == 0
        assert len(segment_files(tmp_path)) == 1  # emptied: one fresh file


def test_key_none_and_topic_round_trip(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append([SpoolRecord("t.a", None, b""), SpoolRecord("t.b", b"k", b"v" * 70_000)])
        assert drain_all(spool) == [SpoolRecord("t.a", None, b""), SpoolRecord("t.b", b"k", b"v" * 70_000)]


def test_unacked_records_survive_reopen_and_acked_ones_do_not_return(tmp_path):
    spool = Spool(tmp_path, segment_bytes=300)
    spool.append([rec(i) for i in range(50)])
    batch = spool.read_batch(max_records=20)
    spool.ack(batch)
    spool.read_batch(max_records=10)  # read but never acked (Kafka did not answer): must come back
    spool.close()
    with Spool(tmp_path, segment_bytes=300) as reopened:
        assert reopened.pending_records == 30
        assert [r.value[:8] for r in drain_all(reopened)] == [f"{i:08d}".encode() for i in range(20, 50)]


def test_torn_tail_is_detected_and_truncated(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append([rec(i) for i in range(10)])
    seg = segment_files(tmp_path)[-1]
    whole = seg.read_bytes()
    partial = encode_frame(rec(10))[:-5]  # a crash in the middle of a write
    seg.write_bytes(whole + partial)
    with Spool(tmp_path) as spool:
        assert spool.truncated_bytes == len(partial)
        assert spool.pending_records == 10
        assert seg.stat().st_size == len(whole)
        spool.append([rec(11)])  # appends continue on a clean frame boundary
        assert [r.value[:8] for r in drain_all(spool)][-2:] == [b"00000009", b"00000011"]


def test_corrupt_crc_ends_the_segment(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append([rec(i) for i in range(5)])
    seg = segment_files(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    frame_len = len(encode_frame(rec(0)))
    data[3 * frame_len + FRAME_HEADER.size + 4] ^= 0xFF  # flip a bit in the 4th record's body
    seg.write_bytes(bytes(data))
    with Spool(tmp_path) as spool:
        assert spool.pending_records == 3
        assert spool.truncated_bytes == 2 * frame_len
        assert [r.value[:8] for r in drain_all(spool)] == [b"00000000", b"00000001", b"00000002"]


def test_garbage_length_header_is_a_torn_tail(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append([rec(0)])
    seg = segment_files(tmp_path)[-1]
    seg.write_bytes(seg.read_bytes() + b"\xff\xff\xff\x7f\x00\x00")
    with Spool(tmp_path) as spool:
        assert spool.pending_records == 1
        assert spool.truncated_bytes == 6


def test_overflow_refuses_new_records_and_counts_them(tmp_path):
    frame = len(encode_frame(rec(0)))
    with Spool(tmp_path, max_bytes=frame * 10, segment_bytes=frame * 4) as spool:
        assert spool.append([rec(i) for i in range(7)]) == 7
        assert spool.append([rec(i) for i in range(7, 14)]) == 3  # budget: 10 frames
        assert spool.dropped == 4
        assert spool.append([rec(99)]) == 0
        assert spool.dropped == 5
        assert spool.disk_bytes <= spool.max_bytes
        # the oldest data is kept (stated policy) and space comes back once acked
        first = spool.read_batch(max_records=4)
        assert [r.value[:8] for r in first.records] == [f"{i:08d}".encode() for i in range(4)]
        spool.ack(first)
        assert spool.append([rec(100)]) == 1
        values = [r.value[:8] for r in drain_all(spool)]
        assert values == [f"{i:08d}".encode() for i in range(4, 10)] + [b"00000100"]


def test_one_process_per_spool_dir(tmp_path):
    with Spool(tmp_path):
        with pytest.raises(PodwatchError, match="in use"):
            Spool(tmp_path)
    Spool(tmp_path).close()  # released on close


def test_missing_cursor_resends_from_the_oldest_segment(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append([rec(i) for i in range(5)])
        batch = spool.read_batch(max_records=2)
        spool.ack(batch)
    (tmp_path / "cursor").unlink()
    with Spool(tmp_path) as spool:
        assert spool.pending_records == 5  # duplicates (dropped by the sink), never a loss


async def test_flush_group_commit(tmp_path):
    spool = Spool(tmp_path, fsync=True)
    try:
        async def one(i):
            spool.append([rec(i)])
            await spool.flush()

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 10)
        assert spool._synced_gen == spool._write_gen == 200
    finally:
        spool.close()
    with Spool(tmp_path) as spool:
        assert spool.pending_records == 200


def test_close_is_idempotent_and_use_after_close_fails(tmp_path):
    spool = Spool(tmp_path)
    spool.close()
    spool.close()
    with pytest.raises(PodwatchError, match="closed"):
        spool.append([rec(0)])


def test_a_record_that_cannot_be_framed_writes_nothing(tmp_path):
    with Spool(tmp_path) as spool:
        with pytest.raises(ValueError, match="topic name longer"):
            spool.append([rec(0), SpoolRecord("t" * 300, None, b"x")])
        assert spool.pending_records == 0 and spool.disk_bytes == 0
        spool.append([rec(1)])
        assert [r.value[:8] for r in drain_all(spool)] == [b"00000001"]
