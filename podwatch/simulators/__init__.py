"""The hardware simulator: site physics, Modbus TCP device servers, MQTT publishing, fault
scenarios and history generation. Only tests, benchmarks and the demo import it.

    from podwatch.simulators import Simulator, Scenario, GroundTruth, generate_history

Modules: `workload` (rack load from the Azure trace), `physics` (power, hydraulics, heat,
throttling), `observe` (what devices report), `scenario` (fault timelines), `truth` (ground
truth), `modbus_server` / `mqtt_publisher` (endpoints), `engine` (`Simulator`), `history`
(Parquet history), `commands` (`podwatch simulate`), `devicedoc` (docs/devices.md).
See docs/simulator.md.
"""

from __future__ import annotations

_EXPORTS = {
    "Simulator": "podwatch.simulators.engine",
    "Scenario": "podwatch.simulators.scenario",
    "random_scenario": "podwatch.simulators.scenario",
    "GroundTruth": "podwatch.simulators.truth",
    "generate_history": "podwatch.simulators.history",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Import lazily: `podwatch simulate --help` should not pay for pymodbus and pyarrow."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
