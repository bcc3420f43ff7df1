"""How one tensor is stored in a ``.slim`` file: ``raw``, ``sparse``, ``shared`` or ``hash``.

Each encoder appends its streams to a :class:`StreamWriter` and returns the tensor's header
record (``docs/format.md``, section 2) and statistics on its streams; :func:`decode_record`
turns a validated record and the file's streams back into tensors. The codec of each coded
stream is chosen here: every codec in ``codecs`` encodes it and the smallest result is kept.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from edgeslim.codec import ans, huffman
from edgeslim.codec.sparse_index import best_index_bits, decode_gaps, encode_gaps
from edgeslim.codec.symbols import entropy_bits, histogram
from edgeslim.core.errors import ContainerError
from edgeslim.core.masks import shared_values
from edgeslim.share.hashed import HASH_TEMP_BYTES, hash_index, hash_sign

CODECS = {  # name -> (encode, decode, payload_offset)
    "huffman": (huffman.encode, huffman.decode, huffman.payload_offset),
    "ans": (ans.encode, ans.decode, ans.payload_offset),
}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CODES_DTYPES = {"uint8": (torch.uint8, 255), "int16": (torch.int16, 32767)}


def itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes, row-major (a uint8 view; little-endian on the hosts we run on)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


def tensor_crc(t: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(t))


def to_scan(flat: torch.Tensor, shape: list[int], order: str) -> torch.Tensor:
    """A row-major flat tensor in scan ``order``: ``row``, or ``col`` (column by column of
    the tensor seen as a ``(shape[0], rest)`` matrix)."""
    if order == "row" or len(shape) < 2:
        return flat
    return flat.reshape(shape[0], -1).T.reshape(-1)


def from_scan(scanned: torch.Tensor, shape: list[int], order: str) -> torch.Tensor:
    """Undo :func:`to_scan`: back to row-major order, flat."""
    if order == "row" or len(shape) < 2:
        return scanned
    return scanned.reshape(-1, shape[0]).T.reshape(-1)


def _nonzero_positions(t: torch.Tensor) -> np.ndarray:
    """Flat positions whose bits are not all zero (so -0.0 counts as nonzero)."""
    raw = tensor_bytes(t).reshape(t.numel(), t.element_size())
    return np.flatnonzero(raw.any(axis=1))


@dataclass
class StreamStat:
    """One coded stream: what it holds and what each codec made of it."""

    tensor: str
    role: str  # "index" or "codes"
    symbols: int
    alphabet: int
    distinct: int
    entropy_bits: float  # n * H of the symbols: the bound for any order-0 coder
    sizes: dict[str, int] = field(default_factory=dict)  # codec -> stream bytes (table incl.)
    payloads: dict[str, int] = field(default_factory=dict)  # codec -> bytes after its table
    codec: str = ""
    bytes: int = 0


class StreamWriter:
    """Collects stream bytes; a stream's id is its position in the file's directory."""

    def __init__(self, start: int = 0) -> None:
        self.start = start
        self.streams: list[bytes] = []

    def add(self, data: bytes) -> int:
        self.streams.append(bytes(data))
        return self.start + len(self.streams) - 1

    def extend(self, other: StreamWriter) -> None:
        if other.start != self.start + len(self.streams):
            raise ValueError("streams must be merged in order")
        self.streams += other.streams

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.streams)


# --------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------


def encode_symbols(
    symbols: np.ndarray,
    alphabet: int,
    codecs: list[str],
    writer: StreamWriter,
    tensor: str,
    role: str,
) -> tuple[dict[str, Any] | None, StreamStat]:
    """Code a symbol stream with each codec, keep the smallest; ``(reference, stats)``."""
    _, counts = histogram(symbols, alphabet)
    stat = StreamStat(tensor, role, int(symbols.size), alphabet, int(counts.size), 0.0)
    if symbols.size == 0:
        return None, stat
    stat.entropy_bits = entropy_bits(counts)
    coded = {name: CODECS[name][0](symbols, alphabet) for name in codecs}
    stat.sizes = {name: len(data) for name, data in coded.items()}
    stat.payloads = {
        name: len(data) - CODECS[name][2](data, symbols.size, alphabet)
        for name, data in coded.items()
    }
    stat.codec = min(codecs, key=lambda name: stat.sizes[name])  # ties: first listed
    stat.bytes = stat.sizes[stat.codec]
    return {"stream": writer.add(coded[stat.codec]), "codec": stat.codec}, stat


def _base(name: str, t: torch.Tensor, layout: str) -> dict[str, Any]:
    if t.dtype not in DTYPE_NAMES:
        raise ContainerError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in a .slim file")
    return {
        "name": name,
        "layout": layout,
        "dtype": DTYPE_NAMES[t.dtype],
        "shape": list(t.shape),
        "crc": tensor_crc(t),
    }


def encode_raw(name: str, t: torch.Tensor, writer: StreamWriter) -> dict[str, Any]:
    """The tensor's bytes as one stream."""
    return {**_base(name, t, "raw"), "stream": writer.add(tensor_bytes(t).tobytes())}


