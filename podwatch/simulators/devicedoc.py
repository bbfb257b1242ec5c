"""Renders the register-map and MQTT sections of `docs/devices.md` from the built-in profiles, so the
documentation cannot drift from what the simulator serves and the collectors decode
(`python -m podwatch.simulators.devicedoc > docs/devices.md`; a test compares the two)."""

from __future__ import annotations

from podwatch.collectors.profiles import REGISTER_COUNT, ModbusProfile, MqttProfile, available_profiles
from podwatch.metrics import CATALOG

# where each profile is served when `podwatch simulate --site examples/sites/...` runs
EXAMPLE_ENDPOINTS = {
    "raritan-px3": ("127.0.0.1", 15021, 1, "pdu-m1-r01-a (demo.yaml; B side: unit 101)"),
    "podwatch-cdu": ("127.0.0.1", 15021, 200, "cdu-m1 (demo.yaml)"),
    "schneider-pm5560": ("127.0.0.1", 15010, 1, "meter-sub1 (demo.yaml)"),
    "sunspec-213": ("127.0.0.1", 16010, 1, "meter-sub (reference-10mw.yaml)"),
}

INTRO = """# Devices: register maps and MQTT payloads

What the simulator serves and the collectors decode. Every table below is generated from the profile
YAML files in `podwatch/collectors/profiles/` (`python -m podwatch.simulators.devicedoc > docs/devices.md`;
a test fails when this file and the profiles disagree). A site may add its own profiles (`profiles_dir`).

Conventions:

- **Address** is the register number as the device manual prints it; **wire** is the address in the
  Modbus request (PDU address). They differ by one when the manual numbers from 1 (`address_base: 1`,
  Schneider PM5xxx: register 3060 travels as 3059).
- **Table**: holding registers are read with function code 3, input registers with function code 4.
- **Word order** of 32/64-bit values (register = 16-bit word, A = most significant byte): `ABCD` big-endian
  (SunSpec, Raritan, Schneider), `CDAB` word-swapped, `BADC` byte-swapped, `DCBA` little-endian.
- **Scale**: metric value = raw x scale + offset. A Raritan PDU reports W; the metric is `pdu.power_kw`
  (scale 0.001). "Not available" is NaN for floats and -32768 / 0xFFFF / 0x80000000 / 0xFFFFFFFF for integers
  (SunSpec convention); the simulator sends those when a sensor drops out.
- Registers between the first and last address a profile uses are readable (gaps read 0), so merged reads
  work; an address outside that span answers exception 2 (illegal data address).
- Faults (`examples/scenarios/device-faults.yaml`): a device answers every request with exception 0x0B
  (gateway target failed to respond) or stops answering (the request times out); other unit ids on the same
  gateway keep answering.

mbpoll reminders (Debian `mbpoll` 1.4): `-0 -r N` = zero-based wire address N; `-t 4` holding, `-t 3` input
registers; `:float` reads float32 and `-c` then counts floats; `-B` = big-endian word order (ABCD), without
it mbpoll uses CDAB; `-1` = poll once. mbpoll has no 64-bit types: read those as `:hex` words.

Other framings: a serial line of the site (`modbus-rtu`, served by the simulator on a socat pty pair at the
port path the site names): `mbpoll -m rtu -b 38400 -P none -a 1 ... /tmp/podwatch-lab-rs485`
(`examples/sites/serial-lab.yaml`). mbpoll has no RTU-over-TCP mode; bridge the gateway's port to a pty
and read it as RTU: `socat pty,link=/tmp/rtu0,raw,echo=0 tcp:127.0.0.1:19031 &` then
`mbpoll -m rtu -b 19200 -P none -a 47 -0 -r 12306 -c 1 -t 4:float -B -1 /tmp/rtu0`
(`examples/sites/rtu-gateways.yaml`, gateway `moxa_A.1`; the baud rate of a pty is not used).

Read limits: a device or gateway with `max_registers_per_read` / `max_gap` in the site file (real serial
gateways forward fewer than 125 registers) answers a longer read with exception 03 and a read across more
undefined registers than `max_gap` with exception 02; `podwatch collect --plan` shows the limited plan.
"""


def _mbpoll(profile: ModbusProfile, point, host: str, port: int, unit: int) -> str:
    table = 4 if point.register_type == "holding" else 3
    wire = profile.wire_address(point)
    order = profile.order_of(point)
    if point.data_type == "float32":
        t = f"{table}:float" + (" -B" if order == "ABCD" else "")
        count = 1
    elif REGISTER_COUNT[point.data_type] == 1:
        t, count = str(table), 1
    else:
        t, count = f"{table}:hex", REGISTER_COUNT[point.data_type]
    return f"mbpoll -m tcp -p {port} -a {unit} -0 -r {wire} -c {count} -t {t} -1 {host}"


