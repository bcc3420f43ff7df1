"""The ``.slim`` container: a compressed model in one file, reloadable without its class.

The byte layout is specified in ``docs/format.md``; this module follows it section by
section. :func:`pack` writes a model (pruned, k-means shared, hashed or plain), choosing for
every tensor the smallest of its layouts and for every coded stream the smaller of canonical
Huffman and ANS; it then reads the file back and checks every tensor bitwise and the outputs
before it reports success. :func:`unpack` rebuilds the module -- from edgeslim's zoo when the
file names a zoo network, else from the ``torch.export`` graph stored in the file -- after
validating every length, count and offset against the bytes really there and the total size
of what it would allocate against ``max_bytes``.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import lzma
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from edgeslim.codec import layout
from edgeslim.codec.layout import StreamStat, StreamWriter
from edgeslim.core.errors import ContainerError, EdgeslimError
from edgeslim.core.fileio import atomic_path
from edgeslim.core.masks import add_mask_buffers_, iter_shared, remove_masks_
from edgeslim.core.models import zoo
from edgeslim.core.models.storage import MASK_SUFFIX
from edgeslim.core.options import Options, format_validation_error
from edgeslim.core.version import __version__
from edgeslim.share.hashed import HASHED_MODULES

MAGIC = b"\x89SLIM\r\n\x1a"
VERSION = 1
FLAG_ZLIB_HEADER = 1
PREAMBLE = struct.Struct("<8sBBHIII")  # magic, version, flags, reserved, H, N, CRC32
MAX_HEADER_BYTES = 16 << 20
MAX_STREAMS = 1 << 20
MAX_GRAPH_BYTES = 64 << 20
DEFAULT_MAX_BYTES = 1 << 30
MAX_NUMEL = 1 << 31
PAPER_INDEX_BITS = {"conv": 8, "linear": 5}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PackConfig(Options):
    """How :func:`pack` stores a model.

    ``index_bits``: bits per sparse-index gap; one number, ``"auto"`` (the width with the
    smallest entropy, per tensor), or a mapping from tensor/layer names, glob patterns or the
    layer types ``"conv"`` / ``"linear"`` to a number or ``"auto"``. The default is the
    paper's: 8 for convolutions, 5 for the rest. ``codecs``: entropy coders to try per stream
    (the smallest result is kept). ``architecture``: ``"zoo"`` names an edgeslim zoo network
    (smallest), ``"graph"`` embeds the ``torch.export`` graph (any model), ``"auto"`` uses
    ``zoo`` when the model is exactly a zoo network. ``verify`` reads the file back and
    compares tensors and outputs before reporting success.
    """

    model_config = ConfigDict(extra="forbid")

    index_bits: int | Literal["auto"] | dict[str, int | Literal["auto"]] = Field(
        default_factory=lambda: dict(PAPER_INDEX_BITS)
    )
    codecs: list[Literal["huffman", "ans"]] = Field(
        default_factory=lambda: ["huffman", "ans"], min_length=1
    )
    architecture: Literal["auto", "zoo", "graph"] = "auto"
    verify: bool = True


@dataclass
class PackReport:
    """What :func:`pack` wrote: sizes by part, and every tensor's layout and streams."""

    path: Path
    size_bytes: int
    architecture: str
    header_bytes: int
    graph_bytes: int
    tensors: list[dict[str, Any]] = field(default_factory=list)
    streams: list[StreamStat] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "header_bytes": self.header_bytes,
            "graph_bytes": self.graph_bytes,
            "tensors": self.tensors,
            "streams": layout.stats_dict(self.streams),
        }


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
# pack
# --------------------------------------------------------------------------------------


