"""Sparse positions as relative gaps with filler entries (Han et al. 2016, section 4).

Song Han, Huizi Mao, William J. Dally. "Deep Compression: Compressing Deep Neural Networks
with Pruning, Trained Quantization and Huffman Coding", ICLR 2016.
https://arxiv.org/abs/1510.00149

The nonzero entries of a flattened tensor are stored in order, each with the gap from the
previous one in ``index_bits`` bits. A gap too large for that width is bridged by *filler*
entries that carry a zero. With b index bits an entry's gap symbol g in [0, 2**b) moves
``g + 1`` positions forward, starting from position -1 (``docs/format.md``, section 3).
"""

from __future__ import annotations

import numpy as np

from edgeslim.codec.ans import frequencies
from edgeslim.codec.symbols import entropy_bits, write_table, write_varints
from edgeslim.core.errors import ContainerError

MAX_INDEX_BITS = 16
AUTO_INDEX_BITS = range(1, 13)  # candidates for index_bits="auto"


def encode_gaps(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gap symbols (entries,) and a bool mask of the entries that carry a value.

    ``positions`` are the sorted flat indices of the nonzero entries; the other entries are
    fillers.
    """
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits must be in [1, {MAX_INDEX_BITS}], got {index_bits}")
    positions = np.asarray(positions, dtype=np.int64)
    span = 1 << index_bits
    d = np.diff(np.concatenate(([-1], positions)))  # (nnz,) real gaps, >= 1
    if d.size and int(d.min()) < 1:
        raise ValueError("positions must be strictly increasing and >= 0")
    fillers = (d - 1) // span  # (nnz,) filler entries before each value
    carriers = np.cumsum(fillers + 1) - 1  # (nnz,) entry index of each value
    gaps = np.full(int(carriers[-1]) + 1 if d.size else 0, span - 1, dtype=np.int64)
    gaps[carriers] = (d - 1) % span
    carries = np.zeros(gaps.size, dtype=bool)
    carries[carriers] = True
    return gaps, carries


def decode_gaps(gaps: np.ndarray, numel: int) -> np.ndarray:
    """Positions (entries,) of every entry, fillers included; checks they fit in ``numel``."""
    positions = np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
    if positions.size and int(positions[-1]) >= numel:
        raise ContainerError(
            f"sparse index reaches position {int(positions[-1])} in a tensor of {numel} elements"
        )
    return positions


def index_cost_bits(
    positions: np.ndarray, index_bits: int, codes: np.ndarray | None, filler_bits: float
) -> float:
    """Entropy bound (bits) of the index and value streams for one choice of ``index_bits``.

    ``codes`` are the nonzero entries' shared-weight codes (their stream gains one 0 per
    filler); without codes each filler costs ``filler_bits`` (a raw zero value).
    """
    span = 1 << index_bits
    d = np.diff(np.concatenate(([-1], np.asarray(positions, dtype=np.int64))))
    fillers = int(((d - 1) // span).sum())
    gap_counts = np.bincount((d - 1) % span, minlength=span)
    gap_counts[span - 1] += fillers
    bits = entropy_bits(gap_counts) + table_bits(gap_counts)
    if codes is None:
        return bits + fillers * filler_bits
    code_counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=1)
    code_counts[0] += fillers
    return bits + entropy_bits(code_counts) + table_bits(code_counts)


def table_bits(counts: np.ndarray) -> int:
    """Bits of the symbol table an ANS stream with these symbol counts stores."""
    present = np.flatnonzero(counts)
    return 8 * len(write_table(present) + write_varints(frequencies(counts[present])))


def best_index_bits(
    positions: np.ndarray, codes: np.ndarray | None = None, filler_bits: float = 32.0
) -> int:
    """The index width in :data:`AUTO_INDEX_BITS` with the smallest :func:`index_cost_bits`."""
    costs = {b: index_cost_bits(positions, b, codes, filler_bits) for b in AUTO_INDEX_BITS}
    return min(costs, key=lambda b: (costs[b], b))
