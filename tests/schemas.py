"""The published payloads' JSON Schemas (monitor/schemas/), by MQTT topic."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator


@cache
def validator(name: str) -> Draft202012Validator:
    text = (resources.files("monitor") / "schemas" / name).read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_for_topic(prefix: str, topic: str) -> str:
    """The schema file a topic's payloads follow (KeyError for a topic we do not publish)."""
    parts = topic.removeprefix(prefix + "/").split("/")
    if parts == ["status"]:
        return "status.json"
    if len(parts) == 2 and parts[1] in ("fractions", "events", "results"):
        return {"fractions": "fractions.json", "events": "event.json", "results": "result.json"}[
            parts[1]
        ]
    if len(parts) == 3 and parts[1] == "alarms":
        return "alarm.json"
    if len(parts) == 3 and parts[1] == "cmd":
        return "cmd-reply.json" if parts[2] == "reply" else f"cmd-{parts[2]}.json"
    raise KeyError(topic)


def errors(name: str, document: Any) -> list[str]:
    """Every way `document` breaks schema `name`, as 'path: message' lines."""
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator(name).iter_errors(document)
    ]