def _modbus_section(profile: ModbusProfile) -> str:
    lines = [f"## `{profile.id}` — {profile.vendor} {profile.model} ({profile.kind})", ""]
    if profile.description:
        lines += [profile.description + ".", ""]
    lines += [f"Modbus; numbering from {profile.address_base} (`address_base: {profile.address_base}`), default word "
              f"order {profile.word_order}, at most {profile.max_registers_per_read} registers per read.", ""]
    lines += ["| metric | address | wire | table (FC) | data type | word order | scale | device unit | metric unit |",
              "| --- | ---: | ---: | --- | --- | --- | ---: | --- | --- |"]
    for p in profile.points:
        fc = "holding (3)" if p.register_type == "holding" else "input (4)"
        order = profile.order_of(p) if REGISTER_COUNT[p.data_type] > 1 else "—"
        scale = f"{p.scale:g}" + (f" + {p.offset:g}" if p.offset else "")
        device_unit = p.unit if p.scale == 1 else {0.001: {"kW": "W", "kVA": "VA", "kvar": "var", "kWh": "Wh"}}.get(
            p.scale, {}).get(p.unit or "", f"{p.unit} / {p.scale:g}")
        if p.scale == 0.1:
            device_unit = f"0.1 {p.unit}"
        if p.scale == 0.01:
            device_unit = f"0.01 ({p.unit}) = %"
        metric_unit = CATALOG[p.metric].unit
        lines.append(f"| `{p.metric}` | {p.address} | {profile.wire_address(p)} | {fc} | {p.data_type} | {order} | "
                     f"{scale} | {device_unit} | {metric_unit} |")
    if profile.static:
        lines += ["", "Constant registers:", "", "| wire address | table | values |", "| ---: | --- | --- |"]
        for s in profile.static:
            vals = ", ".join(f"0x{v:04X}" for v in s.values)
            lines.append(f"| {s.address} | {s.register_type} | {vals} |")
    ep = EXAMPLE_ENDPOINTS.get(profile.id)
    if ep:
        host, port, unit, what = ep
        float_point = next((p for p in profile.points if p.data_type == "float32"), None)
        int_point = next((p for p in profile.points if REGISTER_COUNT[p.data_type] == 1), None)
        lines += ["", f"Read it from the simulator — {what}:", "", "```bash"]
        for p in (float_point, int_point):
            if p is not None:
                lines.append(f"{_mbpoll(profile, p, host, port, unit)}   # {p.metric}")
        lines += ["```"]
    return "\n".join(lines) + "\n"


def _mqtt_section(profile: MqttProfile) -> str:
    lines = [f"## `{profile.id}` — {profile.vendor} {profile.model} ({profile.kind}, MQTT)", ""]
    if profile.format == "bms-json":
        lines += [f"One message per point on `{profile.topic}` (tag path default `<site>/<module>/<rack>`), payload "
                  "`{\"value\": 41.2, \"timestamp\": 1763000000000, \"quality\": 1}` (timestamp in ms, quality 1 = "
                  "good). Retained metadata per point on the same topic with `/Metadata/` instead of `/Value/`: "
                  "`{\"unit\", \"metric\", \"device\"}`. A sensor in dropout publishes nothing.", ""]
    else:
        lines += [f"One JSON object per device reading on `{profile.topic}`: `{{\"ts\": <ms>, \"<point>\": value, ...}}`.",
                  ""]
    lines += ["| point | metric | scale | device unit | metric unit |", "| --- | --- | ---: | --- | --- |"]
    for p in profile.points:
        device_unit = "W" if (p.scale == 0.001 and p.unit == "kW") else p.unit
        lines.append(f"| `{p.point}` | `{p.metric}` | {p.scale:g} | {device_unit} | {CATALOG[p.metric].unit} |")
    if profile.format == "bms-json":
        lines += ["", "Watch the demo site's rack m1-r01 (`podwatch simulate --site examples/sites/demo.yaml` publishes to "
                  "the site's `mqtt.url`, default mqtt://127.0.0.1:1883):", "", "```bash",
                  "mosquitto_sub -h 127.0.0.1 -p 1883 -v -t 'BMS/v1/PUB/Value/Rack/+/demo/m1/m1-r01'",
                  "mosquitto_sub -h 127.0.0.1 -p 1883 -v -t 'BMS/v1/PUB/Value/Rack/RackLiquidReturnTemperature/#'",
                  "mosquitto_sub -h 127.0.0.1 -p 1883 -v -t 'BMS/v1/PUB/Metadata/#' -W 2   # retained metadata",
                  "```",
                  "", "Example message:", "", "```",
                  "BMS/v1/PUB/Value/Rack/RackLiquidReturnTemperature/demo/m1/m1-r01 "
                  "{\"value\":41.9321,\"timestamp\":1763000000000,\"quality\":1}", "```"]
    return "\n".join(lines) + "\n"


def render_devices_md() -> str:
    profiles = available_profiles()
    parts = [INTRO]
    for pid in sorted(profiles, key=lambda i: (isinstance(profiles[i], MqttProfile), i)):
        p = profiles[pid]
        parts.append(_modbus_section(p) if isinstance(p, ModbusProfile) else _mqtt_section(p))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_devices_md(), end="")
