"""Fractions in the configuration: shares written 0-1, never percent.

Someone who means 15 % writes `limit = 15` as often as `0.15`; pydantic's own message
("Input should be less than or equal to 1") does not say which was meant, so a value
above 1 gets a hint that converts it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator


def _hint_percent(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError as exc:
        above = next((e for e in exc.errors() if e["type"] == "less_than_equal"), None)
        if above is None:
            raise
        given = float(above["input"])
        raise ValueError(
            f"Input should be less than or equal to 1, got {given:g}: this is a fraction, "
            f"0.15 means 15 % (for {given:g} % write {given / 100:g})"
        ) from None


Fraction = Annotated[float, Field(ge=0.0, le=1.0), WrapValidator(_hint_percent)]
"""A share 0-1; a value above 1 is refused with the hint that 0.15 means 15 %."""
