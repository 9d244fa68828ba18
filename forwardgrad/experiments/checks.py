"""Checks of settings that raise ``ConfigurationError`` naming the setting and what to pass."""

from __future__ import annotations

import math
from collections.abc import Iterable

from forwardgrad.errors import ConfigurationError


class ConfigurationTypeError(ConfigurationError, TypeError):
    """A setting has the wrong type (a float where an integer is needed, ...)."""


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    """Raise unless ``value`` is one of ``allowed`` (a registry's names)."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigurationError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}.")


def check_number(name: str, value: object, low: float, strict: bool = False) -> None:
    """Raise unless ``value`` is a finite number at least (``strict``: above) ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationTypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < low or (strict and value == low):
        bound = f"greater than {low}" if strict else f"at least {low}"
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {value}.")


def check_integer(name: str, value: object, low: int) -> None:
    """Raise unless ``value`` is an integer at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationTypeError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise ConfigurationError(f"{name} must be at least {low}, got {value}.")
