"""Device profiles: data, not code. One YAML file per device model in this folder (or a site's
own `profiles_dir`) describes a Modbus register map or an MQTT payload map, mapping each
register/point onto a canonical metric name (`podwatch.metrics`).

The same `ModbusProfile` is the single source of truth for the simulator's encoder
(`encode_point`) and the collectors' decoder (`decode_point`); an independent client (mbpoll)
reading the documented addresses must get the same values.

Word orders for 32/64-bit values (register = 16-bit word, A = most significant byte):
    ABCD  big-endian words, big-endian bytes (SunSpec, Raritan, Schneider, APC)
    CDAB  little-endian words (word swap), big-endian bytes ("float inverse")
    BADC  big-endian words, bytes swapped in each word
    DCBA  fully little-endian
For 64-bit values the same rule extends over four words (ABCDEFGH / GHEFCDAB / BADCFEHG / HGFEDCBA).
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from podwatch.errors import ConfigError
from podwatch.metrics import CATALOG

PROFILES_DIR = Path(__file__).parent

DataType = Literal["int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64", "bool"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
DeviceKind = Literal["pdu", "meter", "cdu", "rack"]

REGISTER_COUNT: dict[str, int] = {
    "bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4,
}
_STRUCT = {"int16": ">h", "uint16": ">H", "bool": ">H", "int32": ">i", "uint32": ">I", "float32": ">f",
           "int64": ">q", "uint64": ">Q", "float64": ">d"}
# Raw values that mean "not implemented / not available" (SunSpec convention); decoded as None.
UNAVAILABLE_RAW = {"int16": -32768, "uint16": 0xFFFF, "int32": -(2**31), "uint32": 0xFFFFFFFF}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RegisterPoint(_Strict):
    """One value in a Modbus register map."""

    metric: str = Field(description="Canonical metric name from podwatch.metrics")
    address: int = Field(ge=0, le=65535, description="Register address as the manual numbers it (see address_base)")
    register_type: Literal["holding", "input"] = Field(
        "holding", alias="register", description="holding = FC3, input = FC4 (YAML key: register)")
    data_type: DataType = "float32"
    word_order: WordOrder | None = Field(None, description="Overrides the profile's default word order")
    scale: float = Field(1.0, description="value = raw * scale + offset")
    offset: float = 0.0
    unit: str | None = Field(None, description="Unit of the decoded value (must match the metric's unit)")
    count: int | None = Field(None, description="Register count; derived from data_type when omitted")

    @model_validator(mode="after")
    def _check(self) -> "RegisterPoint":
        if self.metric not in CATALOG:
            raise ValueError(f"unknown metric '{self.metric}' (see podwatch.metrics)")
        expected = REGISTER_COUNT[self.data_type]
        if self.count is not None and self.count != expected:
            raise ValueError(f"data_type {self.data_type} needs {expected} register(s), count says {self.count}")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self

    @property
    def register_count(self) -> int:
        return REGISTER_COUNT[self.data_type]


class StaticRegisters(_Strict):
    """Constant registers a device serves (e.g. SunSpec's 'SunS' marker and model header)."""

    address: int = Field(ge=0, le=65535)
    register_type: Literal["holding", "input"] = Field("holding", alias="register")
    values: list[int] = Field(description="Raw 16-bit register values")


class ModbusProfile(_Strict):
    id: str
    kind: DeviceKind
    vendor: str
    model: str
    description: str = ""
    protocol: Literal["modbus"] = "modbus"
    address_base: Literal[0, 1] = Field(0, description="1 when the manual numbers registers from 1 (wire address = number - 1)")
    word_order: WordOrder = "ABCD"
    max_registers_per_read: int = Field(125, ge=1, le=125)
    max_gap: int = Field(8, ge=0, description="Unused registers a merged read may span")
    static: list[StaticRegisters] = Field(default_factory=list)
    points: list[RegisterPoint]

    @model_validator(mode="after")
    def _unique(self) -> "ModbusProfile":
        seen: dict[str, int] = {}
        for i, p in enumerate(self.points):
            if p.metric in seen:
                raise ValueError(f"points[{i}]: metric '{p.metric}' already mapped by points[{seen[p.metric]}]")
            seen[p.metric] = i
        return self

    def wire_address(self, point: RegisterPoint) -> int:
        return point.address - self.address_base

    def order_of(self, point: RegisterPoint) -> WordOrder:
        return point.word_order or self.word_order


class MqttPoint(_Strict):
    """One point published over MQTT."""

    metric: str
    point: str = Field(description="Point name in the topic (BMS pointType, e.g. RackLiquidFlow) or JSON key (generic)")
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "MqttPoint":
        if self.metric not in CATALOG:
            raise ValueError(f"unknown metric '{self.metric}' (see podwatch.metrics)")
        return self


class MqttProfile(_Strict):
    id: str
    kind: DeviceKind
    vendor: str
    model: str
    description: str = ""
    protocol: Literal["mqtt"] = "mqtt"
    format: Literal["bms-json", "generic-json"] = Field(
        description="bms-json: NVIDIA BMS event bus, one point per message, payload {value, timestamp(ms), quality}; "
        "generic-json: one message per device with {key: value} (optional 'ts' ms)")
    topic: str = Field(description="Topic template; {point} and {tag_path} (bms-json) or {device} (generic-json)")
    points: list[MqttPoint]


Profile = Annotated[ModbusProfile | MqttProfile, Field(discriminator="protocol")]


class _ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: Profile


def _raw_words(value_bytes: bytes) -> list[int]:
    return [int.from_bytes(value_bytes[i:i + 2], "big") for i in range(0, len(value_bytes), 2)]


def _reorder(data: bytes, order: WordOrder) -> bytes:
    """Map big-endian (ABCD) bytes to the wire order, or back (each order is its own inverse)."""
    words = [data[i:i + 2] for i in range(0, len(data), 2)]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    return b"".join(words)


def encode_value(value: float, data_type: str, order: WordOrder = "ABCD", scale: float = 1.0, offset: float = 0.0) -> list[int]:
    """Engineering value -> 16-bit registers as they travel on the wire."""
    raw = (value - offset) / scale
    fmt = _STRUCT[data_type]
    if data_type.startswith("float"):
        packed = struct.pack(fmt, raw)
    else:
        if math.isnan(raw):
            raw_int = UNAVAILABLE_RAW.get(data_type, 0)
        else:
            raw_int = int(round(raw))
            lo, hi = _int_range(data_type)
            raw_int = min(max(raw_int, lo), hi)  # saturate like a real device's register
        packed = struct.pack(fmt, raw_int)
    return _raw_words(_reorder(packed, order))


def decode_value(registers: list[int] | tuple[int, ...], data_type: str, order: WordOrder = "ABCD",
                 scale: float = 1.0, offset: float = 0.0) -> float | None:
    """16-bit registers from the wire -> engineering value; None for 'not available' markers and NaN."""
    n = REGISTER_COUNT[data_type]
    if len(registers) != n:
        raise ValueError(f"{data_type} needs {n} registers, got {len(registers)}")
    data = _reorder(b"".join(int(r & 0xFFFF).to_bytes(2, "big") for r in registers), order)
    raw = struct.unpack(_STRUCT[data_type], data)[0]
    if data_type.startswith("float"):
        if not math.isfinite(raw):
            return None
    elif UNAVAILABLE_RAW.get(data_type) == raw:
        return None
    return raw * scale + offset


def _int_range(data_type: str) -> tuple[int, int]:
    bits = {"int16": 16, "uint16": 16, "bool": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}[data_type]
    if data_type.startswith("u") or data_type == "bool":
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def encode_point(profile: ModbusProfile, point: RegisterPoint, value: float) -> list[int]:
    return encode_value(value, point.data_type, profile.order_of(point), point.scale, point.offset)


def decode_point(profile: ModbusProfile, point: RegisterPoint, registers: list[int]) -> float | None:
    return decode_value(registers, point.data_type, profile.order_of(point), point.scale, point.offset)


def parse_profile_file(path: Path) -> ModbusProfile | MqttProfile:
    """Load one profile YAML; raises ConfigError listing every problem with its field path."""
    from podwatch.site import model_field_names, pydantic_error_lines, read_yaml_file

    data = read_yaml_file(path, "profile")  # one-line errors with line/column, duplicate keys, UTF-8
    if isinstance(data, dict):
        data.setdefault("protocol", "modbus")  # Modbus is the default profile protocol
    try:
        return _ProfileFile.model_validate({"profile": data}).profile
    except ValidationError as exc:
        raise ConfigError(str(path), pydantic_error_lines(exc, skip=("profile", "modbus", "mqtt"),
                                                          fields_hint="docs/devices.md shows the profile fields",
                                                          known_fields=model_field_names(ModbusProfile, MqttProfile))) from None


@lru_cache(maxsize=None)
def _load_dir(directory: str) -> tuple[dict[str, ModbusProfile | MqttProfile], tuple[str, ...]]:
    """(profiles by id, one error line per problem, prefixed with the file name). A broken file does
    not hide the good ones."""
    found: dict[str, ModbusProfile | MqttProfile] = {}
    errors: list[str] = []
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            profile = parse_profile_file(path)
        except ConfigError as exc:
            errors.extend(f"{path.name}: {e}" for e in exc.errors)
            continue
        found[profile.id] = profile
    return found, tuple(errors)


def profiles_with_errors(extra_dir: Path | None = None) -> tuple[dict[str, ModbusProfile | MqttProfile], list[str]]:
    """Built-in profiles, overridden/extended by the loadable files of a site's profiles directory,
    and the errors of the files that could not be loaded."""
    profiles, errors = dict(_load_dir(str(PROFILES_DIR))[0]), list(_load_dir(str(PROFILES_DIR))[1])
    if extra_dir is not None:
        extra, extra_errors = _load_dir(str(Path(extra_dir).resolve()))
        profiles.update(extra)
        errors.extend(extra_errors)
    return profiles, errors


def available_profiles(extra_dir: Path | None = None) -> dict[str, ModbusProfile | MqttProfile]:
    """Built-in profiles, overridden/extended by a site's own profiles directory (ConfigError if a
    file there is broken)."""
    profiles, errors = profiles_with_errors(extra_dir)
    if errors:
        raise ConfigError(str(extra_dir or PROFILES_DIR), errors)
    return profiles


def load_profile(profile_id: str, extra_dir: Path | None = None) -> ModbusProfile | MqttProfile:
    profiles = available_profiles(extra_dir)
    if profile_id not in profiles:
        raise ConfigError("profiles", [f"unknown profile '{profile_id}'; known: {', '.join(sorted(profiles))}"])
    return profiles[profile_id]
