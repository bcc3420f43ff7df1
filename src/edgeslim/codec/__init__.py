"""Entropy coding and the ``.slim`` container (byte layout: ``docs/format.md``).

- :mod:`.huffman`: canonical Huffman codes, table-driven vectorised decoder (written here);
- :mod:`.ans`: range ANS through ``constriction``;
- :mod:`.sparse_index`: relative gap indices with filler entries (Deep Compression);
- :mod:`.layout`: how one tensor is stored (raw, sparse, k-means shared, hashed);
- :mod:`.container`: :func:`pack` / :func:`unpack` of a whole model.
"""

from __future__ import annotations

from edgeslim.codec.container import PackConfig, PackReport, pack, read_container, unpack
from edgeslim.core.models.io import register_model_format

register_model_format(".slim", unpack)  # edgeslim.load_model("m.slim")

__all__ = ["PackConfig", "PackReport", "pack", "read_container", "unpack"]
