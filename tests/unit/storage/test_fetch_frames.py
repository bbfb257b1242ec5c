"""The fetch process's frames: a decoded batch crosses a real pipe and arrives as the same rows."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import orjson
import pytest

from podwatch.samples import Quality, Reading
from podwatch.storage.decode import decode_messages
from podwatch.storage.fetch import FetchedBatch, FetchReport
from podwatch.storage.fetch_process import pack_report, recv_frame, send_frame, unpack_report

T0 = 1_764_000_000_000


def _through_a_pipe(obj):
    receiving, sending = multiprocessing.Pipe(duplex=False)
    received = []
    reader = threading.Thread(target=lambda: received.append(recv_frame(receiving)))
    reader.start()  # a big frame fills the pipe: someone must read while it is written
    send_frame(sending, obj)
    reader.join(10)
    sending.close()
    receiving.close()
    return received[0]


@pytest.mark.parametrize("readings", [
    [Reading("s", "pdu-1", 2**64 - 1, T0, {"a_kw": 1.5, "b_kw": None}),
     Reading("s", "cdu-2", 0, T0 + 1, {"flow_lpm": 20.25}, Quality.STALE)],
    [Reading("s", f"pdu-{d}", seq, T0 + seq * 1000, {f"m{k}_kw": seq + k / 8 for k in range(25)})
     for seq in range(200) for d in range(50)],  # ~5 MB of columns: several pipe buffers
    [],
], ids=["uint64-seq-null-point-stale", "big", "empty"])
@pytest.mark.parametrize("rows_built", [False, True], ids=["row-parts", "rows"])
def test_a_packed_report_crosses_the_pipe_unchanged(readings, rows_built):
    batch = decode_messages([orjson.dumps(r.to_envelope()) for r in readings] or [b"not json"])
    batch.rejected = []
    if rows_built:  # the fetch process sends the parts the rows are built from, or rows if built
        batch.rows  # noqa: B018
    report = FetchReport(FetchedBatch(batch, {0: 7, 2: 9}, {0: T0}, len(readings), 1, "s", fetched_at=123.5),
                         {0: 3, 2: 0}, new_topic_resets=1, new_fetch_errors=2)
    got = unpack_report(_through_a_pipe(pack_report(report)))
    assert (got.lag, got.new_topic_resets, got.new_fetch_errors) == ({0: 3, 2: 0}, 1, 2)
    fb = got.batch
    assert (fb.next_offsets, fb.newest_ms, fb.messages, fb.dead_letters, fb.own_site, fb.fetched_at) == (
        {0: 7, 2: 9}, {0: T0}, len(readings), 1, "s", 123.5)
    assert fb.batch.rows.equals(batch.rows)  # same values, dtypes (Categorical, uint64 seq), order
    assert fb.batch.rows.schema == batch.rows.schema
    assert np.array_equal(fb.batch.row_reading, batch.row_reading)
    assert (fb.batch.devices, fb.batch.seqs, fb.batch.ts_ms, fb.batch.sites) == (
        batch.devices, batch.seqs, batch.ts_ms, batch.sites)


def test_a_report_without_a_batch_carries_the_consumer_state():
    got = unpack_report(_through_a_pipe(pack_report(FetchReport(None, {1: 5}, 0, 0))))
    assert got.batch is None and got.lag == {1: 5}
