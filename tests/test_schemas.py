"""The published JSON Schemas and the wire rules they describe (monitor/wire.py)."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest

from monitor.publishers.mqtt import COMMAND_MODELS, alarm_payload
from monitor.wire import rounded, snapshot_on_wire, to_wire
from tests.schemas import errors, validator

SCHEMAS = sorted(
    entry.name
    for entry in (resources.files("monitor") / "schemas").iterdir()
    if entry.name.endswith(".json")
)


def test_there_is_a_valid_schema_for_every_topic_and_command() -> None:
    assert set(SCHEMAS) == {
        "status.json",
        "fractions.json",
        "alarm.json",
        "event.json",
        "result.json",
        "cmd-reply.json",
        *(f"cmd-{name}.json" for name in COMMAND_MODELS),
    }
    for name in SCHEMAS:
        validator(name)  # check_schema raises on an invalid one


@pytest.mark.parametrize("command", sorted(COMMAND_MODELS))
def test_command_schemas_say_what_the_daemon_accepts(command: str) -> None:
    """The files are the pydantic models' schemas: they cannot drift from the parser."""
    text = (resources.files("monitor") / "schemas" / f"cmd-{command}.json").read_text()
    written = json.loads(text)
    model = COMMAND_MODELS[command].model_json_schema()
    assert written["properties"] == model["properties"]
    assert written["required"] == model["required"]
    assert written["additionalProperties"] is False
    assert errors(f"cmd-{command}.json", {"who": "ana", "bogus": 1})  # typos are refused


def test_a_batch_start_needs_its_id_in_the_schema_too() -> None:
    assert errors("cmd-batch.json", {"who": "ana", "action": "start"})
    assert not errors("cmd-batch.json", {"who": "ana", "action": "stop"})
    assert not errors(
        "cmd-batch.json", {"who": "ana", "action": "start", "batch_id": "B", "end_running": True}
    )


def test_wire_rounds_numbers_turns_times_to_iso_and_nan_to_null() -> None:
    assert rounded(5332.125178917517) == 5332.13
    assert rounded(0.1234567) == 0.123457
    assert rounded(math.nan) is None and rounded(math.inf) is None
    document = to_wire(
        {
            "ts": 1_700_000_000.1239,
            "active_since": None,
            "value": math.nan,
            "nested": [{"state_since": 0.0, "share": 1 / 3}],
            "ts_list": [1.0],
            "flag": True,
            "count": 7,
        }
    )
    assert document == {
        "ts": "2023-11-14T22:13:20.123Z",
        "active_since": None,
        "value": None,
        "nested": [{"state_since": "1970-01-01T00:00:00.000Z", "share": 0.333333}],
        "ts_list": [1.0],
        "flag": True,
        "count": 7,
    }


def test_window_keys_carry_their_unit() -> None:
    snapshot = {"ts": 0.0, "batch": None, "windows": {"300": {"n": 0}}, "trend": {}}
    wire = snapshot_on_wire(snapshot)
    assert wire["windows"] == {"300s": {"window_s": 300, "n": 0}}
    assert wire["ts"] == "1970-01-01T00:00:00.000Z"
    assert wire["units"]["fraction"].startswith("fraction")


def test_the_retained_alarm_leaves_out_the_live_value() -> None:
    status = {
        "probe": "R1",
        "alarm_id": "pg_high",
        "kind": "fraction_high",
        "category": "process",
        "priority": "high",
        "severity": 750,
        "state": "active_unacknowledged",
        "active": True,
        "acknowledged": False,
        "latched": False,
        "shelved": False,
        "shelved_until": None,
        "shelved_by": None,
        "suppressed": False,
        "message": "PG 40% above 30%",
        "trip_message": "PG 40% above 30%",
        "trip_value": 0.4,
        "value": 0.512345678,
        "value_reason": None,
        "limit": 0.3,
        "unit": "fraction",
        "active_since": 10.0,
        "state_since": 10.0,
        "acknowledged_at": None,
        "acknowledged_by": None,
        "quality": "GOOD",
    }
    body = alarm_payload(status, run_id=5.0, current=True)
    assert "value" not in body and "quality" not in body
    moved = alarm_payload({**status, "value": 0.6}, run_id=5.0, current=True)
    assert moved == body  # a moving value is no change of the retained state
    assert not errors("alarm.json", {**body, "ts": "1970-01-01T00:00:10.000Z"})
    assert body["active_since"] == "1970-01-01T00:00:10.000Z"
