"""Alert rules: the YAML format, its validation, the shipped defaults and per-site overrides.

A rules file is `{labels: {...}, rules: [ {id, source, ...}, ... ]}`:

- `source: metric` — a threshold the engine evaluates itself on every batch of new sample rows
  (`metric`, `op`, `threshold`, optional `clear_threshold` for hysteresis, optional
  `stale_after`: the rule is also active for a device whose newest good sample of the metric is
  older than that).
- `source: check:<name>` — driven by `Observation`s of the analytics check `<name>`.
- `source: risk` — driven by the thermal risk model's observations (`rule="thermal_risk"`).
  Check and risk rules may set `threshold` too: `value` is then compared (with hysteresis)
  instead of trusting `active`.

`for` is the hold time (pending -> firing), `clear_for` the clear hold (firing -> resolved),
`flap` the flap damping, `cascade` (cause | symptom) the rule's part in cause attribution: a
`cause` alert on a CDU explains the `symptom` alerts of the racks it cools (engine.py).
Durations are `500ms`, `30s`, `2m`, `1h` or a number of seconds. Annotations are templates
with `{target}`, `{value}` (a float; `{value:.1f}` works; "n/a" when absent), `{reasons}`,
`{threshold}`, `{rule}`, `{severity}` and `{labels[rack]}`.

`load_rules(path)` reads the shipped `default_rules.yaml` and then the site file: an entry with
an existing id is merged onto the default field by field (labels/annotations key by key, so a
site may change only `threshold`); a new id adds a rule; `enabled: false` switches one off.
Every error in both files is reported at once with its field path (ConfigError).
"""

from __future__ import annotations

import logging
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from podwatch.errors import ConfigError

log = logging.getLogger(__name__)

Severity = Literal["info", "warning", "critical"]
Op = Literal[">", ">=", "<", "<=", "==", "!="]
RISK_CHECK_NAME = "thermal_risk"
# Labels the engine sets from cause attribution; rules may not set them.
CASCADE_LABEL = "cascade"
CAUSE_LABEL = "probable_cause"
ENGINE_LABELS = frozenset({CASCADE_LABEL, CAUSE_LABEL})

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration_s(value: Any) -> float:
    """'2m' -> 120.0; numbers are seconds. Raises ValueError naming the bad text."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must be >= 0, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNIT_S[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 30s, 2m, 1h or seconds)")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FlapDamping(_Model):
    """A target whose condition changes state `max_transitions` times within `window` is
    flapping: its alert then stays firing until the condition has been clear for `stable_clear`."""

    window_s: float = Field(600.0, alias="window", description="Window in which transitions are counted")
    max_transitions: int = Field(4, ge=2, description="Transitions (active<->clear) within the window that mean flapping")
    stable_clear_s: float = Field(300.0, alias="stable_clear", description="Clear hold of a flapping alert")

    @field_validator("window_s", "stable_clear_s", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration_s(v)


class Annotations(_Model):
    summary: str = Field(description="One line: what is wrong where")
    description: str = Field("", description="What it means, with the value and reasons")
    runbook: str = Field("", description="What to do (text, or a URL)")


_TEMPLATE_FIELDS = {"target", "value", "reasons", "threshold", "rule", "severity", "labels"}


class _SafeFormatter(string.Formatter):
    """`{value:.1f}` with value None renders 'n/a' instead of raising."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is None:
            return "n/a"
        return super().format_field(value, format_spec)

    def get_value(self, key, args, kwargs):
        if isinstance(key, str) and key not in kwargs:
            raise KeyError(key)
        return super().get_value(key, args, kwargs)


_FORMATTER = _SafeFormatter()


class _Labels(dict):
    def __missing__(self, key: str) -> str:
        return ""


def render_template(template: str, *, target: str, value: float | None, reasons: list[str],
                    threshold: float | None, rule: str, severity: str, labels: dict[str, str]) -> str:
    return _FORMATTER.format(template, target=target, value=value, reasons="; ".join(reasons) or "none given",
                             threshold=threshold, rule=rule, severity=severity, labels=_Labels(labels))


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _bad_label_names(labels: dict) -> list[str]:
    """Label names Alertmanager rejects (400 "invalid label set"): not [a-zA-Z_][a-zA-Z0-9_]*."""
    return [f"{k!r} is not a valid label name (letters, digits and _, not starting with a digit)"
            for k in labels if not _LABEL_NAME.fullmatch(str(k))]


