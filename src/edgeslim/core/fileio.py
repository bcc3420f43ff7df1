"""Atomic file writes: write to a temporary name in the same directory, then rename.

A reader never sees half a file, and an interrupted write leaves what was there before
untouched. Plain Python (no torch), so the report and CLI can use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from edgeslim.core.errors import CheckpointError

MAX_JSON_INT_DIGITS = 100


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path with the same file name; move it onto ``path`` on success.

    The temporary file sits in a hidden directory next to ``path`` (same file system, so
    the final ``os.replace`` is atomic) and keeps ``path``'s name, for writers that record
    the file name inside the file. On an exception the temporary is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with a canonical header: keys sorted, ``__metadata__`` first.

    The safetensors writer emits the metadata map in hash order, which changes from process
    to process, so two saves of the same tensors differ in their bytes. The tensor data and
    its offsets are left exactly as written; only the JSON header is re-serialised (padded
    with spaces to a multiple of 8 bytes, as the format asks).
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered: dict = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a safetensors file atomically and byte-reproducibly (see ``canonical_safetensors``)."""
    from safetensors.torch import save

    return atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


class _BadJson(ValueError):
    pass


def _reject_constant(name: str):
    raise _BadJson(f"{name} is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _BadJson(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_JSON_INT_DIGITS:
        raise _BadJson(f"a number of {len(text)} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadJson(f"number {text} overflows")
    return value


def strict_json_loads(data: str | bytes, where: str) -> object:
    """``json.loads`` for untrusted files: ``NaN``/``Infinity``, integers of more than
    ``MAX_JSON_INT_DIGITS`` digits, overflowing floats, invalid UTF-8 and too deep nesting
    are all a :class:`~edgeslim.core.errors.CheckpointError` naming ``where``."""
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return json.loads(
            data,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except (ValueError, RecursionError, MemoryError, TypeError) as exc:
        # JSONDecodeError, UnicodeDecodeError and _BadJson are ValueErrors
        raise CheckpointError(f"{where}: invalid JSON: {exc}") from exc


_Scratch = TypeVar("_Scratch", bound="ScratchDir")


class ScratchDir:
    """A temporary working directory (``self.dir``) removed by :meth:`close` or ``with``."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self: _Scratch) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
