"""The site model: one YAML file describes one site (`podwatch config validate FILE`,
`podwatch config schema`).

A site has a power path (substation transformers -> feeders/switchgear -> module busways ->
rack A/B feeds), prefab modules with CDUs and racks, and devices (rack PDUs, CDU controllers,
meters, rack sensors) attached to the equipment they measure, each with its protocol, address,
profile and poll interval. Gateways let several devices share one host:port by unit id.

Validation runs in layers and reports every error at once, each with its field path:
1. templates are expanded (`{template: ..., range: [1, 8]}` in any list);
2. pydantic parses the typed models (`extra="forbid"`: a misspelt key is an error);
3. site-wide checks: unique ids, references resolve (feeds, CDU racks, gateways, profiles),
   every rack on exactly one CDU and on an A and a B feed, no CDU over-subscribed by rated load,
   timeouts shorter than poll intervals, gateway protocol/addresses coherent.

`load_site(path) -> Site` returns the validated model; its helper methods give the flattened
views other stages use (`site.racks`, `site.devices`, `site.power_nodes`, ...).
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from podwatch.errors import ConfigError

SQRT3 = math.sqrt(3.0)
CONTINUOUS_LOAD_FACTOR = 0.8  # NEC 80 % rule: continuous load (>= 3 h) may use 80 % of a rating
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
DEFAULT_VOLTAGE_V = 415.0

Protocol = Literal["modbus-tcp", "modbus-rtu-over-tcp", "modbus-rtu", "mqtt"]
Side = Literal["a", "b"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- devices


class SerialSettings(_Model):
    port: str = Field(description="Serial device, e.g. /dev/ttyUSB0 or a pty")
    baudrate: int = Field(19200, gt=0)
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class Gateway(_Model):
    """A Modbus TCP or RTU-over-TCP gateway: one host:port, several unit ids behind it.
    Collectors open one connection per gateway and share it between its devices."""

    id: str = Field(pattern=ID_PATTERN)
    protocol: Literal["modbus-tcp", "modbus-rtu-over-tcp"] = "modbus-tcp"
    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    timeout_s: float = Field(0.5, gt=0, description="Per-request timeout")
    max_concurrent: int = Field(1, ge=1, description="Requests in flight on the one connection (1 for serial-backed gateways)")
    max_registers_per_read: int | None = Field(
        None, ge=1, le=125, description="Largest read this gateway forwards (many serial gateways take fewer than "
                                        "Modbus' 125); lowers every device's read plan behind it")
    max_gap: int | None = Field(None, ge=0, description="Unused registers a merged read may span behind this gateway "
                                                        "(0: never read registers the profile does not use)")


class DeviceSpec(_Model):
    """A device as written in the site file, attached to the equipment it measures."""

    id: str = Field(pattern=ID_PATTERN)
    profile: str = Field(description="Device profile id (podwatch/collectors/profiles or the site's profiles_dir)")
    protocol: Protocol | None = Field(None, description="Default: the gateway's protocol, 'mqtt' for MQTT profiles, else modbus-tcp")
    gateway: str | None = Field(None, description="Gateway id; alternative to host/port")
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (slave) id")
    serial: SerialSettings | None = Field(None, description="For protocol modbus-rtu")
    poll_interval_s: float | None = Field(None, gt=0, description="Default: site defaults.poll_interval_s")
    timeout_s: float | None = Field(None, gt=0, description="Per-request timeout; default: gateway's or site default")
    tag_path: str | None = Field(None, description="MQTT (BMS): tag path in topics; default: <site>/<module>/<entity>")
    enabled: bool = True
    @field_validator("tag_path")
    @classmethod
    def _tag_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "+" in v or "#" in v:
            raise ValueError(f"'{v}' contains an MQTT wildcard (+ or #); a published topic cannot contain one")
        if v.startswith("/") or v.endswith("/") or "//" in v or not v.strip():
            raise ValueError(f"'{v}' has an empty topic level (leading, trailing or double '/')")
        return v

    max_registers_per_read: int | None = Field(
        None, ge=1, le=125, description="Largest read this device answers; the plan uses the smallest of this, "
                                        "the gateway's and the profile's (or the collector's --max-registers)")
    max_gap: int | None = Field(None, ge=0, description="Unused registers a merged read may span for this device "
                                                        "(smallest of this, the gateway's and the profile's)")


class Defaults(_Model):
    poll_interval_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(0.5, gt=0)
    power_factor: float = Field(0.95, gt=0, le=1, description="Used to turn kVA ratings into kW")
    voltage_v: float = Field(DEFAULT_VOLTAGE_V, gt=0, description="Line-to-line voltage for ratings given in amperes")


# --------------------------------------------------------------------------- power path


class _Rated(_Model):
    """A rating given as kW, kVA, or amperes at a line-to-line voltage (three-phase)."""

    rating_kw: float | None = Field(None, gt=0)
    rating_kva: float | None = Field(None, gt=0)
    rating_a: float | None = Field(None, gt=0, description="Breaker/conductor rating, amperes per phase")
    voltage_v: float | None = Field(None, gt=0, description="Line-to-line voltage (default: site defaults.voltage_v)")
    derating: float = Field(1.0, gt=0, le=1, description="Extra derating (temperature, altitude, ...) applied before the 80 % rule")
    continuous_factor: float = Field(CONTINUOUS_LOAD_FACTOR, gt=0, le=1, description="80 % continuous-load rule")

    @model_validator(mode="after")
    def _one_rating(self):
        given = [n for n in ("rating_kw", "rating_kva", "rating_a") if getattr(self, n) is not None]
        if not given:
            raise ValueError("a rating is required: rating_kw, rating_kva or rating_a")
        if len(given) > 1:
            raise ValueError(f"give one rating, not {' and '.join(given)}")
        return self

    def nameplate_kw(self, defaults: Defaults) -> float:
        if self.rating_kw is not None:
            return self.rating_kw
        kva = self.rating_kva if self.rating_kva is not None else SQRT3 * (self.voltage_v or defaults.voltage_v) * self.rating_a / 1000.0
        return kva * defaults.power_factor

    def usable_kw(self, defaults: Defaults) -> float:
        return self.nameplate_kw(defaults) * self.derating * self.continuous_factor


class Transformer(_Rated):
    id: str = Field(pattern=ID_PATTERN)
    primary_kv: float | None = Field(None, gt=0)
    secondary_kv: float | None = Field(None, gt=0)
    meter: DeviceSpec | None = Field(None, description="Revenue/substation meter on the secondary")


class Feeder(_Rated):
    id: str = Field(pattern=ID_PATTERN)
    transformer: str = Field(description="Transformer id this feeder/switchgear section hangs from")
    side: Side | None = Field(None, description="A or B distribution path")
    meter: DeviceSpec | None = None


class Power(_Model):
    transformers: list[Transformer] = Field(min_length=1)
    feeders: list[Feeder] = Field(default_factory=list)


class Busway(_Rated):
    id: str = Field(pattern=ID_PATTERN)
    feeder: str = Field(description="Feeder id")
    side: Side | None = None
    meter: DeviceSpec | None = None


# --------------------------------------------------------------------------- cooling and racks


class CduSpec(_Model):
    id: str = Field(pattern=ID_PATTERN)
    capacity_kw: float = Field(gt=0, description="Heat removal capacity at the design approach")
    approach_c: float = Field(4.0, gt=0, description="Design approach: secondary supply minus facility water supply")
    pumps: int = Field(2, ge=1, le=4, description="Installed pumps")
    pump_redundancy: Literal["N", "N+1", "2N"] = "N+1"
    pump_flow_lpm: float = Field(900.0, gt=0, description="Rated flow of one pump at design head")
    supply_setpoint_c: float = Field(30.0, description="Secondary supply temperature setpoint")
    facility_supply_c: float = Field(24.0, description="Design facility water supply temperature")
    heat_to_liquid: float = Field(0.88, gt=0, le=1, description="Share of rack IT heat carried by the liquid loop")
    racks: list[str] = Field(default_factory=list, description="Ids of the racks this CDU cools")
    device: DeviceSpec | None = None

    @property
    def working_pumps(self) -> int:
        """Pumps that must run for full flow: N+1 keeps one standby, 2N keeps half."""
        if self.pump_redundancy == "N+1":
            return max(1, self.pumps - 1)
        if self.pump_redundancy == "2N":
            return max(1, self.pumps // 2)
        return self.pumps


class RackFeeds(_Model):
    a: str = Field(description="Power node (busway or feeder) id of the A feed")
    b: str = Field(description="Power node (busway or feeder) id of the B feed")


class RackWhips(_Model):
    """Rack power entry per side: N three-phase whips (e.g. 415 V / 60 A = 43.1 kVA nameplate)."""

    per_side: int = Field(5, ge=1, description="Whips per side (A or B)")
    rating_a: float = Field(60.0, gt=0)
    voltage_v: float | None = Field(None, gt=0, description="Line-to-line voltage (default: site defaults.voltage_v)")

    def side_kva(self) -> float:
        return self.per_side * SQRT3 * (self.voltage_v or DEFAULT_VOLTAGE_V) * self.rating_a / 1000.0


class RackSpec(_Model):
    id: str = Field(pattern=ID_PATTERN)
    rated_kw: float = Field(gt=0, description="Rated (provisioned) IT power")
    workload: Literal["inference", "training", "mixed"] = "inference"
    feeds: RackFeeds
    whips: RackWhips = Field(default_factory=RackWhips)
    cdu: str | None = Field(None, description="Optional; must agree with the CDU's racks list")
    design_flow_lpm_per_kw: float = Field(1.2, gt=0, description="Design coolant flow per kW of rated load")
    return_limit_c: float | None = Field(None, description="Coolant return limit (GPU throttling); default: site thermal")
    pdus: dict[Side, DeviceSpec] = Field(default_factory=dict, description="Rack PDUs by feed side")
    sensors: DeviceSpec | None = Field(None, description="Rack liquid/leak sensors (e.g. BMS over MQTT)")


class Module(_Model):
    id: str = Field(pattern=ID_PATTERN)
    name: str | None = None
    busways: list[Busway] = Field(default_factory=list)
    cdus: list[CduSpec] = Field(default_factory=list)
    racks: list[RackSpec] = Field(default_factory=list)


class Thermal(_Model):
    rack_return_limit_c: float = Field(55.0, description="Coolant return temperature where GPUs throttle (the breach)")
    risk_horizon_s: int = Field(300, gt=0, description="Horizon of the thermal-risk probability")
    dew_point_margin_c: float = Field(3.0, ge=0, description="Supply must stay this far above dew point")
    room_dew_point_c: float = Field(12.0, description="Design room dew point")


class MqttSettings(_Model):
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt:// or mqtts://host:port")
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    protocol: Literal["3.1.1", "5"] = "5"
    qos: Literal[0, 1] = 1
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^mqtts?://[^:/]+(:\d+)?/?$", v):
            raise ValueError(f"'{v}' is not mqtt://host:port or mqtts://host:port")
        return v


class SiteInfo(_Model):
    id: str = Field(pattern=ID_PATTERN)
    name: str | None = None
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            from zoneinfo import available_timezones

            same = [z for z in available_timezones() if z.lower() == str(v).lower()]
            hint = f"; did you mean '{same[0]}'?" if same else " (an IANA name such as Europe/Berlin or UTC)"
            raise ValueError(f"unknown time zone '{v}'{hint}") from None
        return v


class SiteSpec(_Model):
    """The whole site file."""

    site: SiteInfo
    defaults: Defaults = Field(default_factory=Defaults)
    thermal: Thermal = Field(default_factory=Thermal)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    profiles_dir: str | None = Field(None, description="Extra device profiles, relative to the site file")
    gateways: list[Gateway] = Field(default_factory=list)
    power: Power
    modules: list[Module] = Field(min_length=1)

    @model_validator(mode="after")
    def _whips_default_to_site_voltage(self):
        """Whips are rated in amperes; like every rating in amperes they are at the site's
        `defaults.voltage_v` unless they name their own voltage."""
        for m in self.modules:
            for r in m.racks:
                if r.whips.voltage_v is None:
                    r.whips.voltage_v = self.defaults.voltage_v
        return self


# --------------------------------------------------------------------------- flattened views


@dataclass(frozen=True)
class Device:
    """A device with every default resolved: what collectors poll and the simulator serves."""

    id: str
    kind: str  # pdu | meter | cdu | rack  (from the profile)
    profile: str
    protocol: str
    host: str | None
    port: int | None
    unit_id: int
    serial: SerialSettings | None
    gateway: str | None
    poll_interval_s: float
    timeout_s: float
    entity: str  # rack / cdu / power-node id the device measures
    module: str | None
    side: str | None  # 'a' / 'b' for PDUs and metered feeds
    tag_path: str | None
    enabled: bool
    path: str  # field path in the site file, for messages
    # Read-size limits from the site file (the device's and its gateway's, the smaller of the two);
    # None = none given there. The read planner applies them on top of the profile's values.
    max_registers_per_read: int | None = None
    max_gap: int | None = None

    @property
    def endpoint(self) -> str:
        """Connection key: devices with the same endpoint share one connection."""
        if self.protocol == "modbus-rtu" and self.serial is not None:
            return f"serial:{self.serial.port}"
        if self.protocol == "mqtt":
            return "mqtt"
        return f"{self.protocol}://{self.host}:{self.port}"


@dataclass(frozen=True)
class PowerNode:
    id: str
    kind: str  # transformer | feeder | busway | rack_feed
    parent: str | None
    side: str | None
    module: str | None
    nameplate_kw: float
    usable_kw: float  # nameplate x derating x 80 %


@dataclass(frozen=True)
class Rack:
    id: str
    module: str
    cdu: str
    rated_kw: float
    workload: str
    feed_a: str
    feed_b: str
    design_flow_lpm: float
    return_limit_c: float
    spec: RackSpec = field(repr=False)


@dataclass
class Site:
    spec: SiteSpec
    source: Path | None = None
    devices: list[Device] = field(default_factory=list)
    power_nodes: dict[str, PowerNode] = field(default_factory=dict)
    racks: list[Rack] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.spec.site.id

    @property
    def cdus(self) -> list[CduSpec]:
        return [c for m in self.spec.modules for c in m.cdus]

    @property
    def modules(self) -> list[Module]:
        return self.spec.modules

    def cdu(self, cdu_id: str) -> CduSpec:
        return next(c for c in self.cdus if c.id == cdu_id)

    def module_of_cdu(self, cdu_id: str) -> str:
        return next(m.id for m in self.spec.modules for c in m.cdus if c.id == cdu_id)

    def rack(self, rack_id: str) -> Rack:
        return next(r for r in self.racks if r.id == rack_id)

    def device(self, device_id: str) -> Device:
        return next(d for d in self.devices if d.id == device_id)

    def racks_of_cdu(self, cdu_id: str) -> list[Rack]:
        return [r for r in self.racks if r.cdu == cdu_id]

    def power_path(self, node_id: str) -> list[PowerNode]:
        """Node and its ancestors up to the transformer, nearest first."""
        path, node = [], self.power_nodes.get(node_id)
        while node is not None:
            path.append(node)
            node = self.power_nodes.get(node.parent) if node.parent else None
        return path

    def children(self, node_id: str) -> list[PowerNode]:
        return [n for n in self.power_nodes.values() if n.parent == node_id]

    @property
    def profiles_dir(self) -> Path | None:
        if not self.spec.profiles_dir:
            return None
        base = self.source.parent if self.source else Path.cwd()
        return (base / self.spec.profiles_dir).resolve()


# --------------------------------------------------------------------------- templates

_ALLOWED_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                   ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_PLACEHOLDER = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


class _Unbound(Exception):
    """A placeholder names a variable of an inner template; leave it for that template."""


def _eval_int_expr(expr: str, variables: dict[str, int]) -> int:
    """Evaluate a tiny integer expression (names, ints, + - * // %): `i`, `i+100`, `(i-1)//8+1`."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in variables:
                return variables[node.id]
            raise _Unbound(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_BINOPS:
            left, right = ev(node.left), ev(node.right)
            if right == 0 and type(node.op) in (ast.FloorDiv, ast.Mod):
                raise ValueError(f"division by zero in template expression '{expr}'")
            return _ALLOWED_BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"unsupported template expression '{expr}' (use variables {sorted(variables)}, integers, + - * // %)")

    try:
        return ev(ast.parse(expr.strip(), mode="eval"))
    except SyntaxError:
        raise ValueError(f"bad template expression '{expr}'") from None


def _render(value: Any, variables: dict[str, int]) -> Any:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(2) is None:  # "{i+100}" alone -> an integer
            try:
                return _eval_int_expr(whole.group(1), variables)
            except _Unbound:
                return value

        def substitute(m: re.Match) -> str:
            try:
                number = _eval_int_expr(m.group(1), variables)
            except _Unbound:
                return m.group(0)
            try:
                return format(number, m.group(2) or "")
            except ValueError:
                raise ValueError(f"bad format '{m.group(2)}' in '{m.group(0)}' (e.g. {{i:02d}})") from None

        return _PLACEHOLDER.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _render(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, variables) for v in value]
    return value