def encode_sparse(
    name: str,
    t: torch.Tensor,
    index_bits: int | str,
    codecs: list[str],
    writer: StreamWriter,
    order: str = "row",
) -> tuple[dict[str, Any], list[StreamStat]]:
    """Positions of the nonzero entries (gap-coded, in scan ``order``) and their raw values."""
    scanned = to_scan(t.detach().reshape(-1), list(t.shape), order).contiguous()
    positions = _nonzero_positions(scanned)
    if index_bits == "auto":
        index_bits = best_index_bits(positions, None, filler_bits=8.0 * t.element_size())
    gaps, carries = encode_gaps(positions, int(index_bits))
    values = torch.zeros(gaps.size, dtype=t.dtype)
    values[torch.from_numpy(np.flatnonzero(carries))] = scanned[positions]
    index, stat = encode_symbols(gaps, 1 << index_bits, codecs, writer, name, "index")
    record = {
        **_base(name, t, "sparse"),
        **({"order": order} if order != "row" else {}),
        "index_bits": int(index_bits),
        "entries": int(gaps.size),
        "index": index,
        "values": writer.add(tensor_bytes(values).tobytes()),
    }
    return record, [stat]


def encode_shared(
    name: str,
    t: torch.Tensor,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    index_bits: int | str,
    codecs: list[str],
    writer: StreamWriter,
    order: str = "row",
) -> tuple[dict[str, Any], list[StreamStat]]:
    """A k-means shared tensor: its centroids, and per nonzero code (in scan ``order``) a gap
    and the code."""
    k = centroids.numel()
    codes_dtype = next((n for n, (dt, top) in CODES_DTYPES.items() if k <= top), None)
    if codes_dtype is None:
        raise ContainerError(f"tensor {name!r}: {k} clusters; a .slim file holds at most 32767")
    codes, centroids = codes.detach().cpu(), centroids.detach().cpu()
    tied = shared_values(codes, centroids).to(t.dtype)
    if not np.array_equal(tensor_bytes(tied), tensor_bytes(t)):
        raise ContainerError(
            f"tensor {name!r} is not equal to its shared values centroids[codes]; call "
            "edgeslim.apply_masks_(model) after training to tie the weights again"
        )
    flat = to_scan(codes.detach().cpu().reshape(-1).long(), list(t.shape), order).numpy()
    positions = np.flatnonzero(flat)
    if index_bits == "auto":
        index_bits = best_index_bits(positions, flat[positions])
    gaps, carries = encode_gaps(positions, int(index_bits))
    symbols = np.zeros(gaps.size, dtype=np.int64)
    symbols[carries] = flat[positions]
    index, index_stat = encode_symbols(gaps, 1 << index_bits, codecs, writer, name, "index")
    code_ref, code_stat = encode_symbols(symbols, k + 1, codecs, writer, name, "codes")
    record = {
        **_base(name, t, "shared"),
        **({"order": order} if order != "row" else {}),
        "clusters": k,
        "codes_dtype": codes_dtype,
        "index_bits": int(index_bits),
        "entries": int(gaps.size),
        "centroids": writer.add(tensor_bytes(centroids.detach().to(t.dtype)).tobytes()),
        "index": index,
        "codes": code_ref,
    }
    return record, [index_stat, code_stat]


def hash_record(name: str, t: torch.Tensor, role: str, buckets: int, seed: int) -> dict[str, Any]:
    """A HashedNets index or sign tensor: regenerated from (shape, buckets, seed)."""
    return {**_base(name, t, "hash"), "role": role, "buckets": buckets, "seed": seed}


# --------------------------------------------------------------------------------------
# decoding (records are validated by the unpacker before they get here)
# --------------------------------------------------------------------------------------


def record_bytes(rec: Any) -> int:
    """Peak bytes decoding a record takes (for the reader's memory budget): the tensors it
    restores plus the temporaries of :func:`decode_record` -- a sparse tensor is scattered
    into a flat buffer and reordered (two dense copies), a shared tensor's codes likewise
    and its values gathered through an int64 index, a hashed index or sign needs the hash's
    chunked working memory, and coded streams their decoder arrays."""
    numel = int(np.prod(rec.shape, dtype=np.int64)) if rec.shape else 1
    dense = numel * itemsize(rec.dtype)
    if rec.layout == "raw":
        return dense
    if rec.layout == "hash":
        return dense + HASH_TEMP_BYTES
    work = 24 * rec.entries  # decoder working arrays: symbols and positions
    if rec.layout == "sparse":
        return 2 * dense + rec.entries * itemsize(rec.dtype) + work
    codes = numel * itemsize(rec.codes_dtype)
    return dense + 2 * codes + 8 * numel + 2 * rec.clusters * itemsize(rec.dtype) + work


def _from_bytes(data: memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    dt = DTYPES[dtype]
    if len(data) == 0:
        return torch.zeros(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(shape)


def decode_symbols(ref: Any, n: int, alphabet: int, streams: list[memoryview]) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return CODECS[ref.codec][1](bytes(streams[ref.stream]), n, alphabet)


def _positions(rec: Any, streams: list[memoryview], numel: int) -> np.ndarray:
    gaps = decode_symbols(rec.index, rec.entries, 1 << rec.index_bits, streams)
    return decode_gaps(gaps, numel)


def decode_record(rec: Any, streams: list[memoryview]) -> dict[str, torch.Tensor]:
    """The tensors one record restores, by name; checks the record's CRC32."""
    shape = list(rec.shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    dt = DTYPES[rec.dtype]
    out: dict[str, torch.Tensor] = {}
    if rec.layout == "raw":
        out[rec.name] = _from_bytes(streams[rec.stream], rec.dtype, shape)
    elif rec.layout == "sparse":
        positions = _positions(rec, streams, numel)
        values = _from_bytes(streams[rec.values], rec.dtype, [rec.entries])
        flat = torch.zeros(numel, dtype=dt)
        flat[torch.from_numpy(positions)] = values
        out[rec.name] = from_scan(flat, shape, rec.order).reshape(shape)
    elif rec.layout == "shared":
        positions = _positions(rec, streams, numel)
        symbols = decode_symbols(rec.codes, rec.entries, rec.clusters + 1, streams)
        carries = symbols != 0
        flat = torch.zeros(numel, dtype=CODES_DTYPES[rec.codes_dtype][0])
        flat[torch.from_numpy(positions[carries])] = torch.from_numpy(symbols[carries]).to(
            flat.dtype
        )
        codes = from_scan(flat, shape, rec.order).reshape(shape)
        centroids = _from_bytes(streams[rec.centroids], rec.dtype, [rec.clusters])
        out[rec.name] = shared_values(codes, centroids)
        out[rec.name + "_codes"] = codes
        out[rec.name + "_centroids"] = centroids
    elif rec.layout == "hash":
        if rec.role == "index":
            out[rec.name] = hash_index(tuple(shape), rec.buckets, rec.seed).to(dt)
        else:
            out[rec.name] = hash_sign(tuple(shape), rec.seed, dt)
    if tensor_crc(out[rec.name]) != rec.crc:
        raise ContainerError("restored tensor does not match its CRC32 (corrupt or hostile)")
    return out


def stats_dict(stats: list[StreamStat]) -> list[dict[str, Any]]:
    return [asdict(s) for s in stats]
