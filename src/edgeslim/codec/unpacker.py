"""Reading a ``.slim`` file: the attack surface, every length and size checked first.

:func:`unpack` accepts untrusted files. Before anything is decoded or allocated, the
framing's lengths and CRCs are checked against the bytes really there, the header against
its schema, every record's counts and stream sizes against its shape, and the total the
real peak memory decoding the tensors takes (temporaries included) against a budget derived
from the file's size and ``max_bytes`` (:func:`slim_budget`); inflating the header and the
graph is bounded. The graph of a graph-form file passes
:func:`~edgeslim.core.models.safe_program.load_program_json` (a whitelist: no sympy string,
op target or pytree spec torch would evaluate or import) before torch sees it. Every failure
is a :class:`ContainerError`.
"""

from __future__ import annotations

import lzma
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from edgeslim.codec import layout
from edgeslim.codec.architecture import rebuild
from edgeslim.codec.header import (
    DEFAULT_MAX_BYTES,
    FLAG_ZLIB_HEADER,
    MAGIC,
    MAX_GRAPH_BYTES,
    MAX_HEADER_BYTES,
    MAX_NUMEL,
    MAX_STREAMS,
    PREAMBLE,
    VERSION,
    GraphArchitecture,
    Header,
)
from edgeslim.core.errors import CheckpointError, ContainerError
from edgeslim.core.fileio import strict_json_loads
from edgeslim.core.models.safe_program import load_program_json
from edgeslim.core.models.storage import check_shape
from edgeslim.core.options import format_validation_error
from edgeslim.share.hashed import check_buckets

SLIM_MAX_EXPANSION = 1024  # bytes decoding may allocate per byte of file ...
GRAPH_DECODER_LIMIT = MAX_GRAPH_BYTES + (1 << 20)  # a 64 MiB LZMA2 dictionary + its state
SLIM_BUDGET_SLACK = 16 << 20  # ... plus this allowance (all-zero tensors, hashed layers)


def slim_budget(size: int, max_bytes: int) -> int:
    """Bytes reading a ``.slim`` file of ``size`` bytes may allocate: ``SLIM_MAX_EXPANSION``
    times its size plus ``SLIM_BUDGET_SLACK``, and never more than ``max_bytes``."""
    return min(max_bytes, SLIM_MAX_EXPANSION * size + SLIM_BUDGET_SLACK)


