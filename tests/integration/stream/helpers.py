"""Test helpers of the stream tests: a cuttable TCP proxy, a Tansu that advertises it, readers."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition

from podwatch import procs
from podwatch.samples import Reading
from podwatch.stream.config import KafkaSettings


class TcpProxy:
    """An asyncio TCP proxy on 127.0.0.1:`port` -> `target`. `cut()` drops every connection and
    closes the listener (new connections are refused); `restore()` listens again."""

    def __init__(self, port: int, target_host: str, target_port: int) -> None:
        self.port, self.target = port, (target_host, target_port)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    start = restore

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    stop = cut

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)


def tansu_advertising(listen_port: int, advertised_port: int) -> procs.ManagedProcess:
    """A Tansu broker listening on `listen_port` that tells clients to connect to `advertised_port`
    (the proxy), so that every connection after bootstrap goes through the proxy too."""
    argv = [procs.tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{listen_port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}", "--storage-engine", "memory://tansu/"]
    return procs.ManagedProcess("tansu-behind-proxy", argv, "127.0.0.1", listen_port)


def reading(device: str, seq: int, site: str = "test", **points: float | None) -> Reading:
    return Reading(site, device, seq, 1_764_000_000_000 + seq * 1000, points or {"pdu.power_kw": float(seq)})


async def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0):
    """Every record of `topic` from the beginning, via assign() (no group), until `expected`
    records arrived or `timeout_s` passed. Returns the ConsumerRecords."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", request_timeout_ms=10_000)
    await consumer.start()
    try:
        await consumer.topics()  # fetches cluster metadata
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(out) < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in batches.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


def fast_settings(bootstrap: str, **overrides) -> KafkaSettings:
    """Short bounds so that outages are detected and retried quickly in tests."""
    values = dict(bootstrap_servers=bootstrap, delivery_timeout_s=2.0, request_timeout_ms=3000,
                  retry_backoff_min_s=0.1, retry_backoff_max_s=1.0, stop_drain_timeout_s=3.0)
    values.update(overrides)
    return KafkaSettings(**values)