def pack(
    model: nn.Module,
    path: str | os.PathLike,
    cfg: PackConfig | None = None,
    *,
    example: torch.Tensor | None = None,
) -> PackReport:
    """Write ``model`` to ``path`` as a ``.slim`` file (atomically); returns a report.

    ``example`` is an input batch, needed for the graph form and for verification when the
    model has no ``input_shape`` attribute. With ``cfg.verify`` (default) the file is read
    back and every tensor compared bitwise, and the outputs on ``example`` compared, before
    the file is moved into place; a mismatch raises :class:`ContainerError`.
    """
    cfg = cfg or PackConfig()
    path = Path(path)
    example = _example(model, example)
    data, report = encode_model(model, cfg, example)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        if cfg.verify:
            verify(model, tmp, example)
    report.path, report.size_bytes = path, path.stat().st_size
    return report


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor | None:
    if example is not None:
        return example
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, *shape, generator=gen)


def encode_model(
    model: nn.Module, cfg: PackConfig, example: torch.Tensor | None
) -> tuple[bytes, PackReport]:
    """The bytes of the ``.slim`` file for ``model``, and the report (without a path)."""
    writer = StreamWriter()
    arch, state, constants, graph = _architecture(model, cfg, example)
    graph_bytes = 0
    if graph is not None:
        graph_blob = lzma.compress(graph, preset=9 | lzma.PRESET_EXTREME)
        arch["stream"] = writer.add(graph_blob)
        graph_bytes = len(graph_blob)
    kinds = {name: type(m) for name, m in model.named_modules()}
    shared = {
        f"{mname}.{pname}" if mname else pname: (codes, centroids)
        for mname, _, pname, codes, centroids in iter_shared(model)
    }
    hashed = _hash_tensors(model) if graph is not None else {}
    skip = {f"{n}_codes" for n in shared} | {f"{n}_centroids" for n in shared}
    records, stats, rows = [], [], []
    for name, t in [*state.items(), *constants.items()]:
        if name in skip:
            continue
        t = t.detach().cpu()
        bits = _index_bits(cfg.index_bits, name, kinds)
        before = writer.size
        if name in hashed:
            rec, st = layout.hash_record(name, t, *hashed[name]), []
        else:
            rec, st = _smallest(writer, _layouts(name, t, shared.get(name), bits, cfg.codecs))
        if name in constants and name not in state:
            rec["constant"] = True
        if graph is not None and isinstance(state.get(name), nn.Parameter):
            rec["parameter"] = True
        records.append(rec)
        stats += st
        rows.append(_row(rec, t, writer.size - before))
    header = {
        "format": "edgeslim.slim",
        "edgeslim": __version__,
        "architecture": arch,
        "input_shape": _input_shape(model, example),
        "num_classes": getattr(model, "num_classes", None),
        "tensors": records,
    }
    data, header_bytes = _frame(header, writer.streams)
    report = PackReport(Path(), len(data), arch["kind"], header_bytes, graph_bytes, rows, stats)
    return data, report


def _input_shape(model: nn.Module, example: torch.Tensor | None) -> list[int] | None:
    shape = getattr(model, "input_shape", None)
    if shape is None and example is not None:
        shape = example.shape[1:]
    return [int(d) for d in shape] if shape else None


def _row(rec: dict[str, Any], t: torch.Tensor, stream_bytes: int) -> dict[str, Any]:
    return {
        "name": rec["name"],
        "layout": rec["layout"],
        "shape": rec["shape"],
        "numel": t.numel(),
        "nonzero": int(torch.count_nonzero(t)) if t.dtype != torch.bool else int(t.sum()),
        "dense_bytes": t.numel() * t.element_size(),
        "bytes": stream_bytes,
        "index_bits": rec.get("index_bits"),
        "order": rec.get("order", "row") if rec["layout"] in ("sparse", "shared") else None,
    }


