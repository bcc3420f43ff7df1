"""Entropy coding and the ``.slim`` container (byte layout: ``docs/format.md``).

- :mod:`.huffman`: canonical Huffman codes, table-driven vectorised decoder (written here);
- :mod:`.ans`: range ANS through ``constriction``;
- :mod:`.sparse_index`: relative gap indices with filler entries (Deep Compression);
- :mod:`.layout`: how one tensor is stored (raw, sparse, k-means shared, hashed);
- :mod:`.header`: the file's preamble, header schema, size limits and framing;
- :mod:`.architecture`: how the model's structure is stored and rebuilt (zoo name or graph);
- :mod:`.packer`: :func:`pack` a whole model (encode, write, verify);
- :mod:`.unpacker`: :func:`unpack` a file, every length and size checked before decoding;
- :mod:`.summary`: rich tables of what a ``.slim`` file holds (for the CLI);
"""

from __future__ import annotations

from edgeslim.codec.architecture import restorable_state
from edgeslim.codec.packer import PackConfig, PackReport, pack
from edgeslim.codec.unpacker import read_container, unpack
from edgeslim.core.models.io import register_model_format

register_model_format(".slim", unpack)  # edgeslim.load_model("m.slim")

__all__ = ["PackConfig", "PackReport", "pack", "read_container", "restorable_state", "unpack"]
