"""An embedded MQTT broker (amqtt) for development and the demo when mosquitto is not installed.

Run: `python -m podwatch.mqtt_broker --port N [--host 127.0.0.1]`; stops on SIGTERM/SIGINT.
Production points podwatch at the site's own broker (mosquitto, EMQX, HiveMQ, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal


def broker_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        # An explicit plugin list replaces amqtt's defaults (packet logger, $SYS publisher).
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))  # amqtt needs a running loop at construction
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"amqtt broker listening on {host}:{port}", flush=True)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
