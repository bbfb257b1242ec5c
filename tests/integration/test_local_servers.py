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


def test_children_die_with_their_parent(tmp_path):
    """A parent killed without cleanup (SIGKILL, closed terminal) must leave no orphan server."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(
        "import sys, time\n"
        "from podwatch import procs\n"
        "child = procs.amqtt_broker().start()\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        procs.wait_for(lambda: pid_file.exists() and pid_file.read_text(), 20, what="child started")
        child_pid = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)

        def gone() -> bool:
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                return True
            return open(f"/proc/{child_pid}/stat").read().split()[2] == "Z"

        procs.wait_for(gone, 10, what="the orphaned child to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