def _layouts(
    name: str, t: torch.Tensor, shared: tuple | None, bits: int | str, codecs: list[str]
) -> list[Callable[[StreamWriter], tuple[dict[str, Any], list[StreamStat]]]]:
    """The ways ``t`` can be stored: shared (when it is), else raw and, when it might be
    smaller, sparse; sparse and shared in both scan orders for a tensor of 2+ dims."""
    orders = ["row", "col"] if t.dim() >= 2 else ["row"]
    if shared is not None:
        codes, centroids = shared
        return [
            partial(layout.encode_shared, name, t, codes, centroids, bits, codecs, order=o)
            for o in orders
        ]
    options = [lambda w: (layout.encode_raw(name, t, w), [])]
    nonzero_bytes = int(torch.count_nonzero(t)) * t.element_size()
    if t.is_floating_point() and nonzero_bytes < t.numel() * t.element_size():
        options += [partial(layout.encode_sparse, name, t, bits, codecs, order=o) for o in orders]
    return options


def _smallest(writer: StreamWriter, options) -> tuple[dict[str, Any], list[StreamStat]]:
    """Encode with each option into a scratch writer; keep the smallest (ties: the first)."""
    best = None
    for make in options:
        trial = StreamWriter(start=writer.start + len(writer.streams))
        rec, stats = make(trial)
        if best is None or trial.size < best[0].size:
            best = (trial, rec, stats)
    writer.extend(best[0])
    return best[1], best[2]


def _index_bits(spec: Any, name: str, kinds: dict[str, type]) -> int | str:
    """Index bits for tensor ``name``: a number, ``"auto"``, or looked up by name/type."""
    if not isinstance(spec, dict):
        return spec
    module = name.rpartition(".")[0]
    for key in (name, module):
        if key in spec:
            return spec[key]
    for pattern, value in spec.items():
        if pattern not in PAPER_INDEX_BITS and (
            fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module, pattern)
        ):
            return value
    kind = "conv" if issubclass(kinds.get(module, nn.Module), _CONV) else "linear"
    return spec.get(kind, PAPER_INDEX_BITS[kind])


def _hash_tensors(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Constant name -> (role, buckets, seed) of every hashed layer's index and sign."""
    out = {}
    for mname, m in model.named_modules():
        if type(m).__name__ in HASHED_MODULES:
            for role in ("index", "sign"):
                out[f"{mname}.{role}" if mname else role] = (role, m.num_buckets, m.seed)
    return out


def _frame(header: dict[str, Any], streams: list[bytes]) -> tuple[bytes, int]:
    """Preamble, header, directory and streams (docs/format.md, section 1)."""
    text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    packed = zlib.compress(text, 9)
    flags = FLAG_ZLIB_HEADER if len(packed) < len(text) else 0
    head = packed if flags else text
    directory = b"".join(struct.pack("<II", len(s), zlib.crc32(s)) for s in streams)
    fixed = struct.pack("<8sBBHII", MAGIC, VERSION, flags, 0, len(head), len(streams))
    crc = zlib.crc32(directory, zlib.crc32(head, zlib.crc32(fixed)))
    return fixed + struct.pack("<I", crc) + head + directory + b"".join(streams), len(head)


# --------------------------------------------------------------------------------------
# architecture: a zoo reference or the exported graph
# --------------------------------------------------------------------------------------


def restorable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a ``.slim`` file restores: the state without pruning masks (codes and centroids
    of shared weights included)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}


