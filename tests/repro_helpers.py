"""Comparing files byte for byte, and run directories but for measured times (the
reproducibility tests: ``test_reproducible_bytes.py``, the kill-and-resume test)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _mismatch(a: bytes, b: bytes) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return (
        f"{len(a)} vs {len(b)} bytes, sha256 {hashlib.sha256(a).hexdigest()[:12]} vs "
        f"{hashlib.sha256(b).hexdigest()[:12]}, first difference at offset {n}: "
        f"{a[max(0, n - 16) : n + 32]!r} vs {b[max(0, n - 16) : n + 32]!r}"
    )


def assert_same_bytes(a: Path, b: Path, names) -> None:
    differ = {}
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if x != y:
            differ[name] = _mismatch(x, y)
    assert not differ, "files differ between the two runs:\n" + "\n".join(
        f"  {k}: {v}" for k, v in differ.items()
    )


# What a stage measures with a clock: the only fields allowed to differ between two runs.
TIMINGS = ("seconds", "latency_ms")


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same files with the same bytes; ``meta.json`` and
    ``metrics.jsonl`` equal but for measured times; ``report.md`` is skipped (it shows them)."""
    files_a, files_b = files(a), files(b)
    assert files_a.keys() == files_b.keys()
    timed = {n for n in files_a if n.endswith(("meta.json", "metrics.jsonl", "report.md"))}
    assert_same_bytes(a, b, sorted(files_a.keys() - timed))
    for name in sorted(timed):
        if name.endswith("meta.json"):
            x, y = (json.loads((d / name).read_text()) for d in (a, b))
            x["row"], y["row"] = without_timings(x["row"]), without_timings(y["row"])
            assert x == y, f"{name} differs beyond {TIMINGS}"
        elif name.endswith("metrics.jsonl"):
            x, y = (
                [without_timings(json.loads(line)) for line in (d / name).read_text().splitlines()]
                for d in (a, b)
            )
            assert x == y, f"{name} differs beyond {TIMINGS}"
