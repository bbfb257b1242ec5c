"""Clocks: where "now" comes from. Production uses `WallClock`. Accelerated runs (the demo, end-to-end
tests) give the simulator and the collectors the same `ScaledClock`, so sample timestamps, poll
intervals and simulated physics all run in one simulated time: with speed 10, a 1 s poll interval
is 0.1 s of wall time and timestamps advance 10 s per wall second.

A clock is given on the command line as `--speed S --clock-origin WALL_MS:SIM_MS` (both processes get
the same values); `ScaledClock.from_spec(speed, origin)` rebuilds it. Components never sleep on
wall time directly: they call `clock.sleep(sim_seconds)`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


class WallClock:
    speed = 1.0

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def now_s(self) -> float:
        return time.time()

    def to_wall_seconds(self, sim_seconds: float) -> float:
        return sim_seconds

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds))

    def spec(self) -> str:
        return "wall"


@dataclass(frozen=True)
class ScaledClock:
    """sim_time = origin_sim + (wall - origin_wall) * speed (all in ms)."""

    speed: float
    origin_wall_ms: int
    origin_sim_ms: int

    @classmethod
    def starting_now(cls, speed: float, sim_start_ms: int | None = None) -> "ScaledClock":
        wall = time.time_ns() // 1_000_000
        return cls(speed, wall, wall if sim_start_ms is None else sim_start_ms)

    @classmethod
    def from_spec(cls, speed: float, origin: str | None) -> "WallClock | ScaledClock":
        """`origin` is 'WALL_MS:SIM_MS' (or None: start now). Speed 1 without an origin is the wall clock."""
        if origin is None:
            return WallClock() if speed == 1.0 else cls.starting_now(speed)
        wall, _, sim = origin.partition(":")
        return cls(speed, int(wall), int(sim or wall))

    def now_ms(self) -> int:
        wall = time.time_ns() // 1_000_000
        return self.origin_sim_ms + int((wall - self.origin_wall_ms) * self.speed)

    def now_s(self) -> float:
        return self.now_ms() / 1000.0

    def to_wall_seconds(self, sim_seconds: float) -> float:
        return sim_seconds / self.speed

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds / self.speed))

    def spec(self) -> str:
        return f"{self.origin_wall_ms}:{self.origin_sim_ms}"


Clock = WallClock | ScaledClock
