"""The commented default configuration (`print-default-config`), rendered from the
settings models themselves: every key with its default and its `Field` description, so
the file cannot fall behind the code.

Keys without a default value (an optional path, a user name) are shown commented out
with an example; so are the variants not chosen (the stream and simulated sources, the
alarm kinds the example does not enable). The examples below are the only hand-written
part: what a first plant configuration looks like.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from monitor.config.alarms import AlarmsConfig
from monitor.config.durations import parse_duration
from monitor.config.settings import ProbeConfig, Settings
from monitor.config.shadow import ShadowConfig

HEADER = """\
# crystal-monitor configuration, every key with its default and meaning.
# Durations: "250ms", "30s", "5m", "2h", "30d". Sizes: "100MB", "2GB".
# Any key can be overridden from the environment: CRYSTAL_MONITOR__SECTION__KEY,
# e.g. CRYSTAL_MONITOR__DAEMON__LOG_LEVEL=debug.
# A `# key = value` line is an optional key or an alternative: drop the `# ` to use it.
"""

# What a first configuration sets beyond the defaults: one folder probe and the alarms.
EXAMPLE_PROBE: dict[str, Any] = {
    "id": "R1",
    "sampling": "particles",
    "source": {"type": "folder", "path": "/srv/probe/R1"},
}
OTHER_SOURCES: tuple[dict[str, Any], ...] = (
    {"type": "stream", "url": "rtsp://192.0.2.10/probe"},
    {"type": "simulated"},
)
EXAMPLE_ALARMS: tuple[dict[str, Any], ...] = (
    {
        "id": "pg_high",
        "kind": "fraction_high",
        "priority": "high",
        "message": "PG share {value:.1%} above {limit:.0%} (5-min window)",
        "class_name": "PG",
        "window": "5m",
        "limit": 0.15,
        "deadband": 0.02,
        "on_delay": "30s",
        "off_delay": "30s",
        "min_count": 100,
    },
    {
        "id": "pg_rising",
        "kind": "rate_of_change",
        "priority": "medium",
        "message": "PG share rising {value:.2%}/min",
        "class_name": "PG",
        "limit_per_min": 0.01,
        "deadband": 0.002,
        "min_count": 100,
        "min_span": "2m",
    },
    {
        "id": "pg_shift",
        "kind": "shift",
        "priority": "medium",
        "message": "PG onset detected (CUSUM)",
        "class_name": "PG",
        "baseline": 0.02,
        "shifted": 0.08,
        "threshold": 8.0,
    },
    {
        "id": "probe_stale",
        "kind": "probe_stale",
        "priority": "high",
        "message": "no frame from the probe for {value:.0f} s",
        "max_age": "30s",
    },
    {
        "id": "image_quality",
        "kind": "image_quality",
        "priority": "medium",
        "message": "{value:.0%} of frames rejected (focus, empty, saturated)",
        "window": "5m",
        "limit": 0.5,
        "min_frames": 20,
    },
    {
        "id": "uncertain_high",
        "kind": "uncertain_high",
        "priority": "low",
        "message": "{value:.0%} of particles uncertain",
        "window": "5m",
        "limit": 0.3,
        "min_count": 50,
    },
    {
        "id": "not_crystals",
        "kind": "out_of_distribution",
        "priority": "medium",
        "message": "{value:.0%} of particles are not crystals the model knows",
        "window": "5m",
        "limit": 0.2,
        "min_count": 50,
    },
    {
        "id": "mqtt_overflow",
        "kind": "publish_overflow",
        "priority": "high",
        "message": "{value:.0f} MQTT messages dropped by the bounded outbox",
        "publisher": "mqtt",
        "hold": "10m",
    },
)
OTHER_ALARMS: tuple[dict[str, Any], ...] = (
    {
        "id": "cex_low",
        "kind": "fraction_low",
        "priority": "medium",
        "message": "CEX share {value:.1%} below {limit:.0%} (15-min window)",
        "class_name": "CEX",
        "window": "15m",
        "limit": 0.7,
        "deadband": 0.02,
        "min_count": 200,
    },
)
EXAMPLE_SETTINGS: dict[str, Any] = {
    "daemon": {"state_dir": "/var/lib/crystal-monitor"},
    "probes": [EXAMPLE_PROBE],
    "alarms": {"definitions": list(EXAMPLE_ALARMS)},
}
# Shown commented out where the default is None (or computed on the host).
EXAMPLE_VALUES: dict[str, Any] = {
    "model.path": "/opt/crystal-monitor/models/site-2026",
    "alarms.definitions.window": "5m",
    "alarms.definitions.max_sum": 16.0,
    "backend.tensorrt.calibration_dir": "/etc/crystal-monitor/calibration-crops",
    "backend.tensorrt.engine_cache_dir": "/var/lib/crystal-monitor/engines",
    "probes.max_decoded_bytes": "100MB",
    "probes.pixel_size_um": 1.4,
    "probes.particles.detector": "/opt/crystal-monitor/models/particle-detector-site",
    "probes.source.done_dir": "/srv/probe/R1-done",
    "mqtt.client_id": "crystal-monitor-HOSTNAME",
    "mqtt.username": "crystal-monitor",
    "mqtt.password_env": "CRYSTAL_MONITOR_MQTT_PASSWORD",
    "mqtt.password_credential": "mqtt-password",
    "mqtt.tls.ca_file": "/etc/crystal-monitor/mqtt-ca.pem",
    "mqtt.tls.cert_file": "/etc/crystal-monitor/mqtt-client.pem",
    "mqtt.tls.key_file": "/etc/crystal-monitor/mqtt-client.key",
    "opcua.users_file": "/etc/crystal-monitor/credentials/opcua-users",
    "opcua.users_credential": "opcua-users",
    "opcua.certificate": "/etc/crystal-monitor/opcua-server.der",
    "opcua.private_key": "/etc/crystal-monitor/opcua-server.pem",
    "opcua.trust_dir": "/etc/crystal-monitor/opcua-trusted",
    "http.token_env": "CRYSTAL_MONITOR_HTTP_TOKEN",
    "http.token_credential": "http-token",
}
# Optional sub-sections (None by default): shown commented out, filled from an example.
OPTIONAL_SECTIONS: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "model.shadow": (ShadowConfig, {"path": "/opt/crystal-monitor/models/site-2026-candidate"}),
}
ALWAYS_COMMENTED = frozenset({"mqtt.client_id"})  # its default depends on the host
WIDTH = 88
COMMENT_COLUMN = 41  # where a short description starts, on its key's line


class _Lines:
    """The lines of the file; each description is written once, where its key first
    appears (the alarm definitions share most of their keys)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._explained: set[tuple[str, str]] = set()

    def blank(self) -> None:
        self.lines.append("")

    def comment(self, text: str) -> None:
        """`text` as `#` lines above what it explains, wrapped to the page width."""
        self.lines += ["# " + line for line in textwrap.wrap(text, WIDTH - 2)]

    def key(self, key_path: str, assignment: str, description: str | None) -> None:
        """`key = value`, its description on the same line when it fits, else above."""
        text = description or ""
        if (key_path, text) in self._explained:
            text = ""
        self._explained.add((key_path, text))
        inline = f"{assignment:<{COMMENT_COLUMN}}# {text}"
        if not text:
            self.lines.append(assignment)
        elif len(assignment) <= COMMENT_COLUMN - 2 and len(inline) <= WIDTH:
            self.lines.append(inline)
        else:
            self.comment(text)
            self.lines.append(assignment)


