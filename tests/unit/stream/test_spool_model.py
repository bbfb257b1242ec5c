"""Property test: any sequence of appends, partial drains (acked or not), crashes with a torn tail
and reopens leaves the spool equal to a simple FIFO model."""

from __future__ import annotations

import tempfile
from collections import deque
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podwatch.stream.spool import Spool, SpoolRecord

OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 30)),
    st.tuples(st.just("drain"), st.integers(1, 25), st.booleans()),
    st.tuples(st.just("reopen"), st.integers(0, 40)),  # crash: tear this many garbage bytes onto the tail
), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_spool_behaves_like_a_fifo(ops):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        model: deque[bytes] = deque()
        counter = 0
        spool = Spool(path, max_bytes=1 << 20, segment_bytes=512)
        try:
            for op in ops:
                if op[0] == "append":
                    values = [f"r{counter + i}".encode() * (1 + (counter + i) % 7) for i in range(op[1])]
                    counter += op[1]
                    assert spool.append([SpoolRecord("t", b"k", v) for v in values]) == len(values)
                    model.extend(values)
                elif op[0] == "drain":
                    batch = spool.read_batch(max_records=op[1])
                    expected = [model[i] for i in range(min(op[1], len(model)))]
                    assert (batch.records if batch else []) == [SpoolRecord("t", b"k", v) for v in expected]
                    if batch and op[2]:
                        spool.ack(batch)
                        for _ in expected:
                            model.popleft()
                else:
                    spool.close()
                    tail = sorted(path.glob("seg-*.spool"))[-1]
                    with open(tail, "ab") as fh:
                        fh.write(b"\x07" * op[1])
                    spool = Spool(path, max_bytes=1 << 20, segment_bytes=512)
                    assert spool.truncated_bytes == op[1]
                assert spool.pending_records == len(model)
            rest = []
            while (batch := spool.read_batch(max_records=1000)) is not None:
                rest.extend(r.value for r in batch.records)
                spool.ack(batch)
            assert rest == list(model)
        finally:
            spool.close()
