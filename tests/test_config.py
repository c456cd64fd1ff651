"""Configuration: every kind of mistake gives one clear message naming its key, exit code 78."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from monitor.cli.subcommands import DEFAULT_CONFIG
from monitor.config.durations import parse_duration
from monitor.config.overrides import override_keys
from monitor.config.settings import EX_CONFIG, ConfigError, Settings, load_settings
from monitor.config.template import EXAMPLE_ALARMS, EXAMPLE_PROBE, format_duration

GOOD_PROBE = """
[[probes]]
id = "R1"
[probes.source]
type = "folder"
path = "/tmp"
"""


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), (12, 12.0)],
)
def test_durations_are_written_with_units(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


BAD_CONFIGS = {
    "unknown key": (
        "[daemon]\nlog_levl = 'debug'\n" + GOOD_PROBE,
        "daemon.log_levl",
        "unknown key",
    ),
    "wrong type": ("[batcher]\nmax_batch = 'lots'\n" + GOOD_PROBE, "batcher.max_batch", "integer"),
    "negative duration": (
        "[daemon]\nshutdown_grace = '-5s'\n" + GOOD_PROBE,
        "daemon.shutdown_grace",
        "negative",
    ),
    "bad duration unit": (
        "[aggregation]\npublish_interval = '5 parsecs'\n" + GOOD_PROBE,
        "aggregation.publish_interval",
        "duration",
    ),
    "duplicate probe id": (GOOD_PROBE + GOOD_PROBE, "probes", "duplicate probe id 'R1'"),
    "no probes": ("[daemon]\nlog_level = 'info'\n", "probes", "Field required"),
    "unknown source type": (
        "[[probes]]\nid = 'R1'\n[probes.source]\ntype = 'ftp'\npath = '/x'\n",
        "probes[0].source",
        "tag 'ftp'",
    ),
    "bad backlog": (
        GOOD_PROBE + "backlog = 'newest:0'\n",
        "probes[0].source.backlog",
        "newest:N",
    ),
    "move without done_dir": (
        GOOD_PROBE + "after = 'move'\n",
        "probes[0].source",
        "done_dir",
    ),
    "bad probe id": (
        "[[probes]]\nid = 'reactor 1/a'\n[probes.source]\ntype = 'folder'\npath = '/tmp'\n",
        "probes[0].id",
        "pattern",
    ),
    "out of range": (
        GOOD_PROBE + "[probes.quality]\nmax_saturated_share = 1.5\n",
        "probes[0].quality.max_saturated_share",
        "less than or equal to 1",
    ),
    "bad sampling": (
        "[[probes]]\nid = 'R1'\nsampling = 'everything'\n[probes.source]\ntype = 'folder'\n"
        "path = '/tmp'\n",
        "probes[0].sampling",
        "'whole'",
    ),
    "not toml": ("[daemon\nstate_dir = 1\n", "not valid TOML", "not valid TOML"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_invalid_config_names_the_key(kind: str, tmp_path: Path) -> None:
    text, key, words = BAD_CONFIGS[kind]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    problems = caught.value.problems
    assert len(problems) == 1, problems
    assert key in problems[0] and words in problems[0], problems[0]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_validate_config_exits_78_and_prints_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nlog_levl = 'x'\nshutdown_grace = '-1s'\n" + GOOD_PROBE)
    result = _cli("validate-config", str(path))
    assert result.returncode == EX_CONFIG
    assert "daemon.log_levl: unknown key" in result.stderr
    assert "daemon.shutdown_grace: duration must not be negative" in result.stderr


def test_run_with_missing_model_exits_78_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    state = tmp_path / "state"
    path.write_text(
        f"[daemon]\nstate_dir = '{state}'\n[model]\npath = '{tmp_path / 'nope'}'\n" + GOOD_PROBE
    )
    result = _cli("run", "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert "model.path: model manifest not found" in result.stderr
    assert not state.exists()


def test_default_config_validates_and_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "default.toml"
    path.write_text(DEFAULT_CONFIG)
    monkeypatch.setenv("CRYSTAL_MONITOR__DAEMON__LOG_LEVEL", "debug")
    settings = load_settings(path)
    assert settings.daemon.log_level == "debug"
    assert settings.aggregation.windows == (60.0, 300.0, 900.0)
    assert settings.probes[0].source.type == "folder"


def test_print_default_config_prints_the_example() -> None:
    result = _cli("print-default-config")
    assert result.returncode == 0
    assert result.stdout == DEFAULT_CONFIG


# -- the default file, rendered from the models ---------------------------------------


def _model_keys(model: type[BaseModel], path: str) -> set[str]:
    """Every key path of `model`, recursively, union variants included."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        models = _model_arguments(info.annotation)
        if models:
            if name not in {"probes", "definitions"} and len(models) == 1:
                keys.add(f"[{key}]")
            for variant in models:
                keys |= _model_keys(variant, key)
        else:
            keys.add(key)
    return keys


