"""Compressed int8 weights for the C backend: value tables, packed codes, sparse indices.

A conv (not depthwise) or fully connected layer's int8 weights, as a ``(rows, cols)``
matrix (rows = output channels; cols = ``KH*KW*Cin`` for a conv, in the order of an im2col
patch, ``Cin`` for a fully connected layer), may be stored in one of these forms instead of
plain int8 (``"dense"``); the kernels (``templates/kernels.c``, section ``packed``) compute
straight from them, one row at a time, and never expand a layer in RAM:

- ``"codebook"``: every weight as a ``code_bits``-bit index into the layer's table of its
  distinct int8 values (zero included when present);
- ``"relative"``: only the nonzero weights, in row-major order over the whole matrix, each
  an entry of ``index_bits`` + ``code_bits`` bits: the number of zeros skipped before it
  (crossing row ends; rows with nothing left are empty) and its index into the table of the
  distinct nonzero values. A gap of ``2**index_bits - 1`` or more is bridged by *filler*
  entries whose gap field is all ones: skip that many positions, no weight (the relative
  indices of Deep Compression, section 4, without spending a table slot on zero);
- ``"runs"``: pairs of ``index_bits`` (zeros to skip) and ``run_bits`` (nonzeros that
  follow) fields, each pair followed by the codes of its nonzeros; longer runs are split
  into several pairs. Smaller than ``"relative"`` where nonzeros come in runs (e.g.
  structured or low sparsity).

Fields are packed LSB first into bytes. The table holds the exact int8 values, so a kernel's
products are the dense kernel's and its outputs bit-exact with the reference interpreter.
:func:`best` picks, per layer, the smallest form (all widths tried) and keeps ``"dense"``
unless the compressed bytes (stream + table) are smaller.

After k-means weight sharing a layer has at most ``2**bits`` distinct float weights, but
per-output-channel int8 scales would map each shared value to a different int8 code in
every channel. :mod:`edgeslim.export.int8` therefore gives shared layers one scale for the
whole tensor (still stored per channel, all equal), so the table stays at ``<= 2**bits``
entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.export.int8 import ir

FORMATS = ("dense", "codebook", "relative", "runs")
FORMAT_ID = {"codebook": 1, "relative": 2, "runs": 3}
MAX_INDEX_BITS = 12
MAX_RUN_BITS = 8
MIN_TOTAL_SAVING = 1024  # below this the kernels' own code (about 1 KB of Thumb-2) eats it


@dataclass
class Packed:
    """One layer's weights in a compressed form (or ``"dense"``: left as int8)."""

    format: str
    rows: int
    cols: int
    table: np.ndarray  # int64 values of the int8 table
    code_bits: int = 8
    index_bits: int = 0
    run_bits: int = 0
    entries: int = 0  # relative: entries incl. fillers; runs: pairs
    stream: bytes = b""

    @property
    def dense_bytes(self) -> int:
        return self.rows * self.cols

    @property
    def nbytes(self) -> int:
        """Flash bytes of the weights in this form (stream + value table)."""
        if self.format == "dense":
            return self.dense_bytes
        return len(self.stream) + len(self.table)

    def describe(self) -> str:
        if self.format == "dense":
            return f"dense int8, {self.dense_bytes:,} B"
        widths = f"{self.code_bits}-bit codes, {len(self.table)}-value table"
        if self.format == "relative":
            widths += f", {self.index_bits}-bit gaps, {self.entries:,} entries"
        elif self.format == "runs":
            widths += f", {self.index_bits}+{self.run_bits}-bit run pairs ({self.entries:,})"
        return f"{self.format} ({widths}): {self.dense_bytes:,} -> {self.nbytes:,} B"


def _bits_for(n: int) -> int:
    """Bits of an index into a table of ``n`` values (at least 1)."""
    return max(1, int(np.ceil(np.log2(max(n, 1)))))


def pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Fields ``values[i]`` of ``widths[i]`` bits, concatenated LSB first into bytes."""
    values = np.asarray(values, np.int64)
    widths = np.asarray(widths, np.int64)
    if values.size == 0:
        return b""
    if np.any(values < 0) or np.any(values >> widths):
        raise ValueError("a field does not fit its width")
    offsets = np.concatenate(([0], np.cumsum(widths)[:-1]))
    total = int(widths.sum())
    bits = np.zeros(total, np.uint8)
    for j in range(int(widths.max())):
        sel = widths > j
        bits[offsets[sel] + j] = (values[sel] >> j) & 1
    return np.packbits(bits, bitorder="little").tobytes()


def unpack_bits(data: bytes, widths: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_bits`."""
    widths = np.asarray(widths, np.int64)
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little").astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(widths)[:-1]))
    out = np.zeros(len(widths), np.int64)
    for j in range(int(widths.max(initial=0))):
        sel = widths > j
        out[sel] |= bits[offsets[sel] + j] << j
    return out


