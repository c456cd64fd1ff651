"""Environment overrides that set nothing: `CRYSTAL_MONITOR__...` variables naming no key.

pydantic-settings reads `PREFIX` + `SECTION__KEY` for the keys it knows and skips every
other variable, so a misspelled section (`CRYSTAL_MONITOR__DAEMN__LOG_LEVEL`) was
silently ignored and the daemon ran on the file's value. Here each variable with the
prefix is matched against every key an override can set; one that matches none is a
configuration error naming the nearest key (difflib). Names are compared in lower case,
as pydantic-settings reads them.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models an override can reach inside a field's type: the field's own model,
    or each one of a union (`X | None`); never inside a tuple or list, whose items an
    environment variable cannot address one by one."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models_in(typing.get_args(annotation)[0])
    elif origin is typing.Union or origin is types.UnionType:
        for member in typing.get_args(annotation):
            yield from _models_in(member)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation


def override_keys(model: type[BaseModel], delimiter: str = "__") -> list[str]:
    """Every key path an override can set, lower case and joined by `delimiter`: each
    section (a JSON value for all of it) and each key below it, nested sections too."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(name)
        for nested in _models_in(field.annotation):
            keys += [f"{name}{delimiter}{key}" for key in override_keys(nested, delimiter)]
    return list(dict.fromkeys(keys))


@dataclass(frozen=True)
class UnknownOverride:
    """An environment variable with the prefix that sets no key."""

    variable: str
    path: tuple[str, ...]
    """Its key path, lower case: what pydantic reports an unknown key at, if anything."""
    nearest: str | None
    """The closest variable that does set a key, if any is close."""
    nearest_key: str | None
    """That variable's key as the file writes it, e.g. daemon.log_level."""

    def describe(self) -> str:
        problem = f"{self.variable}: this environment variable sets no configuration key"
        if self.nearest is not None:
            return (
                f"{problem}; did you mean {self.nearest} ({self.nearest_key})? rename or unset it"
            )
        return (
            f"{problem} (`crystal-monitor print-default-config` lists every key; an override "
            "is the prefix, then SECTION__KEY); rename or unset it"
        )


def find_unknown_overrides(
    environ: Mapping[str, str], model: type[BaseModel], prefix: str, delimiter: str = "__"
) -> list[UnknownOverride]:
    """The variables in `environ` that start with `prefix` (any case) and set no key of
    `model`, sorted by name."""
    keys = override_keys(model, delimiter)
    known = set(keys)
    unknown: list[UnknownOverride] = []
    for variable in sorted(environ):
        if not variable.lower().startswith(prefix.lower()):
            continue
        name = variable[len(prefix) :].lower()
        if name in known:
            continue
        close = difflib.get_close_matches(name, keys, n=1)
        nearest = close[0] if close else None
        unknown.append(
            UnknownOverride(
                variable=variable,
                path=tuple(name.split(delimiter)),
                nearest=None if nearest is None else prefix + nearest.upper(),
                nearest_key=None if nearest is None else nearest.replace(delimiter, "."),
            )
        )
    return unknown
