"""Byte-level helpers shared by the coders: varints, symbol tables, entropy.

Everything is vectorised numpy: a stream of millions of symbols never goes through a
per-symbol Python loop. The byte layouts are specified in ``docs/format.md`` (section 4).
Decoders check every count against the bytes that are really there before allocating, and
raise :class:`ContainerError` on anything malformed.
"""

from __future__ import annotations

import numpy as np

from edgeslim.core.errors import ContainerError

MAX_VARINT_BYTES = 9  # values below 2**63


def write_varints(values: np.ndarray | list[int]) -> bytes:
    """Unsigned LEB128 encoding of each value, concatenated."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)  # (n,)
    if v.size == 0:
        return b""
    lengths = np.ones(v.size, dtype=np.int64)  # (n,) bytes per value
    for j in range(1, MAX_VARINT_BYTES):
        lengths += (v >> np.uint64(7 * j)) > 0
    if int(lengths.max()) > MAX_VARINT_BYTES or int(v.max()) >= 1 << 63:
        raise ValueError("varint values must be below 2**63")
    offsets = np.cumsum(lengths) - lengths  # (n,) first byte of each value
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for j in range(MAX_VARINT_BYTES):
        sel = lengths > j
        if not sel.any():
            break
        group = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = np.where(lengths[sel] > j + 1, 0x80, 0).astype(np.uint64)
        out[offsets[sel] + j] = (group | more).astype(np.uint8)
    return out.tobytes()


def read_varints(buf: np.ndarray, pos: int, count: int, what: str) -> tuple[np.ndarray, int]:
    """Read ``count`` varints from ``buf[pos:]``; returns ``(values (count,) uint64, new_pos)``."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64), pos
    if count > len(buf) - pos:
        raise ContainerError(
            f"{what}: needs {count} varints but only {len(buf) - pos} bytes remain"
        )
    window = buf[pos : pos + MAX_VARINT_BYTES * count]
    ends = np.flatnonzero(window < 0x80)[:count]  # last byte of each varint
    if ends.size < count:
        if window.size == MAX_VARINT_BYTES * count:  # bytes remain: a varint is too long
            raise ContainerError(f"{what}: a varint is longer than {MAX_VARINT_BYTES} bytes")
        raise ContainerError(f"{what}: truncated (a varint runs past the end of the stream)")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise ContainerError(f"{what}: a varint is longer than {MAX_VARINT_BYTES} bytes")
    seg = window[: ends[-1] + 1].astype(np.uint64) & np.uint64(0x7F)
    shift = ((np.arange(seg.size) - np.repeat(starts, lengths)) * 7).astype(np.uint64)
    values = np.add.reduceat(seg << shift, starts)
    return values, pos + int(ends[-1]) + 1


def write_table(symbols: np.ndarray) -> bytes:
    """``varint m`` then the m symbol deltas (symbols strictly increasing)."""
    s = np.asarray(symbols, dtype=np.int64)
    deltas = np.diff(np.concatenate(([-1], s))) - 1
    return write_varints([s.size]) + write_varints(deltas)


def read_table(buf: np.ndarray, alphabet: int, what: str) -> tuple[np.ndarray, int]:
    """Read a symbol table at the start of ``buf``; returns ``(symbols (m,) int64, pos)``."""
    (m,), pos = read_varints(buf, 0, 1, what)
    m = int(m)
    if not 1 <= m <= alphabet:
        raise ContainerError(f"{what}: symbol table lists {m} symbols; alphabet has {alphabet}")
    deltas, pos = read_varints(buf, pos, m, what)
    if int(deltas.max()) >= alphabet:
        raise ContainerError(f"{what}: symbol table has a symbol outside the alphabet")
    symbols = np.cumsum(deltas.astype(np.int64) + 1) - 1
    if int(symbols[-1]) >= alphabet:
        raise ContainerError(f"{what}: symbol {int(symbols[-1])} outside alphabet of {alphabet}")
    return symbols, pos


def histogram(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """``(present symbols (m,), their counts (m,))`` of a symbol array, symbols ascending."""
    counts = np.bincount(np.asarray(symbols, dtype=np.int64), minlength=alphabet)
    present = np.flatnonzero(counts)
    return present, counts[present]


def entropy_bits(counts: np.ndarray) -> float:
    """``n * H``: the order-0 entropy bound, in bits, of symbols with these counts."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    n = c.sum()
    return max(0.0, float(-(c * np.log2(c / n)).sum())) if n else 0.0


def check_symbols(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """``symbols`` as a flat int64 array, after checking they lie in ``[0, alphabet)``."""
    s = np.asarray(symbols).reshape(-1)
    if s.size and (int(s.min()) < 0 or int(s.max()) >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet}), got [{s.min()}, {s.max()}]")
    if alphabet > 1 << 20:
        raise ValueError(f"alphabet of {alphabet} symbols is too large (at most 2**20)")
    return s.astype(np.int64, copy=False)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "ceil_div",
    "check_symbols",
    "entropy_bits",
    "histogram",
    "read_table",
    "read_varints",
    "write_table",
    "write_varints",
]
