"""`podwatch serve` as a process: starts, owns the file, answers, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until
from tests.integration.storage.helpers import serve_answers

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PODWATCH = str(Path(sys.executable).parent / "podwatch")
REPO = Path(__file__).parents[3]


@pytest.mark.timeout(60)
async def test_serve_process_ingests_answers_and_stops(tansu_broker, tmp_path, free_port):
    db = tmp_path / "serve.duckdb"
    proc = await asyncio.create_subprocess_exec(
        PODWATCH, "serve", "--db", str(db), "--kafka", tansu_broker, "--site", str(REPO / "examples/sites/demo.yaml"),
        "--port", str(free_port), "--token", "tok", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ})
    base = f"http://127.0.0.1:{free_port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            await wait_until(serve_answers(proc, client), timeout=40, what="podwatch serve healthy")
            owner = json.loads(Path(f"{db}.serve.json").read_text())
            assert owner["api_url"] == base and owner["token"] == "tok" and owner["pid"] == proc.pid
            racks = (await client.get("/api/topology/racks")).json()
            assert len(racks) == 16
            assert (await client.get("/api/pipeline")).json()[0]["running"] is True
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 30)
    # The storage service stopped cleanly: the owner record is gone and the file opens again.
    # (The exit code also depends on the other stages `podwatch serve` composes; see the
    # API-only variant below for the storage part alone.)
    assert not Path(f"{db}.serve.json").exists()
    import duckdb

    duckdb.connect(str(db), read_only=True).close()


@pytest.mark.timeout(60)
async def test_serve_api_only_exits_zero_on_sigterm(tmp_path, free_port):
    db = tmp_path / "api-only.duckdb"
    proc = await asyncio.create_subprocess_exec(PODWATCH, "serve", "--db", str(db), "--port", str(free_port),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port}", timeout=5) as client:
            await wait_until(serve_answers(proc, client), timeout=40, what="podwatch serve (API only) healthy")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 30)
    assert rc == 0, (await proc.stderr.read()).decode()[-3000:]
    assert not Path(f"{db}.serve.json").exists()