class _ExampleSettings(Settings):
    """Settings from the example values alone, never the environment: the printed file is
    the same on every host, and a misspelled CRYSTAL_MONITOR__ variable cannot stop the
    command line from loading (`load_settings` reports it, exit 78)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def render_default_config() -> str:
    """The default configuration file: validates as it is, every key documented."""
    settings = _ExampleSettings.model_validate(EXAMPLE_SETTINGS)
    out = _Lines()
    out.lines.append(HEADER.rstrip("\n"))
    for name in _section_order():
        info = Settings.model_fields[name]
        value = getattr(settings, name)
        out.blank()
        if name == "probes":
            for probe in value:
                _render_entry(out, "probes", probe, info)
        elif name == "alarms":
            _render_alarms(out, value, info)
        else:
            _render_section(out, name, value, commented=False, info=info)
    return "\n".join(out.lines) + "\n"


def _section_order() -> list[str]:
    """The model's order, but the probes before the alarms that watch them."""
    names = [name for name in Settings.model_fields if name != "probes"]
    names.insert(names.index("alarms"), "probes")
    return names


def _render_entry(out: _Lines, path: str, model: BaseModel, info: FieldInfo) -> None:
    """One `[[path]]` entry; the list's description above the first."""
    if not any(line == f"[[{path}]]" for line in out.lines) and info.description:
        out.comment(info.description)
    out.lines.append(f"[[{path}]]")
    _render_fields(out, path, model, commented=False)