def _is_template(item: Any) -> bool:
    return isinstance(item, dict) and "template" in item and set(item) <= {"template", "range", "for"}


MAX_TEMPLATE_ITEMS = 20_000  # one template expanding to more is a typo (range: [1, 100000000]), not a site


def _unbound_placeholders(value: Any) -> list[str]:
    """Placeholders left after a template was fully expanded: they name a variable no loop defines."""
    found: list[str] = []
    if isinstance(value, str):
        for m in _PLACEHOLDER.finditer(value):
            try:
                _eval_int_expr(m.group(1), {})
            except _Unbound as exc:
                found.append(f"'{m.group(0)}' uses unknown variable '{exc.args[0]}'")
            except ValueError:
                pass  # not an expression at all (e.g. '{}' in a description): left as written
    elif isinstance(value, dict):
        for v in value.values():
            found.extend(_unbound_placeholders(v))
    elif isinstance(value, list):
        for v in value:
            found.extend(_unbound_placeholders(v))
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expand_templates(data: Any, path: str = "", errors: list[str] | None = None,
                     scope: dict[str, int] | None = None) -> Any:
    """Expand `{template: X, range: [first, last]}` (variable `i`) or `{template: X, for: {name: [first, last]}}`
    list items into one item per value, recursively. Templates may nest (a rack template holding
    PDU templates is rendered with the rack's variables); an inner template sees the variables of
    the templates around it (`scope`), so `unit_id: "{24*(i-1)+k}"` may mix an outer `i` and an inner `k`."""
    errors = [] if errors is None else errors
    scope = scope or {}
    if isinstance(data, dict):
        return {k: expand_templates(v, f"{path}.{k}" if path else str(k), errors, scope) for k, v in data.items()}
    if isinstance(data, list):
        out: list[Any] = []
        for idx, item in enumerate(data):
            here = f"{path}[{idx}]"
            if not _is_template(item):
                out.append(expand_templates(item, here, errors, scope))
                continue
            if "for" in item and "range" in item:
                errors.append(f"{here}: give either 'range' or 'for', not both")
                continue
            if "for" in item:
                loops, loops_path = item["for"], f"{here}.for"
                if not isinstance(loops, dict) or not loops:
                    errors.append(f"{loops_path}: expected a mapping {{name: [first, last]}}, got {loops!r}")
                    continue
            elif "range" in item:
                loops, loops_path = {"i": item["range"]}, f"{here}.range"
            else:
                errors.append(f"{here}: a template needs 'range: [first, last]' or 'for: {{name: [first, last]}}'")
                continue
            combos: list[dict[str, int]] = [{}]
            bad = False
            for name, bounds in loops.items():
                where = loops_path if "range" in item else f"{loops_path}.{name}"
                if not (isinstance(name, str) and name.isidentifier()):
                    errors.append(f"{where}: variable name {name!r} must be a plain name such as i or j")
                    bad = True
                    break
                if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_int(b) for b in bounds)
                        and bounds[0] <= bounds[1]):
                    errors.append(f"{where}: expected [first, last] integers with first <= last, got {bounds!r}")
                    bad = True
                    break
                count = len(combos) * (bounds[1] - bounds[0] + 1)
                if count > MAX_TEMPLATE_ITEMS:
                    errors.append(f"{where}: expands to {count:,} items; at most {MAX_TEMPLATE_ITEMS:,} per template")
                    bad = True
                    break
                combos = [{**c, name: n} for c in combos for n in range(bounds[0], bounds[1] + 1)]
            if bad:
                continue
            for combo in combos:
                variables = {**scope, **combo}
                try:
                    rendered = expand_templates(_render(item["template"], variables), here, errors, variables)
                except ValueError as exc:
                    errors.append(f"{here}.template: {exc}")
                    break
                unbound = _unbound_placeholders(rendered)
                if unbound:
                    errors.append(f"{here}.template: {unbound[0]} (defined here: {', '.join(sorted(variables))})")
                    break
                out.append(rendered)
        return out
    return data


