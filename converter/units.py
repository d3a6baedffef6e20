"""Byte sizes as people write them ("5GB", "500MB", "1.5GiB"), parsed once."""

from __future__ import annotations

import re

from converter.errors import MxconvError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in "5GB" (decimal units, like Hugging Face's max_shard_size) or "4GiB" (binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        bare = f" ({text!r} could mean either: {m.group(1)}{unit}B or {m.group(1)}{unit}iB)" if unit in tuple("KMGT") else ""
        raise MxconvError(f"cannot read size {text!r}; write it like 5GB, 500MB or 4GiB{bare}")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MxconvError(f"size must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
