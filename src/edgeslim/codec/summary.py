"""Rich tables for ``edgeslim pack`` and ``edgeslim unpack``: what a ``.slim`` file holds."""

from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table

from edgeslim.codec.packer import PackReport
from edgeslim.codec.unpacker import read_container
from edgeslim.core.units import human_bytes


def pack_tables(report: PackReport) -> list[Table]:
    """Per tensor (layout, nonzeros, bytes) and per coded stream (Huffman, ANS, entropy)."""
    dense = sum(row["dense_bytes"] for row in report.tensors)
    tensors = Table(
        title=f"{report.path.name}: {report.size_bytes:,} B ({dense / report.size_bytes:.1f}x "
        f"smaller than {dense:,} B of tensors); header {report.header_bytes:,} B, "
        f"graph {report.graph_bytes:,} B"
    )
    for col in ("tensor", "layout", "shape", "nonzero", "index bits", "bytes", "of dense"):
        tensors.add_column(col, justify="left" if col in ("tensor", "layout") else "right")
    for row in report.tensors:
        tensors.add_row(
            row["name"],
            row["layout"],
            "x".join(map(str, row["shape"])) or "scalar",
            f"{row['nonzero']:,}/{row['numel']:,}",
            str(row["index_bits"] or "-"),
            f"{row['bytes']:,}",
            f"{row['bytes'] / max(1, row['dense_bytes']):.1%}",
        )
    streams = Table(title="coded streams (bytes, symbol table included)")
    for col in ("tensor", "stream", "symbols", "distinct", "entropy", "huffman", "ans", "kept"):
        streams.add_column(col, justify="left" if col in ("tensor", "stream", "kept") else "right")
    for st in report.streams:
        if not st.symbols:
            continue
        streams.add_row(
            st.tensor,
            st.role,
            f"{st.symbols:,}",
            str(st.distinct),
            f"{st.entropy_bits / 8:,.0f}",
            f"{st.sizes.get('huffman', 0):,}" if "huffman" in st.sizes else "-",
            f"{st.sizes.get('ans', 0):,}" if "ans" in st.sizes else "-",
            st.codec,
        )
    return [tensors, streams]


def contents_table(path: str | os.PathLike) -> Table:
    """One row per tensor record of a ``.slim`` file: layout, dtype, shape, streams."""
    data = Path(path).read_bytes()
    header, streams = read_container(data)
    arch = header.architecture
    where = f"zoo:{arch.name}" if arch.kind == "zoo" else f"graph (torch {arch.torch})"
    table = Table(title=f"{path}: {len(data):,} B, architecture {where}")
    for col in ("tensor", "layout", "dtype", "shape", "streams", "bytes"):
        table.add_column(col, justify="left" if col in ("tensor", "layout", "streams") else "right")
    for rec in header.tensors:
        ids: list[tuple[str, int]] = []
        if rec.layout == "raw":
            ids = [("raw", rec.stream)]
        elif rec.layout in ("sparse", "shared"):
            refs = [("index", rec.index)] + (
                [("codes", rec.codes)] if rec.layout == "shared" else []
            )
            ids = [(f"{role} {ref.codec}", ref.stream) for role, ref in refs if ref is not None]
            extra = (
                ("values", rec.values) if rec.layout == "sparse" else ("centroids", rec.centroids)
            )
            ids.append(extra)
        table.add_row(
            rec.name,
            rec.layout,
            rec.dtype,
            "x".join(map(str, rec.shape)) or "scalar",
            ", ".join(name for name, _ in ids) or "-",
            human_bytes(sum(len(streams[i]) for _, i in ids)),
        )
    return table
