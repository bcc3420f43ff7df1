"""The ``.slim`` framing: preamble, header schema, size limits (``docs/format.md`` 1-2).

A file is a fixed preamble (magic, version, flags, header length ``H``, stream count ``N``,
CRC32), the JSON header (zlib-deflated when that is smaller), a directory of ``N``
(length, CRC32) pairs, and the streams. :func:`frame` assembles one; the pydantic models
here are the header's schema, which the reader validates every header against.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.codec import layout

MAGIC = b"\x89SLIM\r\n\x1a"
VERSION = 1
FLAG_ZLIB_HEADER = 1
PREAMBLE = struct.Struct("<8sBBHIII")  # magic, version, flags, reserved, H, N, CRC32
MAX_HEADER_BYTES = 16 << 20
MAX_STREAMS = 1 << 20
MAX_GRAPH_BYTES = 64 << 20
DEFAULT_MAX_BYTES = 1 << 30
MAX_NUMEL = 1 << 31


# --------------------------------------------------------------------------------------
# header schema (docs/format.md, section 2)
# --------------------------------------------------------------------------------------

_Dtype = Literal[tuple(layout.DTYPES)]  # type: ignore[valid-type]
_U32 = Annotated[int, Field(ge=0, lt=1 << 32)]
_Stream = Annotated[int, Field(ge=0, lt=MAX_STREAMS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CodedRef(_Strict):
    stream: _Stream
    codec: Literal["huffman", "ans"]


class _Record(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=4096)]
    dtype: _Dtype
    shape: Annotated[list[Annotated[int, Field(ge=0, lt=MAX_NUMEL)]], Field(max_length=8)]
    crc: _U32
    constant: bool = False
    parameter: bool = False


class RawRecord(_Record):
    layout: Literal["raw"]
    stream: _Stream


class SparseRecord(_Record):
    layout: Literal["sparse"]
    order: Literal["row", "col"] = "row"
    index_bits: Annotated[int, Field(ge=1, le=16)]
    entries: Annotated[int, Field(ge=0, lt=MAX_NUMEL)]
    index: CodedRef | None
    values: _Stream


class SharedRecord(_Record):
    layout: Literal["shared"]
    order: Literal["row", "col"] = "row"
    clusters: Annotated[int, Field(ge=1, le=32767)]
    codes_dtype: Literal["uint8", "int16"]
    index_bits: Annotated[int, Field(ge=1, le=16)]
    entries: Annotated[int, Field(ge=0, lt=MAX_NUMEL)]
    centroids: _Stream
    index: CodedRef | None
    codes: CodedRef | None


class HashRecord(_Record):
    layout: Literal["hash"]
    role: Literal["index", "sign"]
    buckets: Annotated[int, Field(ge=1, lt=MAX_NUMEL)]
    seed: _U32


Record = Annotated[
    RawRecord | SparseRecord | SharedRecord | HashRecord, Field(discriminator="layout")
]


class ModuleSpec(_Strict):
    class_: str = Field(alias="class")
    args: dict[str, Any]


class ZooArchitecture(_Strict):
    kind: Literal["zoo"]
    name: str
    kwargs: dict[str, Any]
    modules: dict[str, ModuleSpec]


class GraphArchitecture(_Strict):
    kind: Literal["graph"]
    stream: _Stream
    torch: str


class Header(_Strict):
    format: Literal["edgeslim.slim"]
    edgeslim: str
    architecture: Annotated[ZooArchitecture | GraphArchitecture, Field(discriminator="kind")]
    input_shape: list[Annotated[int, Field(ge=1, lt=MAX_NUMEL)]] | None
    num_classes: Annotated[int, Field(ge=1)] | None
    tensors: Annotated[list[Record], Field(max_length=MAX_STREAMS)]


# --------------------------------------------------------------------------------------
# framing (docs/format.md, section 1)
# --------------------------------------------------------------------------------------


def frame(header: dict[str, Any], streams: list[bytes]) -> tuple[bytes, int]:
    """Preamble, header, directory and streams: the file's bytes, and the header's length."""
    text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    packed = zlib.compress(text, 9)
    flags = FLAG_ZLIB_HEADER if len(packed) < len(text) else 0
    head = packed if flags else text
    directory = b"".join(struct.pack("<II", len(s), zlib.crc32(s)) for s in streams)
    fixed = struct.pack("<8sBBHII", MAGIC, VERSION, flags, 0, len(head), len(streams))
    crc = zlib.crc32(directory, zlib.crc32(head, zlib.crc32(fixed)))
    return fixed + struct.pack("<I", crc) + head + directory + b"".join(streams), len(head)
