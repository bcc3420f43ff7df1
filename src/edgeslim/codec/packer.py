"""Writing a ``.slim`` file: encode a model's tensors, frame them, verify the file.

:func:`pack` writes a model (pruned, k-means shared, hashed or plain), choosing for every
tensor the smallest of its layouts and for every coded stream the smaller of canonical
Huffman and ANS; it then reads the file back and checks every tensor bitwise and the outputs
before it reports success. :func:`encode_model` is the encoder alone (bytes and report).
"""

from __future__ import annotations

import lzma
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from edgeslim.codec import layout
from edgeslim.codec.architecture import describe, restorable_state
from edgeslim.codec.header import frame
from edgeslim.codec.layout import StreamStat, StreamWriter
from edgeslim.codec.unpacker import unpack
from edgeslim.core.errors import ContainerError
from edgeslim.core.fileio import atomic_path
from edgeslim.core.masks import iter_shared
from edgeslim.core.options import Options
from edgeslim.core.selection import matches
from edgeslim.core.version import __version__
from edgeslim.share.hashed import HASHED_MODULES

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
    example = default_example(model, example)
    data, report = encode_model(model, cfg, example)
    return write_encoded(model, path, data, report, example, verify=cfg.verify)


def default_example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor | None:
    """``example``, else a seeded random batch of 2 of ``model.input_shape``, else ``None``."""
    if example is not None:
        return example
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, *shape, generator=gen)


def write_encoded(
    model: nn.Module,
    path: str | os.PathLike,
    data: bytes,
    report: PackReport,
    example: torch.Tensor | None,
    *,
    verify: bool = True,
) -> PackReport:
    """Write ``data`` (from :func:`encode_model` of ``model``) to ``path`` atomically,
    first reading it back against ``model`` when ``verify``; ``report`` gets the path and
    the file's size."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        if verify:
            verify_file(model, tmp, example)
    report.path, report.size_bytes = path, path.stat().st_size
    return report


def graph_filters(size: int) -> list[dict[str, Any]]:
    """LZMA2 at its strongest preset with a dictionary just large enough for ``size`` bytes:
    a reader allocates the dictionary the stream declares (preset 9's 64 MiB for a graph of
    a few KB otherwise), and a dictionary larger than the data compresses no better."""
    dict_size = min(max(1 << (max(size, 1) - 1).bit_length(), 1 << 16), 64 << 20)
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}]


def encode_model(
    model: nn.Module, cfg: PackConfig, example: torch.Tensor | None
) -> tuple[bytes, PackReport]:
    """The bytes of the ``.slim`` file for ``model``, and the report (without a path)."""
    writer = StreamWriter()
    arch, state, constants, graph = describe(model, cfg.architecture, example)
    graph_bytes = 0
    if graph is not None:
        graph_blob = lzma.compress(graph, format=lzma.FORMAT_XZ, filters=graph_filters(len(graph)))
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
    data, header_bytes = frame(header, writer.streams)
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
            matches(name, (pattern,)) or matches(module, (pattern,))
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


def verify_file(model: nn.Module, path: Path, example: torch.Tensor | None) -> None:
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
        want, got = _tensors(want), _tensors(got)
        if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got, strict=True)):
            raise ContainerError(f"{path}: restored model's outputs have other shapes")
        for a, b in zip(want, got, strict=True):
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                diff = float((a - b).abs().max())
                raise ContainerError(f"{path}: restored model's outputs differ by up to {diff:.3g}")


def _tensors(out: object) -> list[torch.Tensor]:
    """Every tensor of a model's output: a tensor, tuple / list, dict or ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []
