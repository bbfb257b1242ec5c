"""MQTT publishing of the simulated MQTT devices (rack liquid-cooling and leak sensors), as their
profiles describe:

* `bms-json` (NVIDIA BMS event bus style): one message per point on the profile's topic template
  (`BMS/v1/PUB/Value/Rack/{point}/{tag_path}`), payload `{"value": 41.2, "timestamp": <ms>,
  "quality": 1}`. Values are in the device's unit: the profile's `scale` is undone
  (value_on_wire = (metric_value - offset) / scale, e.g. RackPower in W). Optional retained
  metadata on `BMS/v1/PUB/Metadata/Rack/{point}/{tag_path}`: `{"unit", "metric", "device"}`.
* `generic-json`: one message per device on `{site}/{device}` style templates, payload
  `{"ts": <ms>, "<point>": value, ...}`.

A point with no value (sensor dropout) is not published. paho-mqtt's network thread reconnects by
itself; while disconnected, messages are counted as dropped (health component "simulator_mqtt").
"""

from __future__ import annotations

import logging
import math
import threading
from urllib.parse import urlparse

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from podwatch.collectors.profiles import MqttProfile
from podwatch.health import REGISTRY
from podwatch.site import Device

log = logging.getLogger(__name__)


def bms_messages(device: Device, profile: MqttProfile, points: dict[str, float], ts_ms: int,
                 site_id: str) -> list[tuple[str, bytes]]:
    """(topic, payload) pairs one device publishes for one reading."""
    out = []
    if profile.format == "bms-json":
        for p in profile.points:
            value = points.get(p.metric)
            if value is None or not math.isfinite(value):
                continue
            wire = (value - p.offset) / p.scale
            topic = profile.topic.format(point=p.point, tag_path=device.tag_path, device=device.id, site=site_id)
            out.append((topic, orjson.dumps({"value": round(wire, 4), "timestamp": int(ts_ms), "quality": 1})))
    else:
        body: dict[str, float | int] = {"ts": int(ts_ms)}
        for p in profile.points:
            value = points.get(p.metric)
            if value is not None and math.isfinite(value):
                body[p.point] = round((value - p.offset) / p.scale, 4)
        topic = profile.topic.format(device=device.id, site=site_id, tag_path=device.tag_path, point="")
        out.append((topic, orjson.dumps(body)))
    return out


def metadata_messages(device: Device, profile: MqttProfile) -> list[tuple[str, bytes]]:
    if profile.format != "bms-json":
        return []
    out = []
    for p in profile.points:
        topic = profile.topic.replace("/Value/", "/Metadata/").format(point=p.point, tag_path=device.tag_path,
                                                                       device=device.id, site="")
        out.append((topic, orjson.dumps({"unit": p.unit, "metric": p.metric, "device": device.id})))
    return out


class MqttPublisher:
    """Publishes readings of MQTT devices to one broker (paho-mqtt, threaded network loop)."""

    def __init__(self, url: str, site_id: str, devices: list[tuple[Device, MqttProfile]], qos: int = 0,
                 client_id: str | None = None, retain_metadata: bool = True,
                 username: str | None = None, password: str | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            from podwatch.errors import ConfigError

            raise ConfigError("--mqtt", [f"'{url}' is not mqtt://host:port"])
        self.host, self.port = parsed.hostname, parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        self.site_id, self.devices, self.qos = site_id, devices, qos
        self.retain_metadata = retain_metadata
        self.health = REGISTRY.component("simulator_mqtt", site_id)
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"podwatch-sim-{site_id}")
        if parsed.scheme == "mqtts":
            self.client.tls_set()
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(100_000)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self._started = False
        self._warned = False

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s refused the simulator: %s", self.url, reason_code)
            return
        self.connected.set()
        if self.retain_metadata:
            for device, profile in self.devices:
                for topic, payload in metadata_messages(device, profile):
                    client.publish(topic, payload, qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._warned:  # the first failure loudly, retries quietly (paho keeps reconnecting)
            self._warned = True
            log.warning("cannot reach MQTT broker %s; MQTT devices are not published until it is up", self.url)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def publish(self, points_by_device: dict[str, dict[str, float]], ts_ms: int) -> int:
        """Publish one reading per device; returns the number of messages handed to the client."""
        sent = 0
        for device, profile in self.devices:
            points = points_by_device.get(device.id)
            if points is None:
                continue
            for topic, payload in bms_messages(device, profile, points, ts_ms, self.site_id):
                if not self.connected.is_set():
                    self.health.inc("dropped")
                    continue
                info = self.client.publish(topic, payload, qos=self.qos)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    sent += 1
                else:
                    self.health.inc("errors")
        self.health.inc("sent", sent)
        return sent

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