def unpack(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> nn.Module:
    """Rebuild the model in a ``.slim`` file (in eval mode); no Python class is needed.

    Refuses (``ContainerError``) a file that is malformed, corrupt, hostile, or whose
    decoding would allocate more than :func:`slim_budget` (at most ``max_bytes``).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes + MAX_HEADER_BYTES + MAX_GRAPH_BYTES + 8 * MAX_STREAMS:
            raise ContainerError(
                f"{path}: {size:,} bytes is more than a file restoring at most {max_bytes:,} "
                "bytes of tensors can hold (pass a larger max_bytes if the file is trusted)"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ContainerError(f"cannot read {path}: {exc}") from exc
    try:
        budget = slim_budget(len(data), max_bytes)
        header, streams = read_container(data, max_bytes=budget)
        arch = header.architecture
        graph = _inflate_graph(streams[arch.stream]) if arch.kind == "graph" else None
        if graph is not None:
            _check_graph(graph)
        charged = decode_bytes(header)
        tensors = decode_tensors(header, streams)
        model = rebuild(header, tensors, graph, max(0, budget - charged))
    except ContainerError as exc:
        raise ContainerError(f"{path}: {exc}") from None
    return model.eval()


def read_container(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[Header, list[memoryview]]:
    """Validate the framing and header of a ``.slim`` file: ``(header, streams)``.

    ``max_bytes`` bounds the peak memory decoding the records takes (:func:`decode_bytes`).
    """
    view = memoryview(data)
    if len(view) < PREAMBLE.size:
        raise ContainerError(f"truncated: {len(view)} bytes, a .slim file has at least 24")
    magic, version, flags, reserved, h, n, crc = PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise ContainerError("not a .slim file (bad magic bytes)")
    if version != VERSION:
        raise ContainerError(f"format version {version} is not supported (this reader: 1)")
    if flags & ~FLAG_ZLIB_HEADER or reserved:
        raise ContainerError(f"unknown flags {flags:#x} or reserved bytes {reserved:#x}")
    if h > MAX_HEADER_BYTES or n > MAX_STREAMS:
        raise ContainerError(f"header of {h} bytes or {n} streams exceeds the format's limits")
    body = PREAMBLE.size + h + 8 * n
    if body > len(view):
        raise ContainerError(
            f"truncated: header and directory need {body} bytes, the file has {len(view)}"
        )
    head, directory = view[PREAMBLE.size : PREAMBLE.size + h], view[PREAMBLE.size + h : body]
    if zlib.crc32(directory, zlib.crc32(head, zlib.crc32(view[:20]))) != crc:
        raise ContainerError("header CRC32 mismatch (corrupt file)")
    table = np.frombuffer(directory, dtype="<u4").reshape(n, 2).astype(np.int64)
    if int(table[:, 0].sum()) != len(view) - body:
        raise ContainerError(
            f"stream lengths add up to {int(table[:, 0].sum())} bytes but "
            f"{len(view) - body} follow the directory (truncated or padded file)"
        )
    offsets = body + np.concatenate(([0], np.cumsum(table[:, 0])))
    streams = [view[offsets[i] : offsets[i + 1]] for i in range(n)]
    for i, s in enumerate(streams):
        if zlib.crc32(s) != int(table[i, 1]):
            raise ContainerError(f"stream {i}: CRC32 mismatch (corrupt file)")
    header = _parse_header(head, flags)
    _check_records(header, streams, max_bytes)
    return header, streams


def _parse_header(head: memoryview, flags: int) -> Header:
    text = bytes(head)
    if flags & FLAG_ZLIB_HEADER:
        inflater = zlib.decompressobj()
        try:
            text = inflater.decompress(text, MAX_HEADER_BYTES)
        except zlib.error as exc:
            raise ContainerError(f"header does not inflate: {exc}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise ContainerError("compressed header is truncated or inflates past 16 MiB")
    try:
        raw = strict_json_loads(text, "header")
    except CheckpointError as exc:
        detail = str(exc).removeprefix("header: invalid JSON: ")
        raise ContainerError(f"header is not valid JSON: {detail[:200]}") from None
    try:
        return Header.model_validate(raw)
    except ValidationError as exc:
        raise ContainerError(f"invalid header:\n{format_validation_error(exc)}") from None
    except RecursionError:
        raise ContainerError("invalid header: nested too deeply") from None


def _check_records(header: Header, streams: list[memoryview], max_bytes: int) -> None:
    """Every record's counts and stream sizes, and the total to allocate, before decoding."""
    names: set[str] = set()
    total = 0
    n = len(streams)

    def stream_len(i: int, what: str) -> int:
        if i >= n:
            raise ContainerError(f"{what} refers to stream {i}; the file has {n}")
        return len(streams[i])

    arch = header.architecture
    if isinstance(arch, GraphArchitecture):
        stream_len(arch.stream, "architecture.stream")
    for rec in header.tensors:
        where = f"tensor {rec.name!r}"
        if rec.name in names:
            raise ContainerError(f"{where} appears twice")
        names.add(rec.name)
        try:
            shape = check_shape(list(rec.shape), "the file", rec.name)
        except CheckpointError as exc:
            raise ContainerError(f"{where}: {str(exc)[:200]}") from None
        numel = math.prod(shape)
        if numel >= MAX_NUMEL:
            raise ContainerError(f"{where}: shape {rec.shape} has more than 2**31 elements")
        size = layout.itemsize(rec.dtype)
        if rec.layout == "raw" and stream_len(rec.stream, where) != numel * size:
            raise ContainerError(f"{where}: raw stream is not {numel} x {size} bytes")
        if rec.layout in ("sparse", "shared"):
            if not rec.dtype.startswith(("float", "bfloat")):
                raise ContainerError(f"{where}: layout {rec.layout} needs a floating dtype")
            if rec.entries > numel:
                raise ContainerError(f"{where}: {rec.entries} entries for {numel} elements")
            refs = [rec.index] + ([rec.codes] if rec.layout == "shared" else [])
            for ref in refs:
                if (ref is None) != (rec.entries == 0):
                    raise ContainerError(f"{where}: coded streams must be given iff entries > 0")
                if ref is not None:
                    stream_len(ref.stream, where)
        if rec.layout == "sparse" and stream_len(rec.values, where) != rec.entries * size:
            raise ContainerError(f"{where}: values stream is not {rec.entries} x {size} bytes")
        if rec.layout == "shared":
            if stream_len(rec.centroids, where) != rec.clusters * size:
                raise ContainerError(f"{where}: centroids stream is not {rec.clusters} values")
            if rec.clusters > layout.CODES_DTYPES[rec.codes_dtype][1]:
                raise ContainerError(f"{where}: {rec.clusters} clusters overflow {rec.codes_dtype}")
        if rec.layout == "hash":
            want = "int64" if rec.role == "index" else "float"
            if not rec.dtype.startswith(want):
                raise ContainerError(f"{where}: hash {rec.role} cannot have dtype {rec.dtype}")
            check_buckets(rec.buckets, numel, where)
        total += layout.record_bytes(rec)
        if total > max_bytes:
            raise ContainerError(
                f"{where}: restoring the tensors up to it would allocate {total:,} bytes, over "
                f"the limit of {max_bytes:,} for this file (at most {SLIM_MAX_EXPANSION}x its "
                "size + 16 MiB, and max_bytes)"
            )


def decode_bytes(header: Header) -> int:
    """Peak bytes decoding every record of ``header`` takes (what the budget charged)."""
    return sum(layout.record_bytes(rec) for rec in header.tensors)


def _check_graph(graph: bytes) -> None:
    """Refuse a graph stream torch would evaluate, import or exec anything from."""
    try:
        load_program_json(graph, "graph stream")
    except CheckpointError as exc:
        raise ContainerError(str(exc)[:400]) from None


def decode_tensors(header: Header, streams: list[memoryview]) -> dict[str, torch.Tensor]:
    """Every tensor the records restore, by name."""
    out: dict[str, torch.Tensor] = {}
    for rec in header.tensors:
        try:
            out.update(layout.decode_record(rec, streams))
        except ContainerError as exc:
            raise ContainerError(f"tensor {rec.name!r}: {exc}") from None
    return out


def _inflate_graph(stream: memoryview) -> bytes:
    """The graph JSON of a graph-form file, inflated to at most 64 MiB.

    The decoder allocates the dictionary the stream declares (up to 4 GiB in LZMA2) before
    it decodes a byte: ``memlimit`` refuses more than a 64 MiB graph can need (the 64 MiB
    dictionary of files written with preset 9 before the dictionary was fitted still loads).
    """
    inflater = lzma.LZMADecompressor(memlimit=GRAPH_DECODER_LIMIT)
    try:
        graph = inflater.decompress(bytes(stream), MAX_GRAPH_BYTES)
    except lzma.LZMAError as exc:
        raise ContainerError(f"graph stream does not decompress: {exc}") from None
    if not inflater.eof:
        raise ContainerError("graph stream is truncated or inflates past 64 MiB")
    return graph
