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