def _layout_of(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def zoo_architecture(model: nn.Module) -> dict[str, Any] | None:
    """The zoo form of ``model``'s architecture, when it is exactly a zoo network."""
    modules = {
        name: {"class": type(m).__name__, "args": m.slim_args()}
        for name, m in model.named_modules()
        if type(m).__name__ in HASHED_MODULES and name
    }
    state = restorable_state(model)
    want = _layout_of(state)
    kwargs = {"num_classes": model.num_classes} if hasattr(model, "num_classes") else {}
    for name in zoo.names():
        try:
            arch = {"kind": "zoo", "name": name, "kwargs": kwargs, "modules": modules}
            ref = build_zoo(arch, state)
        except (EdgeslimError, TypeError, AttributeError, ValueError):
            continue
        if type(ref) is type(model) and _layout_of(restorable_state(ref)) == want:
            return arch
    return None


def build_zoo(
    arch: dict[str, Any], state: dict[str, torch.Tensor], max_bytes: int = DEFAULT_MAX_BYTES
) -> nn.Module:
    """The zoo network of ``arch`` with its module replacements and sharing tensors added.

    The network is first built on the meta device (no memory) to check that it and its
    replacement modules fit in ``max_bytes`` before anything is allocated.
    """
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
        with torch.device("meta"):
            probe = zoo.create(arch["name"], **arch["kwargs"])
        need = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
        classes = {}
        for path, spec in arch["modules"].items():
            classes[path] = HASHED_MODULES.get(spec["class"])
            if classes[path] is None:
                raise ContainerError(f"unknown module class {spec['class']!r} at {path!r}")
            need += classes[path].build_bytes(spec["args"])
        if need > max_bytes:
            raise ContainerError(
                f"building zoo network {arch['name']!r} as described would allocate {need:,} "
                f"bytes, over the limit of {max_bytes:,}"
            )
        model = zoo.create(arch["name"], **arch["kwargs"])
        for path, spec in arch["modules"].items():
            model.get_submodule(path)  # raises AttributeError when there is no such module
            model.set_submodule(path, classes[path](**spec["args"]))
    add_mask_buffers_(model, state)
    return model


def _architecture(model: nn.Module, cfg: PackConfig, example: torch.Tensor | None):
    """``(architecture, state, constants, graph JSON or None)`` for :func:`encode_model`."""
    if cfg.architecture in ("auto", "zoo"):
        arch = zoo_architecture(model)
        if arch is not None:
            return arch, restorable_state(model), {}, None
        if cfg.architecture == "zoo":
            raise ContainerError(
                f"{type(model).__name__} is not a zoo network (or its layers changed); "
                "use architecture='graph'"
            )
    if example is None:
        raise ContainerError(
            f"packing {type(model).__name__} with its graph needs an example input: pass "
            "example=... (or give the model an 'input_shape' attribute)"
        )
    from torch._export.serde.serialize import serialize

    from edgeslim.core.models.io import export_program

    ep = export_program(_without_masks(model), example)
    art = serialize(
        ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    )
    arch = {"kind": "graph", "stream": 0, "torch": torch.__version__}
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    if len(constants) != len(ep.constants):
        raise ContainerError(f"{type(model).__name__} holds non-tensor constants (script objects)")
    return arch, dict(ep.state_dict), constants, art.exported_program


def _without_masks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode without pruning masks (training state, not part of
    the deployed graph). A graph module (a loaded ``.pt2``) also loses its unused reads of
    them; a model whose forward really uses a mask keeps its masks."""
    stripped = copy.deepcopy(model).eval()
    remove_masks_(stripped)
    if isinstance(stripped, torch.fx.GraphModule):
        graph = stripped.graph
        for node in list(graph.nodes):
            if node.op == "get_attr" and str(node.target).endswith(MASK_SUFFIX):
                if node.users:
                    return copy.deepcopy(model).eval()
                graph.erase_node(node)
        stripped.recompile()
    return stripped


# --------------------------------------------------------------------------------------
# unpack
# --------------------------------------------------------------------------------------


def unpack(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> nn.Module:
    """Rebuild the model in a ``.slim`` file (in eval mode); no Python class is needed.

    Refuses (``ContainerError``) a file that is malformed, corrupt, or would make the
    restored tensors exceed ``max_bytes`` in total.
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
        header, streams = read_container(data, max_bytes=max_bytes)
        tensors = decode_tensors(header, streams)
        model = _build(header, tensors, streams, max_bytes)
    except ContainerError as exc:
        raise ContainerError(f"{path}: {exc}") from None
    return model.eval()


def read_container(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES):
    """Validate the framing and header of a ``.slim`` file: ``(header, streams)``."""
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
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ContainerError(f"header is not valid JSON: {str(exc)[:200]}") from None
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
        numel = int(np.prod(rec.shape, dtype=np.int64)) if rec.shape else 1
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
        total += layout.record_bytes(rec)
    if total > max_bytes:
        raise ContainerError(
            f"restoring it would allocate {total:,} bytes, over the limit of {max_bytes:,} "
            "(pass a larger max_bytes to unpack if the file is trusted)"
        )


def decode_tensors(header: Header, streams: list[memoryview]) -> dict[str, torch.Tensor]:
    """Every tensor the records restore, by name."""
    out: dict[str, torch.Tensor] = {}
    for rec in header.tensors:
        try:
            out.update(layout.decode_record(rec, streams))
        except ContainerError as exc:
            raise ContainerError(f"tensor {rec.name!r}: {exc}") from None
    return out


def _build(header: Header, tensors: dict[str, torch.Tensor], streams, max_bytes: int) -> nn.Module:
    arch = header.architecture
    constant = {r.name for r in header.tensors if r.constant}
    if isinstance(arch, ZooArchitecture):
        spec = arch.model_dump(by_alias=True)
        try:
            model = build_zoo(spec, tensors, max_bytes)
            model.load_state_dict(tensors, strict=True)
        except (
            EdgeslimError,
            TypeError,
            AttributeError,
            ValueError,
            KeyError,
            RuntimeError,
        ) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ContainerError(f"cannot rebuild zoo network {arch.name!r}: {first}") from None
    else:
        model = _build_graph(header, tensors, constant, streams)
    if header.input_shape:
        model.input_shape = tuple(header.input_shape)
    if header.num_classes is not None:
        model.num_classes = header.num_classes
    return model


def _build_graph(header: Header, tensors, constant: set[str], streams) -> nn.Module:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    from edgeslim.core.models.io import module_from_program

    arch = header.architecture
    inflater = lzma.LZMADecompressor()
    try:
        graph = inflater.decompress(bytes(streams[arch.stream]), MAX_GRAPH_BYTES)
    except lzma.LZMAError as exc:
        raise ContainerError(f"graph stream does not decompress: {exc}") from None
    if not inflater.eof:
        raise ContainerError("graph stream is truncated or inflates past 64 MiB")
    params = {r.name for r in header.tensors if r.parameter}
    params |= {r.name + "_centroids" for r in header.tensors if r.layout == "shared"}
    state = {
        k: nn.Parameter(v, requires_grad=v.is_floating_point()) if k in params else v
        for k, v in tensors.items()
        if k not in constant
    }
    consts = {k: v for k, v in tensors.items() if k in constant}
    try:
        ep = deserialize(SerializedArtifact(graph, state, consts, b""))
        return module_from_program(ep)
    except Exception as exc:  # torch's deserializer raises many types; all mean "bad graph"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ContainerError(f"cannot rebuild the model from its graph: {first[:300]}") from None


# --------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------


def verify(model: nn.Module, path: Path, example: torch.Tensor | None) -> None:
    """Read ``path`` back; every tensor must match ``model``'s bitwise, and the outputs."""
    restored = unpack(path)
    mine = restorable_state(model)
    theirs = restored.state_dict()
    for name, t in mine.items():
        other = theirs.get(name)
        if other is None or not np.array_equal(layout.tensor_bytes(other), layout.tensor_bytes(t)):
            raise ContainerError(f"{path}: tensor {name!r} does not read back bitwise equal")
    if example is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            want, got = model(example), restored(example)
        model.train(was_training)
        if not torch.allclose(want, got, rtol=1e-5, atol=1e-6):
            diff = float((want - got).abs().max())
            raise ContainerError(f"{path}: restored model's outputs differ by up to {diff:.3g}")


__all__ = ["PackConfig", "PackReport", "pack", "read_container", "unpack"]
