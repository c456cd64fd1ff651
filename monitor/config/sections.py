"""The sections of a configuration that are valid on their own, when the whole is not.

pydantic stops a model at its field errors, so everything checked after validation (an
alarm window against the aggregation windows, the files a section names) used to wait
until every typo was fixed: one round of `validate-config` per kind of mistake. The
sections without an error are validated again here, alone, so those checks can run in
the same pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, tables merged key by key (as pydantic-settings
    lays the environment over the file)."""
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = merge_values(below, value)
        else:
            merged[key] = value
    return merged


def validate_sections(
    model: type[BaseModel], values: Mapping[str, Any], failed: Collection[str]
) -> dict[str, object]:
    """name -> validated value of each field of `model` that is not in `failed` (the
    fields the model's errors are located in) and validates alone; a field missing from
    `values` takes its default."""
    sections: dict[str, object] = {}
    for name, field in model.model_fields.items():
        if name in failed or field.annotation is None:
            continue
        if name not in values:
            if not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
            continue
        try:
            sections[name] = TypeAdapter(field.annotation).validate_python(values[name])
        except ValidationError:
            continue
    return sections
