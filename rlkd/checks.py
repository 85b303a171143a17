"""Check helpers for config sections. Each raises a ConfigError that names the field, the value and what is
allowed. The whole-config validation lives in rlkd.validate (it needs the method table)."""
from __future__ import annotations

import math
import re
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


def bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config field {name}={value!r} is invalid: {allowed}")


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise bad(name, value, allowed)


def positive(section: Any, prefix: str, names: list[str], allow_zero: bool = False) -> None:
    """Each field > 0 (>= 0 with allow_zero) and finite: inf passes a plain comparison and breaks later."""
    for n in names:
        v = getattr(section, n)
        ok = (v >= 0 if allow_zero else v > 0) and math.isfinite(v)
        check(ok, f"{prefix}.{n}", v, ("a finite number >= 0" if allow_zero else "a finite number > 0"))


def one_of(value: Any, name: str, allowed: list) -> None:
    check(value in allowed, name, value, f"one of {allowed}")


def unit(value: float, name: str, low_open: bool = False, high_open: bool = False) -> None:
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    check(ok, name, value, f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_name(value: str, name: str) -> None:
    """A directory name that stays inside its parent: one path component of ASCII letters, digits and
    '._-' (no '/', no '..', no leading dot, at most 128 characters)."""
    check(bool(_SAFE_NAME.fullmatch(value)), name, value,
          "one directory name of ASCII letters, digits, '.', '_' and '-' (starting with a letter or digit, at most "
          "128 characters), so the run stays inside run.output_dir")
