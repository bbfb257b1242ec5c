"""The local servers podwatch manages start on a free loopback port, answer, and stop."""

from podwatch import procs


def test_tansu_starts_answers_and_stops():
    broker = procs.tansu().start()
    try:
        assert procs.port_open(broker.host, broker.port)
    finally:
        broker.stop()
    assert not procs.port_open(broker.host, broker.port)
    broker.stop()  # idempotent


def test_mosquitto_starts_answers_and_stops(tmp_path):
    with procs.mosquitto(workdir=tmp_path) as broker:
        assert procs.port_open(broker.host, broker.port)
    assert not procs.port_open(broker.host, broker.port)


def test_embedded_amqtt_broker_starts_answers_and_stops():
    with procs.amqtt_broker() as broker:
        assert procs.port_open(broker.host, broker.port)
    assert not procs.port_open(broker.host, broker.port)