def _render_alarms(out: _Lines, alarms: AlarmsConfig, info: FieldInfo) -> None:
    definitions = AlarmsConfig.model_fields["definitions"]
    _render_section(out, "alarms", alarms, commented=False, info=info, skip={"definitions"})
    for definition in alarms.definitions:
        out.blank()
        _render_entry(out, "alarms.definitions", definition, definitions)
    for example in OTHER_ALARMS:
        variant = AlarmsConfig.model_validate({"definitions": [example]}).definitions[0]
        out.blank()
        out.lines += [f"# A {example['kind']} alarm, not enabled here:", "# [[alarms.definitions]]"]
        _render_fields(out, "alarms.definitions", variant, commented=True)


def _render_other_sources(out: _Lines) -> None:
    """The source types not chosen, commented out, right after the chosen one."""
    for source in OTHER_SOURCES:
        variant = ProbeConfig.model_validate({**EXAMPLE_PROBE, "source": source}).source
        out.blank()
        out.lines.append(f"# Or a {source['type']} source instead of the folder:")
        _render_section(out, "probes.source", variant, commented=True)


def _render_section(
    out: _Lines,
    path: str,
    model: BaseModel,
    *,
    commented: bool,
    info: FieldInfo | None = None,
    skip: frozenset[str] | set[str] = frozenset(),
) -> None:
    if info is not None and info.description and not commented:
        out.comment(info.description)
    out.lines.append(("# " if commented else "") + f"[{path}]")
    _render_fields(out, path, model, commented=commented, skip=skip)


def _render_fields(
    out: _Lines,
    path: str,
    model: BaseModel,
    *,
    commented: bool,
    skip: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Scalar keys first (TOML needs them before any sub-table), then sub-sections."""
    nested: list[tuple[str, BaseModel, FieldInfo]] = []
    optional: list[tuple[str, BaseModel, FieldInfo]] = []
    fields = type(model).model_fields
    # The id, then what kind of thing it is, then the rest in the model's order.
    order = sorted(fields, key=lambda name: {"id": 0, "kind": 1, "type": 1}.get(name, 2))
    for name in order:
        info = fields[name]
        value = getattr(model, name)
        key_path = f"{path}.{name}"
        if name in skip:
            continue
        if isinstance(value, BaseModel):
            nested.append((name, value, info))
            continue
        if value is None and key_path in OPTIONAL_SECTIONS:
            section, example = OPTIONAL_SECTIONS[key_path]
            optional.append((name, section.model_validate(example), info))
            continue
        if value is None or key_path in ALWAYS_COMMENTED:
            if key_path not in EXAMPLE_VALUES:
                raise ValueError(f"{key_path} has no default: give EXAMPLE_VALUES an example")
            assignment = f"# {name} = {_toml(EXAMPLE_VALUES[key_path], info)}"
        else:
            assignment = ("# " if commented else "") + f"{name} = {_toml(value, info)}"
        out.key(key_path, assignment, info.description)
    for name, value, info in nested:
        out.blank()
        _render_section(out, f"{path}.{name}", value, commented=commented, info=info)
        if f"{path}.{name}" == "probes.source" and not commented:
            _render_other_sources(out)
    for name, value, info in optional:
        out.blank()
        if info.description:
            out.comment(info.description)
        _render_section(out, f"{path}.{name}", value, commented=True)


def _toml(value: Any, info: FieldInfo) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item, info) for item in value) + "]"
    if isinstance(value, float) and _is_duration(info):
        return json.dumps(format_duration(value))
    if isinstance(value, int | float):
        return repr(value)
    raise TypeError(f"no TOML form for {value!r}")


def _is_duration(info: FieldInfo) -> bool:
    """A `Duration` field, optional or in a tuple (`aggregation.windows`) included."""
    return any(_parses_durations(item) for item in info.metadata) or _parses_durations(
        info.annotation
    )


def _parses_durations(annotation: Any) -> bool:
    if getattr(annotation, "func", None) is parse_duration:  # the BeforeValidator itself
        return True
    if get_origin(annotation) is Annotated:
        return any(_parses_durations(item) for item in annotation.__metadata__)
    return any(_parses_durations(argument) for argument in get_args(annotation))


def format_duration(seconds: float) -> str:
    """Seconds in the largest unit that writes them whole: 5400 -> '90m', 0.02 -> '20ms'."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        count = seconds / size
        if seconds >= size and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    milliseconds = seconds * 1000.0
    if abs(milliseconds - round(milliseconds)) < 1e-6:
        return f"{round(milliseconds)}ms"
    return f"{seconds:g}s"
