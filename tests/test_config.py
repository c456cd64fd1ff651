"""Configuration: every kind of mistake gives one clear message naming its key, exit code 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitor.cli.subcommands import DEFAULT_CONFIG
from monitor.config.durations import parse_duration
from monitor.config.settings import EX_CONFIG, ConfigError, load_settings

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
