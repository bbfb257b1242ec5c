"""The fetch process: the sink's Kafka consumer and decoder in a second OS process.

Everything in the sink is GIL-bound Python (aiokafka's record parsing, JSON decoding, the
writer's bookkeeping), so threads do not overlap. `SinkSettings.decode_process=True` moves the
`Fetcher` (consumer, decoding, site check, dead letters; `fetch.py`) into a child process;
the process that owns the DuckDB file keeps dedup, lays out the long rows and writes. The two
run on two cores.

Protocol (two one-way pipes; frames are pickles, protocol 5, with the numpy columns as
out-of-band buffers: no copy besides the pipe's):

    child -> parent (one ordered stream)          parent -> child
    ("started",)                                  ("offsets", {partition: next_offset})
    ("assigned", [partitions])   - waits for ->   ("offsets", ...)
    ("revoked",)                 - waits for ->   ("done",)
    ("report", packed FetchReport)                ("stop",)
    ("fatal", message)

The parent handles frames strictly in order, so an assignment is answered only after every
batch handed over before it is committed: the offsets it answers with are exact. The child
never commits anything; a batch is a unit (a frame cut short by a crash is discarded by the
pipe's EOF), so a child killed at any instant loses nothing and duplicates nothing: the
parent restarts it and the new child seeks to the stored offsets.

The child dies with the parent: it watches its control pipe (EOF when the parent is gone,
however it died) and asks Linux for SIGKILL when its parent process exits (PR_SET_PDEATHSIG).
Children are forked from a `forkserver` that has imported the heavy modules once, so a child
starts in milliseconds, not in the seconds an import of polars/pyarrow/aiokafka takes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from podwatch.errors import PodwatchError
from podwatch.logs import fields
from podwatch.storage.decode import DecodedBatch, portable_row_parts, restore_row_parts
from podwatch.storage.fetch import AssignedFn, FetchedBatch, Fetcher, FetchReport, RevokedFn, lean_records

log = logging.getLogger(__name__)

# Frames read ahead by the parent. A batch holds its slot until the writer has started it, so
# the child keeps topping up its next batch while the writer is busy (big transactions: the
# per-commit costs amortise, DuckDB compresses full row groups); its next frame waits in the pipe.
QUEUED_FRAMES = 1
PIPE_BYTES = 1 << 20  # bigger pipe buffer: fewer wake-ups per 16 MB batch
RESTARTS_ALLOWED = 5  # child deaths within RESTART_WINDOW_S before the sink gives up (fails loudly)
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 10.0
ANSWER_REPORT_MS = 1000  # an idle fetch process still tells the writer, once a second, that Kafka answers

_CONTEXT: multiprocessing.context.BaseContext | None = None


_MAIN_LOCK = threading.Lock()


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # everything a child imports (the sink module for its settings model, polars, pyarrow,
        # aiokafka, duckdb), so that a child starts without importing anything
        _CONTEXT.set_forkserver_preload(["podwatch.storage.sink"])
    return _CONTEXT


def prepare() -> None:
    """Start the forkserver now (a fresh interpreter importing the sink's modules, ~1-2 s) -
    the sink calls it in a thread while it loads its state from the file."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _start_without_main(process: multiprocessing.process.BaseProcess) -> None:
    """`process.start()` without multiprocessing's re-import of `__main__` in the child: the
    child needs nothing from it (its target lives in this module), and a program that embeds
    the sink without an `if __name__ == "__main__":` guard would otherwise run again there."""
    main = sys.modules["__main__"]
    with _MAIN_LOCK:
        saved_file, saved_spec = main.__dict__.pop("__file__", None), getattr(main, "__spec__", None)
        main.__spec__ = None
        try:
            process.start()
        finally:
            main.__spec__ = saved_spec
            if saved_file is not None:
                main.__file__ = saved_file


# ---------------------------------------------------------------------- frames
def send_frame(conn: Connection, obj: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(len(buffers).to_bytes(4, "little") + head)
    for buffer in buffers:
        conn.send_bytes(buffer.raw())


def recv_frame(conn: Connection) -> Any:
    head = conn.recv_bytes()
    count = int.from_bytes(head[:4], "little")
    buffers = [conn.recv_bytes() for _ in range(count)]
    return pickle.loads(memoryview(head)[4:], buffers=buffers)


def _grow_pipe(conn: Connection) -> None:
    with contextlib.suppress(OSError, AttributeError):
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def pack_report(report: FetchReport) -> tuple:
    """A FetchReport as plain columns. The long rows are not laid out here: their parts are
    smaller to send, and laying them out (~1.3 us per message) belongs in the writer's thread:
    the fetch process is the busier of the two."""
    fb = report.batch
    if fb is None:
        return (None, report.lag, report.new_topic_resets, report.new_fetch_errors, report.answered_ms)
    b = fb.batch
    batch = (portable_row_parts(b), b.devices, b.seqs, b.ts_ms, b.point_counts, b.sites)
    meta = (fb.next_offsets, fb.newest_ms, fb.messages, fb.dead_letters, fb.own_site, fb.fetched_at)
    return ((batch, meta), report.lag, report.new_topic_resets, report.new_fetch_errors, report.answered_ms)


def unpack_report(packed: tuple) -> FetchReport:
    body, lag, resets, errors, answered_ms = packed
    if body is None:
        return FetchReport(None, lag, resets, errors, answered_ms)
    (parts, devices, seqs, ts_ms, point_counts, sites), meta = body
    batch = restore_row_parts(DecodedBatch(np.empty(0, np.int64), devices, seqs, ts_ms, point_counts, [], sites), parts)
    return FetchReport(FetchedBatch(batch, *meta), lag, resets, errors, answered_ms)


# ---------------------------------------------------------------------- the child
def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid and os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)


class _ParentLink:
    """The child's end: an ordered sender of frames (in a thread, so the event loop keeps
    fetching while a batch crosses the pipe) and the replies to its requests."""

    def __init__(self, data_w: Connection, ctl_r: Connection) -> None:
        self.data_w, self.ctl_r = data_w, ctl_r
        self.stop = asyncio.Event()
        self._frames: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._sending = False
        self._reply: asyncio.Future | None = None
        self._sender: asyncio.Task | None = None

    def open(self) -> None:
        asyncio.get_running_loop().add_reader(self.ctl_r.fileno(), self._on_control)
        self._sender = asyncio.create_task(self._send_frames())

    def _on_control(self) -> None:
        try:
            while self.ctl_r.poll():
                message = self.ctl_r.recv()
                if message[0] == "stop":
                    self.stop.set()
                    # a position request the stopping writer will not answer: fail it, or the
                    # consumer's rebalance (and its stop()) would wait for it forever
                    if self._reply is not None and not self._reply.done():
                        self._reply.set_exception(EOFError("the sink is stopping"))
                elif self._reply is not None and not self._reply.done():
                    self._reply.set_result(message)
        except (EOFError, OSError):  # the parent is gone
            asyncio.get_running_loop().remove_reader(self.ctl_r.fileno())
            self.stop.set()
            if self._reply is not None and not self._reply.done():
                self._reply.set_exception(EOFError("the sink process is gone"))

    async def _send_frames(self) -> None:
        while True:
            frame = await self._frames.get()
            self._sending = True
            try:
                await asyncio.to_thread(send_frame, self.data_w, frame)
            except OSError:  # the parent is gone
                self.stop.set()
            finally:
                self._sending = False
                self._frames.task_done()

    def busy(self) -> bool:
        return self._sending or not self._frames.empty()

    async def send(self, frame: tuple) -> None:
        await self._frames.put(frame)

    async def request(self, frame: tuple) -> tuple:
        if self.stop.is_set():  # the writer no longer answers
            raise EOFError("the sink is stopping")
        self._reply = asyncio.get_running_loop().create_future()
        await self.send(frame)
        return await self._reply

    async def flush(self, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._frames.join(), timeout_s)


async def _child_run(settings, own_site: str | None, data_w: Connection, ctl_r: Connection) -> None:
    link = _ParentLink(data_w, ctl_r)
    link.open()

    async def on_assigned(partitions: list[int]) -> dict[int, int]:
        return (await link.request(("assigned", partitions)))[1]

    async def on_revoked() -> None:
        await link.request(("revoked",))

    fetcher = Fetcher(settings, own_site, on_assigned, on_revoked, link.busy)
    fatal = None
    try:
        try:
            await fetcher.start()
        except PodwatchError as exc:
            fatal = str(exc)
            return
        await link.send(("started",))
        last_lag: dict[int, int] | None = None
        last_answered = 0  # the broker's last answer as last reported: the writer's /healthz needs to know
        while not link.stop.is_set():
            report = await fetcher.poll()
            answered = report.answered_ms or 0
            if (report.batch or report.lag != last_lag or report.new_topic_resets or report.new_fetch_errors
                    or answered - last_answered >= ANSWER_REPORT_MS):
                last_lag, last_answered = report.lag, answered
                await link.send(("report", pack_report(report)))
    except EOFError:
        pass  # the parent is gone
    except Exception as exc:  # a bug: the writer fails loudly with it (like a failed write)
        log.exception("fetch process failed")
        fatal = f"fetch process failed: {exc!r}"
    finally:
        await fetcher.stop()
        if fatal is not None:  # after what is queued (reports not sent on a stop are dropped)
            await link.send(("fatal", fatal))
            await link.flush(STOP_GRACE_S)


def child_main(settings_json: str, own_site: str | None, data_w: Connection, ctl_r: Connection,
               log_level: int, parent_pid: int, gc_gen0: int | None) -> None:
    """Entry point of the fetch process (forked from the forkserver)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the parent stops us
    from podwatch.logs import configure_logging
    from podwatch.storage.sink import SinkSettings

    configure_logging(log_level)
    if gc_gen0 is not None:
        gc.set_threshold(gc_gen0, *gc.get_threshold()[1:])
    _grow_pipe(data_w)
    with lean_records():  # this process's only consumer is the sink's
        asyncio.run(_child_run(SinkSettings.model_validate_json(settings_json), own_site, data_w, ctl_r))


# ---------------------------------------------------------------------- the parent's end
class FetchProcess:
    """The sink's handle on its fetch process: start it, read its reports in order, answer its
    position requests (through the sink's callbacks), restart it when it dies, stop it.

    `next(timeout_s)` returns the next FetchReport, or None when nothing arrived in time."""

    def __init__(self, settings, own_site, on_assigned: AssignedFn, on_revoked: RevokedFn) -> None:
        self.settings = settings
        self.own_site = own_site  # callable: the file's site as the writer knows it now
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0
        self._deaths: collections.deque[float] = collections.deque()
        self._queue: asyncio.Queue | None = None
        self._room: threading.Semaphore | None = None
        self._ctl: Connection | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._batch_slot_held = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    async def start(self) -> None:
        """Start the child; return once its Kafka clients are up (positions answered)."""
        ctx = _context()
        data_r, data_w = ctx.Pipe(duplex=False)
        ctl_r, ctl_w = ctx.Pipe(duplex=False)
        _grow_pipe(ctl_w)
        s = self.settings
        process = ctx.Process(
            target=child_main, name="podwatch-sink-fetch", daemon=True,
            args=(s.model_dump_json(), self.own_site(), data_w, ctl_r, logging.getLogger().getEffectiveLevel(),
                  os.getpid(), s.gc_gen0_threshold))
        await asyncio.to_thread(_start_without_main, process)
        data_w.close()  # only the child holds the write end: its death is an EOF here
        ctl_r.close()
        self.process, self._ctl = process, ctl_w
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        room = threading.Semaphore(QUEUED_FRAMES)
        self._batch_slot_held = False
        self._queue, self._room = queue, room
        self._reader = threading.Thread(target=self._read_frames, args=(data_r, queue, room, loop),
                                        name="podwatch-sink-fetch-reader", daemon=True)
        self._reader.start()
        while True:
            frame = await self._take()
            if frame[0] == "started":
                log.info("fetch process started", extra=fields(pid=process.pid))
                return
            if frame[0] == "exit":
                raise PodwatchError(f"the sink's fetch process exited at start (exit code {process.exitcode})")
            await self._answer(frame)

    def _read_frames(self, conn: Connection, queue: asyncio.Queue, room: threading.Semaphore,
                     loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: frames in order into the queue, at most QUEUED_FRAMES ahead; the pipe's
        EOF (the child exited or was killed) becomes an ("exit",) frame."""
        try:
            while True:
                while not room.acquire(timeout=0.5):
                    if self._stopping:
                        return
                frame = recv_frame(conn)
                loop.call_soon_threadsafe(queue.put_nowait, frame)
        except (EOFError, OSError):
            with contextlib.suppress(RuntimeError):  # the loop may be closed at interpreter exit
                loop.call_soon_threadsafe(queue.put_nowait, ("exit",))
        finally:
            conn.close()

    async def _take(self, timeout_s: float | None = None) -> tuple:
        if timeout_s is None:
            frame = await self._queue.get()
        else:
            frame = await asyncio.wait_for(self._queue.get(), timeout_s)
        if frame[0] == "report" and frame[1][0] is not None:
            self._batch_slot_held = True  # released by the next `next()`: the writer has started it
        elif frame[0] != "exit":
            self._room.release()
        return frame

    async def _answer(self, frame: tuple) -> None:
        kind = frame[0]
        if kind == "assigned":
            self._reply(("offsets", await self.on_assigned(frame[1])))
        elif kind == "revoked":
            await self.on_revoked()
            self._reply(("done",))
        elif kind == "fatal":
            raise PodwatchError(frame[1])
        else:
            raise PodwatchError(f"unexpected frame from the fetch process: {kind!r}")

    def _reply(self, message: tuple) -> None:
        with contextlib.suppress(OSError):  # a dead child: its EOF is the next frame
            self._ctl.send(message)

    async def next(self, timeout_s: float) -> FetchReport | None:
        """The next report (None on timeout). Answers position requests on the way; a child
        that died is restarted (positions come back from DuckDB), unless it keeps dying."""
        if self._batch_slot_held:  # the sink calls next() once the last batch's write has started
            self._batch_slot_held = False
            self._room.release()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                frame = await self._take(max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return None
            if frame[0] == "report":
                return unpack_report(frame[1])
            if frame[0] == "exit":
                await self._restart()
                return None
            await self._answer(frame)

    async def _restart(self) -> None:
        process = self.process
        await asyncio.to_thread(process.join, STOP_GRACE_S)
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
            self._deaths.popleft()
        if len(self._deaths) > RESTARTS_ALLOWED:
            raise PodwatchError(f"the sink's fetch process died {len(self._deaths)} times in "
                                f"{RESTART_WINDOW_S:.0f} s (last exit code {process.exitcode}); giving up")
        self.restarts += 1
        log.error("the sink's fetch process died; restarting it (batches not yet handed over are re-read from the "
                  "offsets stored in DuckDB)", extra=fields(pid=process.pid, exit_code=process.exitcode))
        self._close_control()
        await self.start()

    def _close_control(self) -> None:
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                self._ctl.close()
            self._ctl = None

    async def stop(self) -> None:
        """Ask the child to stop, wait for it (SIGKILL after a grace period). Idempotent.
        Reports not taken yet are dropped: their offsets were never committed."""
        self._stopping = True
        process = self.process
        if process is None:
            return
        self._reply(("stop",))
        await asyncio.to_thread(process.join, STOP_GRACE_S)
        if process.exitcode is None:
            log.warning("the sink's fetch process did not stop in time; killing it", extra=fields(pid=process.pid))
            process.kill()
            await asyncio.to_thread(process.join, 5)
        self._close_control()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)
