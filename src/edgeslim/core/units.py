"""Numbers for people: byte sizes in binary units."""

from __future__ import annotations

DASH = "–"  # an unknown value in a table


def human_bytes(n: float | None) -> str:
    """Bytes in binary units: ``512 B``, ``98.3 KiB``, ``1.6 MiB``; ``–`` when unknown."""
    if n is None:
        return DASH
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1023.95 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
