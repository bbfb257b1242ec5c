"""The MQTT collector: subscribes to the topics of a site's MQTT device profiles and turns
messages into `Reading`s; malformed messages go to the dead-letter sink with a reason.

Owns: the paho-mqtt 2.x client (threaded network loop; messages cross into asyncio through a
bounded queue), the topic -> (device, point) mapping built from the profiles' topic templates,
batching of per-point messages into one reading per device, payload validation, and QoS 1
acknowledgement after delivery.

Topic mapping (`TopicRoute`): a profile's template, e.g. `BMS/v1/PUB/Value/Rack/{point}/{tag_path}`
or `podwatch/{site}/telemetry/{device}`, becomes
- a subscription filter: `{site}` is replaced by the site id, a level holding `{point}` or
  `{device}` becomes `+`, and `{tag_path}` (several levels) becomes `#`;
- a regular expression that extracts point/device/tag_path from a received topic.
bms-json: the device is the site device whose `tag_path` equals the topic's tag path, the metric
is the profile point whose `point` equals the topic's point name; payload
`{"value": <number|bool>, "timestamp": <ms, optional>, "quality": <1 = good, optional>}`.
generic-json: the device id is the topic's `{device}` level; payload `{<point>: <number>, ..., "ts": <ms, optional>}`.

Batching (bms-json): points of one device are collected for `batch_window_s` after the first
one, or until every profile point has arrived, or until a point repeats; then one reading goes
out. A generic-json message is one reading.

Delivery: a QoS 1 message is acknowledged (paho `manual_ack`) only after the reading (or dead
letter) it contributed to was accepted by the sink, which returns once durable (Kafka or
spool). With a persistent session (clean_session=False / clean_start=False + session expiry)
the broker redelivers unacknowledged messages after a reconnect, so a crash loses nothing that
was not yet durable; a redelivered message produces a new reading with a new sequence number
(at-least-once; its points carry the same timestamp, so duplicates are visible downstream).

Lifecycle: `MqttCollector(site, sink, settings)`; `await run(stop_event)` connects, consumes
until the event is set, drains and flushes pending batches, then disconnects. `close()` is
idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import ssl
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from podwatch.collectors.modbus import ReadingSink, SequenceSource
from podwatch.collectors.profiles import MqttPoint, MqttProfile, available_profiles
from podwatch.errors import ConfigError
from podwatch.health import REGISTRY
from podwatch.logs import fields
from podwatch.samples import Quality, Reading
from podwatch.site import Device, MqttSettings, Site
from podwatch.stream.envelope import MAX_TS_MS, MIN_TS_MS

log = logging.getLogger(__name__)

SHORT_SESSION_S = 5.0  # a session the broker closes sooner than this counts as "short"
SHORT_SESSIONS_HINT = 3  # short sessions in a row before the client-id hint


class MqttCollectorSettings(BaseModel):
    """Collector-side MQTT settings (the broker, credentials and QoS come from the site's `mqtt:`)."""

    model_config = ConfigDict(extra="forbid")

    batch_window_s: float = Field(0.2, gt=0, description="How long BMS per-point messages of one device are batched")
    max_payload_bytes: int = Field(65536, gt=0, description="Larger payloads are dead-lettered (reason too_large)")
    queue_size: int = Field(10000, gt=0, description="Messages waiting for the asyncio side; overflow is counted "
                                                     "and left unacknowledged (the broker redelivers them)")
    session_expiry_s: int = Field(3600, ge=0, description="MQTT 5 session expiry (persistent session)")
    keepalive_s: int = Field(30, gt=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    max_in_flight: int = Field(256, gt=0, description="Readings handed to the sink and not yet durable; the "
                                                      "consumer waits (back-pressure) when this many are pending")


@dataclass(frozen=True)
class TopicRoute:
    profile: MqttProfile
    subscription: str
    pattern: re.Pattern
    points: dict[str, MqttPoint]  # point name -> point


def build_route(profile: MqttProfile, site_id: str) -> TopicRoute:
    """Subscription filter and topic regex of a profile's topic template."""
    template = profile.topic.replace("{site}", site_id)
    levels = template.split("/")
    filter_levels: list[str] = []
    regex_levels: list[str] = []
    for i, level in enumerate(levels):
        names = re.findall(r"\{(\w+)\}", level)
        if not names:
            filter_levels.append(level)
            regex_levels.append(re.escape(level))
            continue
        if "tag_path" in names:
            if level != "{tag_path}" or i != len(levels) - 1:
                raise ConfigError(f"profile {profile.id}", [f"topic: {{tag_path}} must be the whole last level, got '{profile.topic}'"])
            filter_levels.append("#")
            regex_levels.append(r"(?P<tag_path>.+)")
            continue
        filter_levels.append("+")
        rx = re.escape(level)
        for name in names:
            if name not in ("point", "device"):
                raise ConfigError(f"profile {profile.id}", [f"topic: unknown placeholder {{{name}}} in '{profile.topic}'"])
            rx = rx.replace(re.escape("{" + name + "}"), f"(?P<{name}>[^/]+)")
        regex_levels.append(rx)
    return TopicRoute(profile, "/".join(filter_levels), re.compile("^" + "/".join(regex_levels) + "$"),
                      {p.point: p for p in profile.points})


class DeadLetter(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class _Batch:
    device: Device
    profile: MqttProfile
    started_at: float
    ts_ms: int
    points: dict[str, float | None] = field(default_factory=dict)
    point_quality: dict[str, Quality] = field(default_factory=dict)
    acks: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos)


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if not isinstance(value, (int, float)):
        raise DeadLetter("wrong_type", f"{what} is {type(value).__name__}, expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise DeadLetter("non_finite", f"{what} is {value}")
    return value


def _timestamp_ms(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DeadLetter("wrong_type", f"{what} is {value!r}, expected milliseconds since the epoch")
    if not MIN_TS_MS <= value < MAX_TS_MS:  # seconds or microseconds: the envelope would break the telemetry schema
        raise DeadLetter("bad_timestamp", f"{what} {value!r} is outside 2000-01-01..2100-01-01 "
                                          "(milliseconds since the epoch expected)")
    return int(value)


def _load_json(payload: bytes):
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DeadLetter("bad_json", f"payload is not JSON: {exc}") from None


class MqttCollector:
    """Subscribes to a site's MQTT devices. See the module docstring."""

    component = "mqtt_collector"

    def __init__(self, site: Site, sink: ReadingSink, settings: MqttCollectorSettings | None = None,
                 mqtt: MqttSettings | None = None, devices: Iterable[Device] | None = None,
                 sequences: SequenceSource | None = None):
        self.site = site
        self.sink = sink
        self.settings = settings or MqttCollectorSettings()
        self.mqtt = mqtt or site.spec.mqtt
        self.sequences = sequences or SequenceSource()
        self.health = REGISTRY.component(self.component, site.id)
        profiles = available_profiles(site.profiles_dir)
        chosen = [d for d in (site.devices if devices is None else devices) if d.protocol == "mqtt" and d.enabled]
        self.routes: list[TopicRoute] = []
        self.by_tag_path: dict[tuple[str, str], Device] = {}  # (profile id, tag path) -> device
        self.by_id: dict[tuple[str, str], Device] = {}  # (profile id, device id) -> device
        seen: set[str] = set()
        for d in chosen:
            profile = profiles[d.profile]
            if not isinstance(profile, MqttProfile):
                raise ConfigError(f"site {site.id}", [f"{d.path}.profile: '{d.profile}' is not an MQTT profile"])
            if profile.id not in seen:
                seen.add(profile.id)
                self.routes.append(build_route(profile, site.id))
            self.by_tag_path[(profile.id, d.tag_path or "")] = d
            self.by_id[(profile.id, d.id)] = d
        self.devices = chosen
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batches: dict[str, _Batch] = {}
        self._client = None
        self._closed = False
        self.connected = asyncio.Event()  # set once connected and every subscription acknowledged
        self._pending_subacks: set[int] = set()
        self._connect_failures = 0
        self._client_id = ""
        self._connected_at: float | None = None  # monotonic time of the last CONNACK (network thread)
        self._short_sessions = 0  # sessions in a row the broker closed within SHORT_SESSION_S
        self._accepting = True  # False once stopping: later messages stay unacknowledged (redelivered)
        self._in_flight: set[asyncio.Task] | None = None  # set by run(): readings go to the sink concurrently
        self._slots: asyncio.Semaphore | None = None
        self.health.set("connected", 0)

    @property
    def subscriptions(self) -> list[str]:
        return sorted({r.subscription for r in self.routes})

    # ------------------------------------------------------------------ paho side (network thread)

    def _make_client(self):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes

        url = urlparse(self.mqtt.url)
        v5 = self.mqtt.protocol == "5"
        client_id = self._client_id = self.mqtt.client_id or f"podwatch-collector-{self.site.id}"
        if v5:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True)
        else:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                                 clean_session=False, manual_ack=True)
        if self.mqtt.username:
            client.username_pw_set(self.mqtt.username, self.mqtt.password)
        if url.scheme == "mqtts":
            client.tls_set(ca_certs=self.mqtt.ca_file, certfile=self.mqtt.cert_file, keyfile=self.mqtt.key_file,
                           cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(min_delay=max(1, int(self.settings.reconnect_min_s)), max_delay=int(self.settings.reconnect_max_s))
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_connect_fail = self._on_connect_fail
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.session_expiry_s
        host = url.hostname or "127.0.0.1"
        port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        if v5:
            client.connect_async(host, port, keepalive=self.settings.keepalive_s, clean_start=False, properties=props)
        else:
            client.connect_async(host, port, keepalive=self.settings.keepalive_s)
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("MQTT broker refused the connection", extra=fields(url=self.mqtt.url, reason=str(reason_code)))
            return
        self._connected_at = time.monotonic()
        if self._connect_failures:
            log.info("MQTT broker reachable again", extra=fields(url=self.mqtt.url, failed_attempts=self._connect_failures))
            self._connect_failures = 0
        self._pending_subacks = set()
        for sub in self.subscriptions:
            _, mid = client.subscribe(sub, qos=self.mqtt.qos)
            self._pending_subacks.add(mid)
        log.info("MQTT collector connected",
                 extra=fields(url=self.mqtt.url, session_present=getattr(flags, "session_present", None),
                              subscriptions=",".join(self.subscriptions)))

    def _on_connect_fail(self, client, userdata):
        # first failure loudly, repeats quietly (paho keeps retrying with back-off)
        self._connect_failures += 1
        if self._connect_failures == 1:
            log.warning("Cannot reach the MQTT broker; retrying with back-off", extra=fields(url=self.mqtt.url))
        else:
            log.debug("MQTT broker still unreachable", extra=fields(url=self.mqtt.url, attempts=self._connect_failures))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        # `connected` means subscribed: messages published from now on reach us
        self._pending_subacks.discard(mid)
        if not self._pending_subacks:
            self._loop.call_soon_threadsafe(self._set_connected, True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self._closed:
            return
        up_s = time.monotonic() - self._connected_at if self._connected_at is not None else None
        self._connected_at = None
        log.warning("MQTT connection lost; paho reconnects with back-off",
                    extra=fields(url=self.mqtt.url, reason=str(reason_code)))
        # The broker closing fresh sessions again and again is most often another client taking our
        # client id over (two collectors for one site throw each other off at every reconnect, for
        # ever; mosquitto gives paho no reason, even on MQTT 5): say so once
        self._short_sessions = self._short_sessions + 1 if up_s is not None and up_s < SHORT_SESSION_S else 0
        if self._short_sessions == SHORT_SESSIONS_HINT:
            log.warning("The MQTT broker closed the last sessions within seconds of connecting; if another "
                        "client uses this collector's client id (a second collector for this site?), give each "
                        "its own mqtt.client_id", extra=fields(url=self.mqtt.url, client_id=self._client_id))
        self._loop.call_soon_threadsafe(self._set_connected, False)

    def _set_connected(self, up: bool) -> None:
        self.health.set("connected", 1 if up else 0)
        if up:
            self.connected.set()
        else:
            self.connected.clear()

    def _on_message(self, client, userdata, msg):
        # network thread: hand over only (no parsing here, it would stall the network loop)
        self._loop.call_soon_threadsafe(self._enqueue, msg.topic, bytes(msg.payload), msg.mid, msg.qos)

    def _enqueue(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        if not self._accepting:
            return  # stopping: not taken, not acknowledged; the persistent session redelivers QoS 1
        self.health.inc("received")
        try:
            self._queue.put_nowait((topic, payload, mid, qos))
        except asyncio.QueueFull:
            # Not acknowledged: the broker redelivers it after a reconnect (persistent session).
            self.health.inc("dropped")

    # ------------------------------------------------------------------ asyncio side

    async def handle(self, topic: str, payload: bytes, mid: int = 0, qos: int = 0) -> None:
        """Process one message (also the entry point for tests without a broker)."""
        now = asyncio.get_running_loop().time()
        try:
            if len(payload) > self.settings.max_payload_bytes:
                raise DeadLetter("too_large", f"payload of {len(payload)} bytes exceeds {self.settings.max_payload_bytes}")
            route, match = self._route(topic)
            if route.profile.format == "bms-json":
                await self._bms(route, match, payload, now, mid, qos)
            else:
                await self._generic(route, match, payload, mid, qos)
        except DeadLetter as dl:
            await self._dead_letter(topic, payload, dl, mid, qos)

    def _route(self, topic: str):
        for route in self.routes:
            m = route.pattern.match(topic)
            if m:
                return route, m
        raise DeadLetter("unknown_topic", f"topic '{topic}' matches no profile topic of site {self.site.id}")

    async def _bms(self, route: TopicRoute, match: re.Match, payload: bytes, now: float, mid: int, qos: int) -> None:
        tag_path = match.group("tag_path")
        device = self.by_tag_path.get((route.profile.id, tag_path))
        if device is None:
            raise DeadLetter("unknown_device", f"no {route.profile.id} device with tag_path '{tag_path}'")
        point = route.points.get(match.group("point"))
        if point is None:
            raise DeadLetter("unknown_point", f"point '{match.group('point')}' is not in profile {route.profile.id}")
        body = _load_json(payload)
        if not isinstance(body, dict):
            raise DeadLetter("not_object", f"payload is a JSON {type(body).__name__}, expected an object")
        if "value" not in body:
            raise DeadLetter("missing_field", "payload has no 'value'")
        value = _number(body["value"], "value")
        ts_ms = _timestamp_ms(body["timestamp"], "timestamp") if "timestamp" in body else time.time_ns() // 1_000_000
        quality_code = body.get("quality", 1)
        if isinstance(quality_code, bool) or not isinstance(quality_code, int):
            raise DeadLetter("wrong_type", f"quality is {quality_code!r}, expected an integer (1 = good)")
        batch = self._batches.get(device.id)
        if batch is not None and point.metric in batch.points:
            await self._flush(device.id)  # a repeat starts the next reading
            batch = None
        if batch is None:
            batch = self._batches[device.id] = _Batch(device, route.profile, now, ts_ms)
        batch.ts_ms = max(batch.ts_ms, ts_ms)
        if quality_code == 1:
            batch.points[point.metric] = value * point.scale + point.offset
        else:  # the BMS says the value is not good: keep the point, never its doubtful value
            batch.points[point.metric] = None
            batch.point_quality[point.metric] = Quality.BAD
        if qos:
            batch.acks.append((mid, qos))
        if len(batch.points) == len(route.points):
            await self._flush(device.id)

    async def _generic(self, route: TopicRoute, match: re.Match, payload: bytes, mid: int, qos: int) -> None:
        device = self.by_id.get((route.profile.id, match.group("device")))
        if device is None:
            raise DeadLetter("unknown_device", f"no {route.profile.id} device with id '{match.group('device')}'")
        body = _load_json(payload)
        if not isinstance(body, dict):
            raise DeadLetter("not_object", f"payload is a JSON {type(body).__name__}, expected an object")
        points: dict[str, float | None] = {}
        for name, p in route.points.items():
            if name in body:
                points[p.metric] = _number(body[name], name) * p.scale + p.offset
        if not points:
            raise DeadLetter("missing_field", f"payload has none of the profile's points ({', '.join(route.points)})")
        ts_ms = _timestamp_ms(body["ts"], "ts") if "ts" in body else time.time_ns() // 1_000_000
        reading = Reading(self.site.id, device.id, self.sequences.next(device.id), ts_ms, points, Quality.GOOD)
        await self._deliver(reading, [(mid, qos)] if qos else [])

    async def _flush(self, device_id: str) -> None:
        batch = self._batches.pop(device_id, None)
        if batch is None:
            return
        reading = Reading(self.site.id, batch.device.id, self.sequences.next(batch.device.id), batch.ts_ms,
                          batch.points, Quality.GOOD, batch.point_quality)
        await self._deliver(reading, batch.acks)

    async def flush_expired(self, now: float | None = None, force: bool = False) -> None:
        now = asyncio.get_running_loop().time() if now is None else now
        for device_id, batch in list(self._batches.items()):
            if force or now - batch.started_at >= self.settings.batch_window_s:
                await self._flush(device_id)

    async def _deliver(self, reading: Reading, acks: list[tuple[int, int]]) -> None:
        if self._in_flight is None:  # handle() without run(): deliver before returning
            await self._send_and_ack(reading, acks)
            return
        # Under run(): the sink's `send` returns once durable (a Kafka round trip, several ms on a busy
        # broker). Awaiting each in turn capped a 20 MW site (980 BMS messages/s) at ~150 readings/s and
        # overflowed the queue; readings now go out concurrently, bounded by max_in_flight. Order per
        # device holds: the tasks call send() in creation order and the producer keeps call order.
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._send_and_ack(reading, acks))
        self._in_flight.add(task)
        task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _send_and_ack(self, reading: Reading, acks: list[tuple[int, int]]) -> None:
        try:
            durable = await self.sink.send(reading)
        except Exception as exc:
            durable, error = False, exc
        else:
            error = "the sink dropped it"
        if durable is False:
            # Not acknowledged: with a persistent session the broker redelivers after a reconnect.
            self.health.inc("dropped")
            log.error("Sink did not take an MQTT reading; leaving its messages unacknowledged",
                      extra=fields(device=reading.device, error=error))
            return
        self.health.inc("sent")
        self._ack(acks)

    async def _dead_letter(self, topic: str, payload: bytes, dl: DeadLetter, mid: int, qos: int) -> None:
        self.health.inc("errors")
        self.health.inc(f"dead_letter_{dl.reason}")
        log.debug("MQTT message dead-lettered", extra=fields(topic=topic, reason=dl.reason, detail=dl))
        try:
            # the whole payload: the producer keeps a bounded prefix and records the original size
            durable = await self.sink.send_dead_letter(payload, dl.reason, "mqtt", topic=topic, detail=str(dl))
        except Exception as exc:
            durable = False
            log.error("Dead-letter sink failed", extra=fields(topic=topic, reason=dl.reason, error=exc))
        if durable is False:
            self.health.inc("dropped")
            return
        self._ack([(mid, qos)] if qos else [])

    def _ack(self, acks: list[tuple[int, int]]) -> None:
        if self._client is None:
            return
        for mid, qos in acks:
            self._client.ack(mid, qos)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, consume until `stop` is set, then drain the queue, flush batches and disconnect."""
        if not self.routes:
            await stop.wait()
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.settings.queue_size)
        self._in_flight, self._slots = set(), asyncio.Semaphore(self.settings.max_in_flight)
        self._accepting = True
        self._client = self._make_client()
        self._client.loop_start()
        log.info("MQTT collector started", extra=fields(site=self.site.id, url=self.mqtt.url, devices=len(self.devices),
                                                        subscriptions=",".join(self.subscriptions)))
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                timeout = self.settings.batch_window_s
                if self._batches:
                    oldest = min(b.started_at for b in self._batches.values())
                    timeout = max(0.0, oldest + self.settings.batch_window_s - self._loop.time())
                get = asyncio.create_task(self._queue.get())
                done, _ = await asyncio.wait({get, stop_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    await self._handle_safely(*get.result())
                    # then whatever else is already waiting, without a task and a wait per message
                    for _ in range(min(self._queue.qsize(), 1000)):
                        await self._handle_safely(*self._queue.get_nowait())
                else:
                    get.cancel()
                    await asyncio.gather(get, return_exceptions=True)
                await self.flush_expired()
            # Stop taking new messages first: draining while the broker keeps publishing never ended
            # (a busy site kept `podwatch collect` running for a minute after Ctrl-C).
            self._accepting = False
            for _ in range(self._queue.qsize()):
                await self._handle_safely(*self._queue.get_nowait())
            await self.flush_expired(force=True)
            if self._in_flight:
                await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        finally:
            stop_wait.cancel()
            self.close()

    async def _handle_safely(self, topic, payload, mid, qos) -> None:
        try:
            await self.handle(topic, payload, mid, qos)
        except Exception as exc:  # a bug must not stop the collector: count, dead-letter, keep running
            log.exception("Unexpected error handling an MQTT message", extra=fields(topic=topic))
            await self._dead_letter(topic, payload, DeadLetter("internal_error", repr(exc)), mid, qos)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
        self.health.set("connected", 0)


def new_client_id(site_id: str) -> str:
    """A unique client id (tests); production uses a stable one so the persistent session survives restarts."""
    return f"podwatch-{site_id}-{uuid.uuid4().hex[:8]}"