def _model_arguments(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for argument in typing.get_args(annotation):
        found += _model_arguments(argument)
    return found


def _template_keys(text: str) -> set[str]:
    """Key paths the template shows, commented out or not ([[probes]] -> probes.*)."""
    keys: set[str] = set()
    section = ""
    for raw in text.splitlines():
        line = raw.removeprefix("# ").strip()
        table = re.fullmatch(r"\[\[?([a-z_.]+)\]\]?", line)
        if table:
            section = table.group(1)
            if not raw.strip().startswith("[["):
                keys.add(f"[{section}]")
            continue
        assignment = re.fullmatch(r"([a-z_0-9]+) = .+", line)
        if assignment:
            keys.add(f"{section}.{assignment.group(1)}")
    return keys


def test_the_default_file_shows_every_key_of_every_settings_model() -> None:
    missing = _model_keys(Settings, "") - _template_keys(DEFAULT_CONFIG)
    assert not missing, f"keys missing from print-default-config: {sorted(missing)}"
    # The ones the hand-written file used to miss, by name:
    for key in (
        "mqtt.client_id",
        "mqtt.keepalive",
        "http.history_max",
        "[probes.tiles]",
        "alarms.definitions.use_adjusted",
        "alarms.definitions.latching",
        "store.commit_delay",
        "probes.source.url",
        "alarms.definitions.direction",
    ):
        assert key in _template_keys(DEFAULT_CONFIG), key


def _model_descriptions(model: type[BaseModel], path: str) -> set[tuple[str, str]]:
    """(key path, description) of every field of `model`, recursively, variants included;
    a section's key path is written `[path]`."""
    found: set[tuple[str, str]] = set()
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        models = _model_arguments(info.annotation)
        found.add((f"[{key}]" if models else key, info.description or ""))
        for variant in models:
            found |= _model_descriptions(variant, key)
    return found


def _explained_keys(text: str) -> set[tuple[str, str]]:
    """(key path, the description it carries) of every key and section of the template:
    the comment on its line, or else the comment lines right above it."""
    found: set[tuple[str, str]] = set()
    section = ""
    above: list[str] = []
    for raw in text.splitlines():
        line = raw.removeprefix("# ")
        table = re.fullmatch(r"\[\[?([a-z_.]+)\]\]?", line)
        assignment = re.fullmatch(r"([a-z_0-9]+) = (.+?)(?:\s+# (.+))?", line)
        if table:
            section = table.group(1)
            if above:
                found.add((f"[{section}]", " ".join(above)))
        elif assignment:
            inline = assignment.group(3)
            found.add((f"{section}.{assignment.group(1)}", inline or " ".join(above)))
        if raw.startswith("# ") and not table and not assignment:
            above.append(raw.removeprefix("# "))
        else:
            above = []
    return found


def test_every_field_of_every_settings_model_has_a_description() -> None:
    undescribed = sorted(key for key, text in _model_descriptions(Settings, "") if not text)
    assert undescribed == []


def test_every_key_of_the_default_file_carries_its_fields_description() -> None:
    """Each key and section shows its `Field(description=...)` where it first appears
    (on its line, or wrapped above it), for every variant."""
    missing = _model_descriptions(Settings, "") - _explained_keys(DEFAULT_CONFIG)
    assert sorted(missing) == []
    shown = _explained_keys(DEFAULT_CONFIG)
    assert ("probes.source.type", "stream: a camera stream read with OpenCV.") in shown
    assert ("[probes.tiles]", "Fixed tiles, used with sampling = 'tiles'.") in shown
    assert (
        "alarms.definitions.kind",
        "fraction_low: a class fraction below limit; clears above limit + deadband.",
    ) in shown


def test_short_descriptions_sit_aligned_on_their_key_line_long_ones_above() -> None:
    lines = DEFAULT_CONFIG.splitlines()
    assert 'max_wait = "20ms"                        # Longest wait for a batch to fill.' in lines
    above = lines.index('commit_delay = "20ms"') - 2
    assert lines[above : above + 2] == [
        "# How long the recorder gathers frame rows into one SQLite transaction; longer groups",
        "# more frames per commit, 0 commits each at once.",
    ]
    assert max(len(line) for line in lines) <= 88
    inline_at = {
        line.index("  # ") + 2
        for line in lines
        if re.match(r"(# )?[a-z_0-9]+ = ", line) and "  # " in line
    }
    assert inline_at == {41}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.02, "20ms"),
        (1.0, "1s"),
        (30.0, "30s"),
        (300.0, "5m"),
        (5400.0, "90m"),
        (7200.0, "2h"),
        (90 * 86400.0, "90d"),
        (1.5, "1500ms"),
    ],
)
def test_default_file_writes_durations_the_way_users_do(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_the_default_file_validates_to_the_defaults_but_its_examples() -> None:
    settings = load_settings(data=tomllib.loads(DEFAULT_CONFIG))
    defaults = Settings.model_validate(
        {"probes": [EXAMPLE_PROBE], "alarms": {"definitions": list(EXAMPLE_ALARMS)}}
    )
    assert str(settings.daemon.state_dir) == "/var/lib/crystal-monitor"
    shown = settings.model_dump(exclude={"daemon": {"state_dir"}, "mqtt": {"client_id"}})
    assert shown == defaults.model_dump(exclude={"daemon": {"state_dir"}, "mqtt": {"client_id"}})
    assert [d.id for d in settings.alarms.definitions] == [a["id"] for a in EXAMPLE_ALARMS]


def _uncommented(text: str, heading: str, section: str) -> str:
    """`text` with the commented block under `heading` switched on in place of the
    active `[section]` block (for [[...]] arrays: added as one more entry)."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = start
    while end < len(lines) and lines[end].startswith("#"):
        end += 1
    block = [line.removeprefix("# ") for line in lines[start:end]]
    block = [line for line in block if re.fullmatch(r"\[.*\]|[a-z_0-9]+ = .+", line)]
    rest = lines[: start - 1] + lines[end:]
    if section.startswith("[["):
        return "\n".join([*rest, "", *block]) + "\n"
    first = rest.index(section)
    last = first + 1
    while last < len(rest) and not rest[last].startswith("["):
        last += 1
    return "\n".join(rest[:first] + block + rest[last:]) + "\n"


@pytest.mark.parametrize(
    ("heading", "section", "check"),
    [
        (
            "# Or a stream source instead of the folder:",
            "[probes.source]",
            lambda s: s.probes[0].source.type == "stream",
        ),
        (
            "# Or a simulated source instead of the folder:",
            "[probes.source]",
            lambda s: s.probes[0].source.type == "simulated",
        ),
        (
            "# A fraction_low alarm, not enabled here:",
            "[[alarms.definitions]]",
            lambda s: s.alarms.definitions[-1].kind == "fraction_low",
        ),
    ],
)
def test_each_commented_variant_validates_once_switched_on(
    heading: str, section: str, check: Any
) -> None:
    assert heading in DEFAULT_CONFIG.splitlines()
    text = _uncommented(DEFAULT_CONFIG, heading, section)
    assert check(load_settings(data=tomllib.loads(text)))


def test_commented_keys_validate_with_their_example_values() -> None:
    """Every `# key = value` under an active section, switched on, still validates (the
    examples are real values, not placeholders)."""
    lines = DEFAULT_CONFIG.splitlines()
    switched = []
    in_variant = False
    for raw in lines:
        line = raw
        variant = r"# (Or a \w+ source instead of the folder|A \w+ alarm, not enabled here):"
        # A commented-out section header starts a variant too (an optional section).
        if re.fullmatch(variant, line) or re.fullmatch(r"# \[\[?[a-z_.]+\]\]?", line):
            in_variant = True
        elif line.startswith("[") or not line.strip():
            in_variant = in_variant and not line.startswith("[")
        alternative = line.startswith(("# password_credential", "# token_credential"))
        if not in_variant and not alternative and re.fullmatch(r"# [a-z_0-9]+ = .+", line):
            line = line.removeprefix("# ")  # (the *_credential keys: or *_env, not both)
        switched.append(line)
    text = "\n".join(switched) + "\n"
    settings = load_settings(data=tomllib.loads(text.replace('after = "keep"', 'after = "move"')))
    assert str(settings.model.path) == "/opt/crystal-monitor/models/site-2026"
    assert settings.mqtt.client_id == "crystal-monitor-HOSTNAME"
    assert settings.probes[0].max_decoded_bytes == 100_000_000


# -- every error in one pass, fraction hints, unknown environment overrides (issue 13) --

ALARM = """
[[alarms.definitions]]
id = "{id}"
kind = "fraction_high"
priority = "high"
message = "PG share {{value:.1%}} above {{limit:.0%}}"
class_name = "PG"
window = "{window}"
limit = {limit}
"""


def test_validate_config_reports_every_error_in_one_pass(tmp_path: Path) -> None:
    """A typo, a bad duration, a limit in percent and a bad window in the same alarm, a
    bad window in another one and a missing users file: all in one run, exit 78."""
    path = tmp_path / "bad.toml"
    path.write_text(
        "[daemon]\nlog_levl = 'debug'\n[aggregation]\npublish_interval = '5 parsecs'\n"
        f"[opcua]\nusers_file = '{tmp_path / 'no-users'}'\n"
        + ALARM.format(id="pg_high", window="2m", limit=15)
        + ALARM.format(id="pg_high_long", window="7m", limit=0.2)
        + GOOD_PROBE
    )
    result = _cli("validate-config", str(path))
    assert result.returncode == EX_CONFIG
    lines = result.stderr.splitlines()
    assert all(line.startswith("config error: ") for line in lines), lines
    expected = [
        "daemon.log_levl: unknown key",
        "aggregation.publish_interval: expected a duration",
        "alarms.definitions[0].limit: Input should be less than or equal to 1, got 15",
        "alarm 'pg_high': window 120s is not an aggregation window (60s, 300s, 900s)",
        "alarm 'pg_high_long': window 420s is not an aggregation window",
        f"opcua.users_file: not found: {tmp_path / 'no-users'}",
    ]
    for words in expected:
        assert sum(words in line for line in lines) == 1, (words, lines)
    assert len(lines) == len(expected), lines


def test_an_alarm_window_is_a_config_error_of_load_settings_itself() -> None:
    """Known from the file alone, so it no longer waits for the start-up checks."""
    text = ALARM.format(id="pg_high", window="2m", limit=0.15) + GOOD_PROBE
    with pytest.raises(ConfigError) as caught:
        load_settings(data=tomllib.loads(text))
    assert caught.value.problems == [
        "alarms.definitions: alarm 'pg_high': window 120s is not an aggregation window "
        "(60s, 300s, 900s); add it to aggregation.windows or pick one of those"
    ]


@pytest.mark.parametrize(
    ("table", "key", "given", "write"),
    [
        ("alarm", "alarms.definitions[0].limit", "15", "0.15"),
        ("quality", "probes[0].quality.max_saturated_share", "25", "0.25"),
    ],
)
def test_a_fraction_above_1_says_that_0_15_means_15_percent(
    table: str, key: str, given: str, write: str
) -> None:
    if table == "alarm":
        text = ALARM.format(id="pg_high", window="5m", limit=given) + GOOD_PROBE
    else:
        text = GOOD_PROBE + f"[probes.quality]\nmax_saturated_share = {given}\n"
    with pytest.raises(ConfigError) as caught:
        load_settings(data=tomllib.loads(text))
    assert caught.value.problems == [
        f"{key}: Input should be less than or equal to 1, got {given}: this is a fraction, "
        f"0.15 means 15 % (for {given} % write {write})"
    ]


def test_a_fraction_within_0_and_1_and_a_negative_one_keep_their_messages() -> None:
    ok = load_settings(data=tomllib.loads(ALARM.format(id="a", window="5m", limit=1) + GOOD_PROBE))
    assert ok.alarms.definitions[0].limit == 1.0  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="greater than or equal to 0"):
        load_settings(data=tomllib.loads(ALARM.format(id="a", window="5m", limit=-1) + GOOD_PROBE))


@pytest.mark.parametrize(
    ("variable", "nearest"),
    [
        pytest.param(
            "CRYSTAL_MONITOR__DAEMN__LOG_LEVEL",
            "CRYSTAL_MONITOR__DAEMON__LOG_LEVEL (daemon.log_level)",
            id="section misspelled (was silently ignored)",
        ),
        pytest.param(
            "CRYSTAL_MONITOR__DAEMON__LOG_LEVLE",
            "CRYSTAL_MONITOR__DAEMON__LOG_LEVEL (daemon.log_level)",
            id="key misspelled",
        ),
        pytest.param(
            "CRYSTAL_MONITOR__BACKEND__TENSORRT__PRECISON",
            "CRYSTAL_MONITOR__BACKEND__TENSORRT__PRECISION (backend.tensorrt.precision)",
            id="nested section",
        ),
        pytest.param(
            "CRYSTAL_MONITOR__OPCUA__USER_FILE",
            "CRYSTAL_MONITOR__OPCUA__USERS_FILE (opcua.users_file)",
            id="key of another section",
        ),
    ],
)
def test_an_unknown_override_is_one_error_naming_the_nearest_key(
    variable: str, nearest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, "debug")
    with pytest.raises(ConfigError) as caught:
        load_settings(data=tomllib.loads(GOOD_PROBE))
    assert caught.value.problems == [
        f"{variable}: this environment variable sets no configuration key; did you mean "
        f"{nearest}? rename or unset it"
    ]


def test_an_override_far_from_every_key_says_where_the_keys_are_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CRYSTAL_MONITOR__ZZZ", "1")
    with pytest.raises(ConfigError) as caught:
        load_settings(data=tomllib.loads(GOOD_PROBE))
    (problem,) = caught.value.problems
    assert problem.startswith("CRYSTAL_MONITOR__ZZZ: this environment variable sets no")
    assert "print-default-config" in problem


def test_known_overrides_in_any_case_and_whole_sections_are_no_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic-settings reads names in any case and a section as JSON; so does the check.
    Variables without the double underscore are not overrides (CRYSTAL_MONITOR_MQTT_...)."""
    monkeypatch.setenv("crystal_monitor__daemon__log_level", "debug")
    monkeypatch.setenv("CRYSTAL_MONITOR__BACKEND__TENSORRT__PRECISION", "fp16")
    monkeypatch.setenv("CRYSTAL_MONITOR__STORE", '{"retention": "30d"}')
    monkeypatch.setenv("CRYSTAL_MONITOR_MQTT_PASSWORD", "secret")
    settings = load_settings(data=tomllib.loads(GOOD_PROBE))
    assert settings.daemon.log_level == "debug"
    assert settings.store.retention == 30 * 86400.0


def test_the_keys_an_override_can_set_stop_at_lists() -> None:
    """Sections, their keys and nested sections' keys; never an item of a list (probes,
    alarm definitions), which pydantic-settings cannot address one by one."""
    keys = override_keys(Settings)
    assert {"daemon", "daemon__log_level", "backend__tensorrt__precision", "probes"} <= set(keys)
    assert "alarms__definitions" in keys
    assert not [key for key in keys if key.startswith(("probes__", "alarms__definitions__"))]


@pytest.mark.parametrize("command", ["validate-config", "run"])
def test_an_unknown_override_stops_validate_config_and_run_with_exit_78(
    command: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    state = tmp_path / "state"
    path.write_text(f"[daemon]\nstate_dir = '{state}'\n" + GOOD_PROBE)
    env = {**os.environ, "CRYSTAL_MONITOR__DAEMON__LOG_LEVLE": "debug"}
    args = ["run", "--config", str(path)] if command == "run" else [command, str(path)]
    result = _cli(*args, env=env)
    assert result.returncode == EX_CONFIG
    assert result.stderr == (
        "config error: CRYSTAL_MONITOR__DAEMON__LOG_LEVLE: this environment variable sets no "
        "configuration key; did you mean CRYSTAL_MONITOR__DAEMON__LOG_LEVEL "
        "(daemon.log_level)? rename or unset it\n"
    )
    assert not state.exists()
