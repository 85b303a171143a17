"""Check helpers for config sections. Each raises a ConfigError that names the field, the value and what is
allowed. The whole-config validation lives in rlkd.validate (it needs the method table)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


def bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config field {name}={value!r} is invalid: {allowed}")


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise bad(name, value, allowed)


def positive(section: Any, prefix: str, names: list[str], allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(section, n)
        check(v >= 0 if allow_zero else v > 0, f"{prefix}.{n}", v, ">= 0" if allow_zero else "> 0")


def one_of(value: Any, name: str, allowed: list) -> None:
    check(value in allowed, name, value, f"one of {allowed}")


def unit(value: float, name: str, low_open: bool = False, high_open: bool = False) -> None:
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    check(ok, name, value, f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")