class Rule(_Model):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Rule id; the alert's `alertname`")
    enabled: bool = True
    source: str = Field(description="`metric`, `check:<name>` or `risk`")
    severity: Severity = "warning"
    metric: list[str] | None = Field(None, description="metric rules: canonical metric name(s), e.g. cdu.supply_temp_c")
    op: Op | None = Field(None, description="Comparison that makes the condition active: value <op> threshold")
    threshold: float | None = None
    clear_threshold: float | None = Field(None, description="Hysteresis: clear only once value is past this (default: threshold)")
    hold_s: float = Field(0.0, alias="for", description="Hold time: condition active this long before firing")
    clear_for_s: float = Field(0.0, alias="clear_for", description="Clear hold: clear this long before resolving")
    stale_after_s: float | None = Field(None, alias="stale_after", description="metric rules: also active when no good sample for this long")
    target: Literal["device", "entity"] = Field(
        "device", description="metric rules: the alert's target is the sample's device, or the rack/CDU/power node it "
                              "measures (site model; use `entity` only where one device per entity reports the metric)")
    threshold_from: Literal["rack_return_limit"] | None = Field(
        None, description="metric rules: per target rack, `threshold` is that rack's coolant return limit from the site "
                          "model (rack return_limit_c, default thermal.rack_return_limit_c) and `clear_threshold` keeps "
                          "its distance from it; `threshold` stays the fallback (no site, unknown target)")
    flap: FlapDamping = Field(default_factory=FlapDamping)
    cascade: Literal["cause", "symptom"] | None = Field(
        None, description="Cause attribution (docs/alerts.md, One CDU fault, one page): `cause` — an alert of this "
                          "rule on a CDU explains the `symptom` alerts of the racks that CDU cools; `symptom` — an "
                          "alert of this rule on a rack may be explained by a `cause` alert on its CDU. Alerts get "
                          "the label cascade=cause|symptom, which Alertmanager inhibit rules match")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels (team, ...)")
    annotations: Annotations

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("metric")
    @classmethod
    def _known_metrics(cls, v: list[str] | None) -> list[str] | None:
        from podwatch.metrics import CATALOG  # a name outside the catalog never matches a sample

        unknown = [m for m in v or () if m not in CATALOG]
        if unknown:
            raise ValueError(f"unknown metric {', '.join(map(repr, unknown))} (canonical names: docs/metrics.md, "
                             "`podwatch config metrics`)")
        return v

    @field_validator("labels")
    @classmethod
    def _label_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = _bad_label_names(v)
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @field_validator("hold_s", "clear_for_s", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration_s(v)

    @field_validator("stale_after_s", mode="before")
    @classmethod
    def _opt_duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration_s(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v in ("metric", "risk") or (v.startswith("check:") and re.fullmatch(r"check:[a-z][a-z0-9_]*", v)):
            return v
        raise ValueError(f"source must be `metric`, `check:<name>` or `risk`, got {v!r}")

    @model_validator(mode="after")
    def _consistent(self) -> "Rule":
        problems = []
        if self.source == "metric":
            if not self.metric:
                problems.append("a metric rule needs `metric`")
            if self.threshold is None and self.stale_after_s is None:
                problems.append("a metric rule needs `op` and `threshold`, or `stale_after`")
        elif self.metric or self.stale_after_s is not None or self.target != "device":
            problems.append("`metric`, `stale_after` and `target` apply only to `source: metric`")
        if self.threshold_from is not None and (self.source != "metric" or self.threshold is None):
            problems.append("`threshold_from` needs a metric rule with `op` and `threshold` (the fallback)")
        if (self.threshold is None) != (self.op is None):
            problems.append("`op` and `threshold` go together")
        if self.clear_threshold is not None:
            if self.threshold is None:
                problems.append("`clear_threshold` needs `threshold`")
            elif self.op in (">", ">=") and self.clear_threshold > self.threshold:
                problems.append(f"clear_threshold {self.clear_threshold} must be <= threshold {self.threshold} for op {self.op!r}")
            elif self.op in ("<", "<=") and self.clear_threshold < self.threshold:
                problems.append(f"clear_threshold {self.clear_threshold} must be >= threshold {self.threshold} for op {self.op!r}")
            elif self.op in ("==", "!="):
                problems.append(f"clear_threshold makes no sense with op {self.op!r}")
        engine_owned = sorted(set(self.labels) & ENGINE_LABELS)
        if engine_owned:
            problems.append(f"labels: {', '.join(engine_owned)} set by the engine (cause attribution); use `cascade`")
        for name in ("summary", "description", "runbook"):
            template = getattr(self.annotations, name)
            try:
                render_template(template, target="t", value=1.0, reasons=["r"], threshold=1.0, rule=self.id,
                                severity=self.severity, labels={})
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                problems.append(f"annotations.{name}: bad template ({exc!r}); fields are {sorted(_TEMPLATE_FIELDS)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def check_name(self) -> str | None:
        """The observation name this rule consumes (None for metric rules)."""
        if self.source == "risk":
            return RISK_CHECK_NAME
        if self.source.startswith("check:"):
            return self.source.removeprefix("check:")
        return None

    @property
    def effective_clear_threshold(self) -> float | None:
        return self.threshold if self.clear_threshold is None else self.clear_threshold


class RuleSet(_Model):
    labels: dict[str, str] = Field(default_factory=dict, description="Labels added to every rule's alerts (site, team, ...)")
    rules: list[Rule] = Field(default_factory=list)

    def enabled_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.enabled]

    def by_id(self) -> dict[str, Rule]:
        return {r.id: r for r in self.rules}


DEFAULT_RULES_FILE = "default_rules.yaml"


def _read_yaml(path: Path | None, text: str | None, source: str) -> dict:
    try:
        data = yaml.safe_load(text if text is not None else Path(path).read_text())
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["<root>: expected a mapping with `rules:` (and optional `labels:`)"])
    return data


def _pydantic_errors(exc: ValidationError, prefix: str) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            elif not str(part).startswith("function-"):
                loc += f".{part}" if loc else str(part)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; docs/alerts.md lists the fields)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
        out.append(f"{where}: {msg}")
    return out


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    if "threshold" in override and "threshold_from" not in override:
        merged.pop("threshold_from", None)  # an explicit threshold wins over the site's per-rack limit
    for key, value in override.items():
        if key in ("labels", "annotations", "flap") and isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


