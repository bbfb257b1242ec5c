"""Free ports for test and demo servers come from below the kernel's ephemeral range."""

from __future__ import annotations

import socket

from podwatch import procs


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    low = procs._ephemeral_low()
    ports = {procs.free_port() for _ in range(20)}
    assert len(ports) > 1  # random, so two servers started together rarely meet
    for port in ports:
        assert port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_listening_port_is_never_offered():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", procs.free_port()))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not procs.port_free(taken)
        assert all(procs.free_port() != taken for _ in range(200))
