"""MQTT collector over TLS with username/password against a real mosquitto (certificates made
with the openssl CLI for this test), and a refused login reported, not crashed on."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import subprocess
import tempfile
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from podwatch import procs
from podwatch.collectors.mqtt import MqttCollector
from tests.conftest import wait_until
from tests.integration.collectors.sites import MemorySink, rack_site

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30),
              pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("mosquitto_passwd")),
                                 reason="needs openssl and mosquitto_passwd")]

USER, PASSWORD = "collector", "s3cret-pw"


@pytest.fixture(scope="module")
def tls_broker():
    # mosquitto drops root for its own user before loading certificates: world-readable test files
    certs = Path(tempfile.mkdtemp(prefix="podwatch-mqtt-tls-"))
    certs.chmod(0o755)

    def run(*args):
        subprocess.run(args, cwd=certs, check=True, capture_output=True, timeout=60)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=podwatch-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (certs / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    (certs / "passwd").touch()
    run("mosquitto_passwd", "-b", "passwd", USER, PASSWORD)
    for f in certs.iterdir():
        f.chmod(0o644)
    extra = (f"cafile {certs}/ca.crt\ncertfile {certs}/server.crt\nkeyfile {certs}/server.key\n"
             f"password_file {certs}/passwd\nallow_anonymous false\n")
    with procs.mosquitto(workdir=certs / "broker", extra_conf=extra) as broker:
        yield broker.port, certs / "ca.crt"
    shutil.rmtree(certs, ignore_errors=True)


def site_for(port: int, ca: Path, password: str):
    return rack_site(1, [], sensors={"enabled": True}, site_id="t1",
                     mqtt={"url": f"mqtts://127.0.0.1:{port}", "ca_file": str(ca), "username": USER, "password": password,
                           "client_id": f"c-{uuid.uuid4().hex[:8]}"})


async def test_tls_and_password_login_receives_bms_points(tls_broker):
    port, ca = tls_broker
    sink = MemorySink()
    collector = MqttCollector(site_for(port, ca, PASSWORD), sink)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    pub.username_pw_set(USER, PASSWORD)
    try:
        await asyncio.wait_for(collector.connected.wait(), 10)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish("BMS/v1/PUB/Value/Rack/RackLiquidFlow/t1/m1/r1", json.dumps({"value": 123.5}), qos=1).wait_for_publish(5)
        await wait_until(lambda: sink.readings, 5, what="a reading over TLS")
    finally:
        pub.loop_stop()
        stop.set()
        await task
    assert sink.readings[0].device == "bms-r1" and sink.readings[0].points == {"rack.liquid_flow_lpm": 123.5}


async def test_wrong_password_is_reported_and_the_collector_stays_up(tls_broker, caplog):
    port, ca = tls_broker
    collector = MqttCollector(site_for(port, ca, "wrong"), MemorySink())
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="podwatch.collectors.mqtt"):
        task = asyncio.create_task(collector.run(stop))
        try:
            await wait_until(lambda: any("refused" in r.getMessage() for r in caplog.records), 10, what="refusal logged")
            assert not collector.connected.is_set() and not task.done()
        finally:
            stop.set()
            await task
    assert collector.health.gauges["connected"] == 0
