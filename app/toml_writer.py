"""A TOML writer for the few value types of a training config: str, bool, int, float, list of str.

The trainer reads the file with tomllib (train_dreambooth_flat.py --config run.toml); no TOML
writer ships with Python and the config needs no tables, so this small one is enough. Anything
it cannot write exactly (None, NaN, nested values, odd key names) raises ValueError rather than
writing a file that reads back as something else.
"""

from __future__ import annotations

import math
import re

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def dumps(values: dict) -> str:
    """`key = value` lines, in the dict's order; keys must be bare TOML keys (flag names are)."""
    lines = []
    for key, value in values.items():
        if not isinstance(key, str) or not _BARE_KEY.match(key):
            raise ValueError(f"not a bare TOML key: {key!r}")
        lines.append(f"{key} = {_value(key, value)}\n")
    return "".join(lines)


def _value(key: str, value) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: {value} is not a finite number")
        return repr(value)  # shortest text that reads back as the same float; valid TOML
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_string(v) for v in value) + "]"
    raise ValueError(f"{key}: cannot write {type(value).__name__} {value!r} to TOML")


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