def _codes(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.searchsorted(table, values)


def _zero_runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(zeros before each run of nonzeros, length of that run)`` of a flat array."""
    nz = flat != 0
    if not nz.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    edges = np.diff(np.concatenate(([0], nz.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    prev_end = np.concatenate(([0], ends[:-1]))
    return (starts - prev_end).astype(np.int64), (ends - starts).astype(np.int64)


def pack(matrix: np.ndarray, fmt: str, index_bits: int | None = None, run_bits: int | None = None):
    """``matrix`` (rows, cols) of int8 values in form ``fmt``; widths chosen when None."""
    w = np.asarray(matrix, np.int64)
    if w.ndim != 2:
        raise ExportError(f"packed weights must be a (rows, cols) matrix, got shape {w.shape}")
    if w.size and (w.min() < -128 or w.max() > 127):
        raise ExportError("packed weights must be int8 values")
    rows, cols = w.shape
    flat = w.reshape(-1)
    if fmt == "dense":
        return Packed("dense", rows, cols, np.zeros(0, np.int64))
    if fmt == "codebook":
        table = np.unique(flat) if flat.size else np.zeros(1, np.int64)
        b = _bits_for(len(table))
        stream = pack_bits(_codes(flat, table), np.full(flat.size, b))
        return Packed("codebook", rows, cols, table, b, entries=flat.size, stream=stream)
    nonzero = flat[flat != 0]
    table = np.unique(nonzero) if nonzero.size else np.zeros(1, np.int64)
    b = _bits_for(len(table))
    codes = _codes(nonzero, table)
    if fmt == "relative":
        positions = np.flatnonzero(flat)
        gaps = np.diff(np.concatenate(([-1], positions))) - 1  # zeros before each nonzero
        if index_bits is None:
            index_bits = min(
                range(1, MAX_INDEX_BITS + 1),
                key=lambda ib: (len(gaps) + int((gaps // ((1 << ib) - 1)).sum())) * (ib + b),
            )
        top = (1 << index_bits) - 1
        fillers = gaps // top
        n = len(gaps) + int(fillers.sum())
        fields = np.full(n, top, np.int64)  # fillers: gap field all ones
        carriers = np.cumsum(fillers + 1) - 1
        fields[carriers] = (gaps % top) | (codes << index_bits)
        stream = pack_bits(fields, np.full(n, index_bits + b))
        return Packed("relative", rows, cols, table, b, index_bits, 0, n, stream)
    if fmt == "runs":
        zeros, lengths = _zero_runs(flat)
        if index_bits is None or run_bits is None:
            best = None
            for zb in range(1, MAX_INDEX_BITS + 1):
                for nb in range(1, MAX_RUN_BITS + 1):
                    pairs = _pair_count(zeros, lengths, zb, nb)
                    cost = pairs * (zb + nb)
                    if best is None or cost < best[0]:
                        best = (cost, zb, nb)
            _, index_bits, run_bits = best
        values, widths = _runs_fields(zeros, lengths, codes, index_bits, run_bits, b)
        pairs = _pair_count(zeros, lengths, index_bits, run_bits)
        stream = pack_bits(values, widths)
        return Packed("runs", rows, cols, table, b, index_bits, run_bits, pairs, stream)
    raise ExportError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _pair_count(zeros: np.ndarray, lengths: np.ndarray, zb: int, nb: int) -> int:
    ztop, ntop = (1 << zb) - 1, (1 << nb) - 1
    zero_only = np.maximum(0, -(-zeros // ztop) - 1)
    return int(zero_only.sum() + (-(-lengths // ntop)).sum())


def _runs_fields(zeros, lengths, codes, zb: int, nb: int, b: int):
    ztop, ntop = (1 << zb) - 1, (1 << nb) - 1
    values: list[int] = []
    widths: list[int] = []
    pos = 0
    for z, n in zip(zeros.tolist(), lengths.tolist(), strict=True):
        while z > ztop:
            values += [ztop]  # (ztop zeros, no nonzeros) as one field
            widths += [zb + nb]
            z -= ztop
        while n > 0:
            k = min(n, ntop)
            values.append(z | (k << zb))
            widths.append(zb + nb)
            values += codes[pos : pos + k].tolist()
            widths += [b] * k
            pos += k
            n -= k
            z = 0
    return np.array(values, np.int64), np.array(widths, np.int64)


def unpack(p: Packed) -> np.ndarray:
    """The (rows, cols) int8 matrix that ``p`` stands for (for tests and checks)."""
    if p.format == "dense":
        raise ExportError("a dense layer has no packed form to unpack")
    n = p.rows * p.cols
    out = np.zeros(n, np.int64)
    bits = np.unpackbits(np.frombuffer(p.stream, np.uint8), bitorder="little")
    at = 0

    def take(k: int) -> int:
        nonlocal at
        v = int(sum(int(bits[at + j]) << j for j in range(k)))
        at += k
        return v

    if p.format == "codebook":
        return p.table[unpack_bits(p.stream, np.full(n, p.code_bits))].reshape(p.rows, p.cols)
    pos = 0
    if p.format == "relative":
        top = (1 << p.index_bits) - 1
        for _ in range(p.entries):
            g = take(p.index_bits)
            c = take(p.code_bits)
            if g == top:
                pos += top
                continue
            pos += g
            out[pos] = p.table[c]
            pos += 1
    else:
        for _ in range(p.entries):
            z = take(p.index_bits)
            k = take(p.run_bits)
            pos += z
            for _ in range(k):
                out[pos] = p.table[take(p.code_bits)]
                pos += 1
    return out.reshape(p.rows, p.cols)


def best(matrix: np.ndarray) -> Packed:
    """The smallest form of ``matrix``: ``"dense"`` unless a compressed one is smaller."""
    choice = pack(matrix, "dense")
    flat = np.asarray(matrix).reshape(-1)
    distinct = len(np.unique(flat))
    for fmt in ("codebook", "relative", "runs"):
        if fmt == "codebook" and _bits_for(distinct) >= 8:
            continue  # 8-bit codes plus a table are never smaller than int8
        candidate = pack(matrix, fmt)
        if candidate.nbytes < choice.nbytes:
            choice = candidate
    return choice


def weight_matrix(graph: ir.Graph, op: ir.Op) -> np.ndarray | None:
    """The (rows, cols) weight matrix of a layer that can be packed, else None."""
    if isinstance(op, ir.FullyConnected):
        return graph[op.weight].data
    if isinstance(op, ir.Conv2D) and not op.depthwise:
        w = graph[op.weight].data
        return w.reshape(w.shape[0], -1)
    return None


def choose(graph: ir.Graph, mode: str | dict = "auto") -> dict[int, Packed]:
    """The layers to store compressed: ``{op index: Packed}``.

    ``mode``: ``"auto"`` (each layer's smallest form, and none at all unless they save at
    least :data:`MIN_TOTAL_SAVING` bytes together), ``"off"`` (all dense), or a mapping
    ``{op name or index: format}`` that forces formats (widths still chosen).
    """
    if mode == "off":
        return {}
    chosen: dict[int, Packed] = {}
    if isinstance(mode, dict):
        names = {op.name: i for i, op in enumerate(graph.ops)}
        for key, fmt in mode.items():
            i = names.get(key, key) if isinstance(key, str) else key
            if not isinstance(i, int) or not 0 <= i < len(graph.ops):
                raise ExportError(f"compress: no op {key!r} in {graph.name}")
            m = weight_matrix(graph, graph.ops[i])
            if m is None:
                op = graph.ops[i]
                raise ExportError(
                    f"compress: op {i} ({op.kind} {op.name!r}) has no weights that can be "
                    "packed (conv or fully connected layers only, not depthwise)"
                )
            if fmt != "dense":
                chosen[i] = pack(m, fmt)
        return chosen
    if mode != "auto":
        raise ExportError(
            f"compress_weights must be 'auto', 'off' or a {{layer: format}} map, not {mode!r}"
        )
    for i, op in enumerate(graph.ops):
        m = weight_matrix(graph, op)
        if m is None:
            continue
        p = best(m)
        if p.format != "dense":
            chosen[i] = p
    saved = sum(p.dense_bytes - p.nbytes for p in chosen.values())
    return chosen if saved >= MIN_TOTAL_SAVING else {}


def scratch_bytes(graph: ir.Graph, op: ir.Conv2D) -> int:
    """im2col bytes a packed conv needs (one patch of ``KH*KW*Cin``); 0 for a 1x1 unpadded
    conv, which reads its input pixel directly."""
    if not isinstance(op, ir.Conv2D) or op.depthwise:
        return 0
    w = graph[op.weight].shape
    if w[1] == w[2] == 1 and op.padding == (0, 0, 0, 0):
        return 0
    return int(w[1] * w[2] * w[3])


def summary(graph: ir.Graph, packed: dict[int, Packed]) -> list[str]:
    """One line per conv / fully connected layer: its stored form and bytes."""
    lines = []
    for i, op in enumerate(graph.ops):
        m = weight_matrix(graph, op)
        if m is None:
            continue
        p = packed.get(i)
        text = p.describe() if p is not None else f"dense int8, {m.size:,} B"
        lines.append(f"op {i} {op.kind} {op.name}: {text}")
    return lines