# --------------------------------------------------------------------------- validation


def _loc_to_path(loc: tuple, skip: tuple[str, ...] = ()) -> str:
    out = ""
    for part in loc:
        if part in skip:  # a discriminated union's tag (e.g. a fault kind): not a key the user wrote
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        elif part == "[key]":  # pydantic's marker for a bad mapping key: the path already names it
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_field_names(*models: type[BaseModel]) -> set[str]:
    """Every field name of these models and the models nested in them (for 'did you mean')."""
    names: set[str] = set()
    todo, seen = list(models), set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            for arg in _type_args(info.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
    return names


def _type_args(annotation: Any) -> list[Any]:
    import typing

    out, todo = [], [annotation]
    while todo:
        a = todo.pop()
        out.append(a)
        todo.extend(typing.get_args(a))
    return out


def pydantic_error_lines(exc: ValidationError, skip: tuple[str, ...] = (),
                         fields_hint: str = "`podwatch config schema` lists the fields",
                         known_fields: set[str] | None = None) -> list[str]:
    """One line per problem, `field.path: what is wrong, got <value>`, for any podwatch config model."""
    msgs = []
    for err in exc.errors():
        path = _loc_to_path(err["loc"], skip) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_not_found":
            msg = f"'{err['ctx']['discriminator'].strip(chr(39))}' is missing"
        elif err["type"] == "union_tag_invalid":
            msg = f"{err['ctx']['discriminator'].strip(chr(39))} {err['ctx']['tag']!r} is not one of {err['ctx']['expected_tags']}"
        elif err["type"] == "extra_forbidden":
            key = str(err["loc"][-1]) if err["loc"] else ""
            candidates = (known_fields or set()) - {key}  # a name valid elsewhere is wrong here: look for its neighbour
            close = difflib.get_close_matches(key.lower(), candidates, n=1, cutoff=0.75)
            msg = (f"unknown field; did you mean '{close[0]}'?" if close
                   else f"unknown field (check the spelling; {fields_hint})")
        elif err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == ID_PATTERN:
            msg = f"ids start with a letter or digit and use only letters, digits and _ . : - (no spaces), got {_short(err['input'])}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "[key]" in err["loc"]:
            msg = f"key {_short(err.get('input'))}: {msg}"
        elif not err["type"].startswith(("value_error", "assertion_error")) and "input" in err:
            msg = f"{msg}, got {_short(err['input'])}"  # the value the user wrote, to find it in the file
        msg = re.sub(r" or instance of \w+", "", msg)  # pydantic names our class; the path says what it is
        msgs.append(f"{path}: {msg}")
    return msgs


def _site_checks(spec: SiteSpec, source: Path | None) -> tuple[list[str], Site]:
    """Cross-checks over the whole site; returns (errors, flattened site)."""
    from podwatch.collectors.profiles import MqttProfile, profiles_with_errors

    errors: list[str] = []
    site = Site(spec=spec, source=source)
    d = spec.defaults

    # unique ids per namespace
    def unique(items: list[tuple[str, str]], what: str) -> None:
        seen: dict[str, str] = {}
        for ident, path in items:
            if ident in seen:
                errors.append(f"{path}.id: duplicate {what} id '{ident}' (also at {seen[ident]})")
            else:
                seen[ident] = path

    unique([(m.id, f"modules[{i}]") for i, m in enumerate(spec.modules)], "module")
    unique([(g.id, f"gateways[{i}]") for i, g in enumerate(spec.gateways)], "gateway")
    racks_paths = [(r.id, f"modules[{mi}].racks[{ri}]") for mi, m in enumerate(spec.modules) for ri, r in enumerate(m.racks)]
    unique(racks_paths, "rack")
    unique([(c.id, f"modules[{mi}].cdus[{ci}]") for mi, m in enumerate(spec.modules) for ci, c in enumerate(m.cdus)], "CDU")
    node_paths = ([(t.id, f"power.transformers[{i}]") for i, t in enumerate(spec.power.transformers)]
                  + [(f.id, f"power.feeders[{i}]") for i, f in enumerate(spec.power.feeders)]
                  + [(b.id, f"modules[{mi}].busways[{bi}]") for mi, m in enumerate(spec.modules) for bi, b in enumerate(m.busways)])
    unique(node_paths, "power node")

    # power path
    for t in spec.power.transformers:
        site.power_nodes[t.id] = PowerNode(t.id, "transformer", None, None, None, t.nameplate_kw(d), t.usable_kw(d))
    transformer_ids = {t.id for t in spec.power.transformers}
    for i, f in enumerate(spec.power.feeders):
        if f.transformer not in transformer_ids:
            errors.append(f"power.feeders[{i}].transformer: unknown transformer '{f.transformer}'")
        site.power_nodes[f.id] = PowerNode(f.id, "feeder", f.transformer, f.side, None, f.nameplate_kw(d), f.usable_kw(d))
    feeder_ids = {f.id for f in spec.power.feeders}
    for mi, m in enumerate(spec.modules):
        for bi, b in enumerate(m.busways):
            if b.feeder not in feeder_ids:
                errors.append(f"modules[{mi}].busways[{bi}].feeder: unknown feeder '{b.feeder}'")
            side = b.side or (site.power_nodes[b.feeder].side if b.feeder in site.power_nodes else None)
            site.power_nodes[b.id] = PowerNode(b.id, "busway", b.feeder, side, m.id, b.nameplate_kw(d), b.usable_kw(d))

    # racks, feeds, CDUs
    cdu_of_rack: dict[str, list[str]] = {}
    rack_ids = {r.id for m in spec.modules for r in m.racks}
    for mi, m in enumerate(spec.modules):
        for ci, c in enumerate(m.cdus):
            for k, rid in enumerate(c.racks):
                if rid not in rack_ids:
                    errors.append(f"modules[{mi}].cdus[{ci}].racks[{k}]: unknown rack '{rid}'")
                cdu_of_rack.setdefault(rid, []).append(c.id)
    cdus_by_id = {c.id: c for m in spec.modules for c in m.cdus}
    for mi, m in enumerate(spec.modules):
        for ri, r in enumerate(m.racks):
            here = f"modules[{mi}].racks[{ri}]"
            for side in ("a", "b"):
                node_id = getattr(r.feeds, side)
                node = site.power_nodes.get(node_id)
                if node is None or node.kind == "transformer":
                    errors.append(f"{here}.feeds.{side}: unknown feeder '{node_id}' (expected a busway or feeder id)")
                elif node.side is not None and node.side != side:
                    errors.append(f"{here}.feeds.{side}: '{node_id}' is on side {node.side.upper()}, not {side.upper()}")
            if r.feeds.a == r.feeds.b:
                errors.append(f"{here}.feeds: A and B feeds are both '{r.feeds.a}'; a rack needs two independent feeds")
            cdus = list(cdu_of_rack.get(r.id, []))
            if r.cdu is not None and r.cdu not in cdus:
                if r.cdu not in cdus_by_id:
                    errors.append(f"{here}.cdu: unknown CDU '{r.cdu}'")
                cdus.append(r.cdu)
            if len(cdus) == 0:
                errors.append(f"{here}: rack '{r.id}' is cooled by no CDU (list it in a CDU's racks)")
            elif len(set(cdus)) > 1:
                errors.append(f"{here}: rack '{r.id}' is on {len(set(cdus))} CDUs ({', '.join(sorted(set(cdus)))}); it must be on exactly one")
            side_kw = r.whips.side_kva() * d.power_factor * CONTINUOUS_LOAD_FACTOR
            if r.rated_kw > side_kw + 1e-9:
                errors.append(f"{here}.whips: one side carries {side_kw:.1f} kW usable ({r.whips.per_side} x "
                              f"{r.whips.rating_a:g} A at {r.whips.voltage_v:g} V, 80 %), less than the rated {r.rated_kw:g} kW "
                              f"that each side must carry alone (A/B 2N)")
            for side in ("a", "b"):
                feed_id = f"{r.id}/{side}"
                parent = getattr(r.feeds, side)
                site.power_nodes[feed_id] = PowerNode(feed_id, "rack_feed", parent, side, m.id,
                                                      r.whips.side_kva() * d.power_factor, side_kw)
            if True:  # keep going: later checks report more errors
                site.racks.append(Rack(
                    id=r.id, module=m.id, cdu=cdus[0] if cdus else "", rated_kw=r.rated_kw, workload=r.workload,
                    feed_a=r.feeds.a, feed_b=r.feeds.b, design_flow_lpm=r.rated_kw * r.design_flow_lpm_per_kw,
                    return_limit_c=r.return_limit_c if r.return_limit_c is not None else spec.thermal.rack_return_limit_c,
                    spec=r))

    # CDU load vs capacity, pumps vs design flow
    rated = {r.id: r.rated_kw for m in spec.modules for r in m.racks}
    flow = {r.id: r.rated_kw * r.design_flow_lpm_per_kw for m in spec.modules for r in m.racks}
    for mi, m in enumerate(spec.modules):
        for ci, c in enumerate(m.cdus):
            heat_kw = sum(rated.get(rid, 0.0) for rid in c.racks) * c.heat_to_liquid
            if heat_kw > c.capacity_kw + 1e-9:
                errors.append(f"modules[{mi}].cdus[{ci}]: over-subscribed: racks' rated heat to liquid {heat_kw:.0f} kW "
                              f"(rated {heat_kw / c.heat_to_liquid:.0f} kW x {c.heat_to_liquid:g}) exceeds capacity {c.capacity_kw:g} kW")
            need_lpm = sum(flow.get(rid, 0.0) for rid in c.racks)
            have_lpm = c.working_pumps * c.pump_flow_lpm
            if need_lpm > have_lpm + 1e-9:
                errors.append(f"modules[{mi}].cdus[{ci}]: design flow {need_lpm:.0f} L/min exceeds {c.working_pumps} working "
                              f"pump(s) x {c.pump_flow_lpm:g} L/min = {have_lpm:.0f} L/min ({c.pump_redundancy})")
            if c.pump_redundancy == "N+1" and c.pumps < 2:
                errors.append(f"modules[{mi}].cdus[{ci}].pumps: N+1 needs at least 2 pumps, got {c.pumps}")
            if c.supply_setpoint_c < c.facility_supply_c + c.approach_c:
                errors.append(f"modules[{mi}].cdus[{ci}].supply_setpoint_c: {c.supply_setpoint_c:g} °C is below facility water "
                              f"{c.facility_supply_c:g} °C + approach {c.approach_c:g} K; the CDU cannot reach it")

    # devices
    profiles_dir = None
    if spec.profiles_dir:
        profiles_dir = ((source.parent if source else Path.cwd()) / spec.profiles_dir).resolve()
        if not profiles_dir.is_dir():
            errors.append(f"profiles_dir: '{spec.profiles_dir}' is not a directory")
            profiles_dir = None
    profiles, profile_errors = profiles_with_errors(profiles_dir)
    errors.extend(f"profiles_dir: {e}" for e in profile_errors)
    gateways = {g.id: g for g in spec.gateways}

    attached: list[tuple[DeviceSpec, str, str, str | None, str | None]] = []  # (spec, path, entity, module, side)
    for i, t in enumerate(spec.power.transformers):
        if t.meter:
            attached.append((t.meter, f"power.transformers[{i}].meter", t.id, None, None))
    for i, f in enumerate(spec.power.feeders):
        if f.meter:
            attached.append((f.meter, f"power.feeders[{i}].meter", f.id, None, f.side))
    for mi, m in enumerate(spec.modules):
        for bi, b in enumerate(m.busways):
            if b.meter:
                attached.append((b.meter, f"modules[{mi}].busways[{bi}].meter", b.id, m.id, site.power_nodes[b.id].side))
        for ci, c in enumerate(m.cdus):
            if c.device:
                attached.append((c.device, f"modules[{mi}].cdus[{ci}].device", c.id, m.id, None))
        for ri, r in enumerate(m.racks):
            for side, pdu in r.pdus.items():
                attached.append((pdu, f"modules[{mi}].racks[{ri}].pdus.{side}", r.id, m.id, side))
            if r.sensors:
                attached.append((r.sensors, f"modules[{mi}].racks[{ri}].sensors", r.id, m.id, None))

    seen_ids: dict[str, str] = {}
    seen_addr: dict[tuple, str] = {}
    protocol_at: dict[tuple, tuple[str, str]] = {}  # (host, port) -> (protocol, first device path)
    serial_lines: dict[str, tuple[SerialSettings, str]] = {}  # serial port -> (settings, first device path)
    for dev, path, entity, module, side in attached:
        if dev.id in seen_ids:
            errors.append(f"{path}.id: duplicate device id '{dev.id}' (also at {seen_ids[dev.id]})")
            continue
        seen_ids[dev.id] = path
        profile = profiles.get(dev.profile)
        if profile is None:
            errors.append(f"{path}.profile: unknown profile '{dev.profile}'; known: {', '.join(sorted(profiles)) or 'none'}")
            continue
        expected_kinds = {"pdus": {"pdu"}, "sensors": {"rack"}, "device": {"cdu"}, "meter": {"meter"}}
        slot = "pdus" if ".pdus." in path else path.rsplit(".", 1)[-1]
        if slot in expected_kinds and profile.kind not in expected_kinds[slot]:
            # checked first: a PDU profile under `sensors` is the mistake, not its missing host
            errors.append(f"{path}.profile: '{dev.profile}' is a {profile.kind} profile; this slot needs a "
                          f"{'/'.join(sorted(expected_kinds[slot]))} profile")
            continue
        is_mqtt_profile = isinstance(profile, MqttProfile)
        gw = None
        if dev.gateway is not None:
            gw = gateways.get(dev.gateway)
            if gw is None:
                errors.append(f"{path}.gateway: unknown gateway '{dev.gateway}'")
                continue
            if dev.host or dev.port:
                errors.append(f"{path}: give either gateway or host/port, not both")
        protocol = dev.protocol or (gw.protocol if gw else ("mqtt" if is_mqtt_profile else "modbus-tcp"))
        if is_mqtt_profile != (protocol == "mqtt"):
            errors.append(f"{path}.protocol: profile '{dev.profile}' is {'an MQTT' if is_mqtt_profile else 'a Modbus'} "
                          f"profile but protocol is '{protocol}'")
            continue
        if gw is not None and dev.protocol and dev.protocol != gw.protocol:
            errors.append(f"{path}.protocol: '{dev.protocol}' differs from gateway '{gw.id}' protocol '{gw.protocol}'")
        host = gw.host if gw else dev.host
        port = gw.port if gw else dev.port
        if protocol in ("modbus-tcp", "modbus-rtu-over-tcp"):
            if not host:
                errors.append(f"{path}: {protocol} needs host and port, or a gateway")
                continue
            port = port or 502
            if protocol == "modbus-rtu-over-tcp" and not 1 <= dev.unit_id <= 247:
                # the gateway forwards RTU frames: 0 is broadcast (no answer), 248..255 are reserved
                errors.append(f"{path}.unit_id: RTU unit ids are 1..247 (behind an RTU-over-TCP gateway), got {dev.unit_id}")
            first_protocol = protocol_at.setdefault((host, port), (protocol, path))
            if first_protocol[0] != protocol:
                errors.append(f"{path}: {host}:{port} is {protocol} here but {first_protocol[0]} at {first_protocol[1]}; "
                              "one port speaks one framing")
            key = (host, port, dev.unit_id)
            if key in seen_addr:
                errors.append(f"{path}.unit_id: {host}:{port} unit {dev.unit_id} is already used by {seen_addr[key]}")
            seen_addr.setdefault(key, path)
        elif protocol == "modbus-rtu":
            if dev.serial is None:
                errors.append(f"{path}.serial: modbus-rtu needs serial settings (port, baudrate, parity)")
                continue
            if not 1 <= dev.unit_id <= 247:
                errors.append(f"{path}.unit_id: RTU unit ids are 1..247, got {dev.unit_id}")
            line = serial_lines.setdefault(dev.serial.port, (dev.serial, path))
            if line[0] != dev.serial:  # one RS-485 line runs at one speed and framing
                errors.append(f"{path}.serial: {dev.serial.port} is {_serial_text(dev.serial)} here but "
                              f"{_serial_text(line[0])} at {line[1]}")
            key = ("serial", dev.serial.port, dev.unit_id)
            if key in seen_addr:
                errors.append(f"{path}.unit_id: {dev.serial.port} unit {dev.unit_id} is already used by {seen_addr[key]}")
            seen_addr.setdefault(key, path)
        poll = dev.poll_interval_s or d.poll_interval_s
        timeout = dev.timeout_s or (gw.timeout_s if gw else d.timeout_s)
        if protocol != "mqtt" and timeout >= poll:
            errors.append(f"{path}.timeout_s: timeout {timeout:g} s must be shorter than the poll interval {poll:g} s")
        tag_path = dev.tag_path or (f"{spec.site.id}/{module}/{entity}" if module else f"{spec.site.id}/{entity}")
        if protocol == "mqtt":
            key = ("mqtt", dev.profile, tag_path)  # the collector finds a BMS device by its tag path
            if key in seen_addr:
                errors.append(f"{path}.tag_path: '{tag_path}' is already used by {seen_addr[key]} (same profile): "
                              "their messages could not be told apart")
            seen_addr.setdefault(key, path)
        max_regs = _smallest(dev.max_registers_per_read, gw.max_registers_per_read if gw else None)
        max_gap = _smallest(dev.max_gap, gw.max_gap if gw else None)
        if protocol == "mqtt" and (dev.max_registers_per_read is not None or dev.max_gap is not None):
            errors.append(f"{path}: max_registers_per_read / max_gap apply to Modbus devices, not MQTT")
        elif protocol != "mqtt" and (max_regs is not None or max_gap is not None):
            from podwatch.collectors.planner import plan_reads

            try:  # an int64 point cannot be read 2 registers at a time: say so here, not at collect time
                plan_reads(profile, _smallest(max_regs, profile.max_registers_per_read), _smallest(max_gap, profile.max_gap))
            except ConfigError as exc:
                where = (f"{path}.max_registers_per_read" if dev.max_registers_per_read is not None
                         else f"{path} (gateway '{gw.id}' max_registers_per_read)")
                errors.extend(f"{where}: {e}" for e in exc.errors)
        site.devices.append(Device(
            id=dev.id, kind=profile.kind, profile=dev.profile, protocol=protocol, host=host,
            port=port if protocol != "mqtt" else None, unit_id=dev.unit_id, serial=dev.serial,
            gateway=dev.gateway, poll_interval_s=poll, timeout_s=timeout, entity=entity, module=module, side=side,
            tag_path=tag_path, enabled=dev.enabled, path=path, max_registers_per_read=max_regs, max_gap=max_gap))
    return errors, site


def _serial_text(serial: SerialSettings) -> str:
    return f"{serial.baudrate} {serial.bytesize}{serial.parity}{serial.stopbits}"


def _smallest(*limits: int | None) -> int | None:
    """The tightest of the limits given (None = no limit given)."""
    given = [x for x in limits if x is not None]
    return min(given) if given else None


def parse_site(data: Any, source: str = "<site>", base: Path | None = None, port_offset: int = 0) -> Site:
    """Validate a site given as parsed YAML/JSON data. Raises ConfigError with every error.

    `port_offset` shifts every Modbus TCP port (gateways and devices) by that many, so the same
    site file can run several times on one machine (tests, demo beside a real collector)."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["<root>: a site file must be a mapping (site:, power:, modules:, ...)"])
    template_errors: list[str] = []
    expanded = expand_templates(data, errors=template_errors)
    if template_errors:  # a mistake inside an outer template repeats once per outer value: report it once
        raise ConfigError(source, list(dict.fromkeys(template_errors)))
    try:
        spec = SiteSpec.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(source, pydantic_error_lines(exc, known_fields=model_field_names(SiteSpec))) from None
    errors, site = _site_checks(spec, base)
    if errors:
        raise ConfigError(source, errors)
    if port_offset:
        site = shift_ports(site, port_offset)
    return site


def shift_ports(site: Site, offset: int) -> Site:
    """A copy of `site` with every TCP device port shifted by `offset`."""
    import dataclasses

    bad = [f"{d.path}: port {d.port} + offset {offset} = {d.port + offset} is outside 1..65535"
           for d in site.devices if d.port and not 1 <= d.port + offset <= 65535]
    if bad:
        raise ConfigError("--port-offset", bad[:5] + ([f"... and {len(bad) - 5} more"] if len(bad) > 5 else []))
    spec = site.spec.model_copy(deep=True)
    for g in spec.gateways:
        g.port += offset
    devices = [dataclasses.replace(d, port=d.port + offset) if d.port else d for d in site.devices]
    return Site(spec=spec, source=site.source, devices=devices, power_nodes=site.power_nodes, racks=site.racks)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping: plain YAML keeps the last one and
    silently drops the first (a second `racks:` would lose a whole rack list)."""


def _construct_mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in list(node.value):  # explicit keys only: they may override `<<: *anchor` merged ones
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # unhashable key: let the constructor report it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates)


def read_yaml_file(path: str | Path, what: str = "file") -> Any:
    """Parse a YAML file for a user: every failure (missing, a directory, not UTF-8, bad syntax,
    a duplicate key, empty) is a ConfigError with the line and column, never a traceback."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(str(path), [f"is a directory, not a {what}"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [f"line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the {what} as UTF-8"]) from None
    if not text.strip():
        raise ConfigError(str(path), [f"<root>: the {what} is empty"])
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{where}invalid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError(str(path), [f"invalid YAML: nested too deeply"]) from None
    if data is None:
        raise ConfigError(str(path), [f"<root>: the {what} holds only comments"])
    if _too_big(data, MAX_YAML_VALUES):
        # aliases of aliases ("billion laughs") load as shared objects but every walk over them is exponential
        raise ConfigError(str(path), [f"<root>: the {what} expands to more than {MAX_YAML_VALUES:,} values "
                                      "(YAML aliases nested in aliases?)"])
    return data


MAX_YAML_VALUES = 2_000_000


def _too_big(data: Any, budget: int) -> bool:
    """True when the tree, with aliases expanded, holds more than `budget` values (stops early)."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > budget:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def load_site(path: str | Path, port_offset: int = 0) -> Site:
    """Read and validate a site file. Raises ConfigError (every error, with field paths)."""
    path = Path(path)
    data = read_yaml_file(path, "site file")
    return parse_site(data, str(path), path, port_offset)


_PLACEHOLDER_SCHEMA = {"type": "string", "pattern": r"\{[^{}]+\}",
                       "description": "a template placeholder such as '{i+100}', rendered before validation"}


def _accept_templates(node: Any) -> Any:
    """Make a pydantic schema accept what the file may hold before templates are expanded: any list
    item may be a template, and a number or an id may be a placeholder string ("{i}", "m{i}-r{j:02d}").
    Without this an editor flagged every templated example site as invalid."""
    if isinstance(node, list):
        return [_accept_templates(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _accept_templates(v) for k, v in node.items()}
    if node.get("type") == "array" and "items" in node:
        node["items"] = {"anyOf": [node["items"], {"$ref": "#/$defs/Template"}]}
    if node.get("type") in ("integer", "number") or (node.get("type") == "string" and "pattern" in node):
        keep = {k: node.pop(k) for k in ("title", "description", "default") if k in node}
        node = {**keep, "anyOf": [node, _PLACEHOLDER_SCHEMA]}
    return node


def site_json_schema() -> dict:
    """JSON Schema of the site file (templates are expanded before validation, so any list item may
    also be `{template: <item>, range: [first, last]}`)."""
    schema = _accept_templates(SiteSpec.model_json_schema())
    schema.setdefault("$defs", {})["Template"] = {
        "type": "object", "required": ["template"], "additionalProperties": False,
        "description": "A list item repeated per loop value: {template: <item>, range: [first, last]} (variable i) "
                       "or {template: <item>, for: {name: [first, last], ...}}",
        "properties": {
            "template": {},
            "range": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            "for": {"type": "object", "minProperties": 1,
                    "additionalProperties": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
        },
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "podwatch site"
    schema["description"] = ("One site: power path, modules, CDUs, racks and devices. Any list item may be a template "
                             "{template: <item>, range: [first, last]} rendered with variable i, e.g. id: 'm1-r{i:02d}', "
                             "unit_id: '{i+100}'.")
    return schema