def _raw_rules(data: dict, source: str, errors: list[str]) -> list[tuple[str, dict]]:
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        errors.append(f"{source}: rules: expected a list of rules")
        return []
    out = []
    for i, raw in enumerate(rules):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            errors.append(f"{source}: rules[{i}]: expected a mapping with a string `id`")
            continue
        out.append((f"{source}: rules[{i}] ({raw['id']})", raw))
    extra = set(data) - {"rules", "labels"}
    if extra:
        errors.append(f"{source}: {', '.join(sorted(extra))}: unknown top-level field (expected rules, labels)")
    return out


def default_rules_text() -> str:
    return resources.files(__package__).joinpath(DEFAULT_RULES_FILE).read_text()


def load_rules(path: str | Path | None = None, *, text: str | None = None, include_defaults: bool = True) -> RuleSet:
    """The shipped defaults, with the site file at `path` (or YAML `text`) merged over them by id."""
    errors: list[str] = []
    merged: dict[str, tuple[str, dict]] = {}
    labels: dict[str, str] = {}
    layers: list[tuple[str, dict]] = []
    if include_defaults:
        layers.append((DEFAULT_RULES_FILE, _read_yaml(None, default_rules_text(), DEFAULT_RULES_FILE)))
    if path is not None or text is not None:
        source = str(path) if path is not None else "<rules>"
        layers.append((source, _read_yaml(Path(path) if path is not None else None, text, source)))
    for source, data in layers:
        if isinstance(data.get("labels"), dict):
            errors.extend(f"{source}: labels: {p}" for p in _bad_label_names(data["labels"]))
            labels.update({str(k): str(v) for k, v in data["labels"].items()})
        elif "labels" in data:
            errors.append(f"{source}: labels: expected a mapping of label name to value")
        for where, raw in _raw_rules(data, source, errors):
            if raw["id"] in merged:
                merged[raw["id"]] = (where, _merge(merged[raw["id"]][1], raw))
            else:
                merged[raw["id"]] = (where, raw)
    rules = []
    for where, raw in merged.values():
        try:
            rules.append(Rule.model_validate(raw))
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, where))
    if errors:
        raise ConfigError(str(path) if path is not None else "alert rules", errors)
    rule_set = RuleSet(labels=labels, rules=rules)
    for warning in unknown_check_warnings(rule_set):
        log.warning("%s", warning)
    return rule_set


def unknown_check_warnings(rule_set: RuleSet) -> list[str]:
    """A rule on `check:<name>` that names none of podwatch's checks fires only when some other
    component posts observations of that name (the observation API is open) - usually a typo
    that would leave the rule silent forever, so it is said out loud (not refused)."""
    import difflib

    from podwatch.analytics.checks import CHECK_NAMES

    out = []
    for rule in rule_set.enabled_rules():
        name = rule.source.removeprefix("check:") if rule.source.startswith("check:") else None
        if name is None or name in CHECK_NAMES:
            continue
        close = difflib.get_close_matches(name, CHECK_NAMES, n=1)
        hint = f"did you mean check:{close[0]}? " if close else ""
        out.append(f"alert rule {rule.id!r}: source check:{name} is none of podwatch's checks; {hint}it fires only "
                   f"on observations another component posts under that name (`podwatch alerts rules` lists the "
                   f"shipped rules and their checks)")
    return out
