"""Asymmetric numeral systems (range variant) through the ``constriction`` library.

Jarek Duda. "Asymmetric numeral systems: entropy coding combining speed of Huffman coding with
compression rate of arithmetic coding", arXiv:1311.2540, 2013. Implementation: Robert Bamler's
``constriction`` (``constriction.stream.stack.AnsCoder`` with a ``Categorical`` model),
which codes within a few bits of the entropy of the model it is given.

Stream layout (``docs/format.md``, section 4)::

    symbol table | m varint frequencies | payload (u32 little-endian words)

The frequencies are the exact symbol counts (scaled to a total near 2**16 for longer
streams), so the coder's model is the stream's own empirical distribution.
"""

from __future__ import annotations

import constriction
import numpy as np

from edgeslim.codec import symbols as sym
from edgeslim.core.errors import ContainerError

_EXACT_COUNTS_BELOW = 1 << 16


def _model(freqs: np.ndarray):
    probs = freqs.astype(np.float64) / float(freqs.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def frequencies(counts: np.ndarray) -> np.ndarray:
    """The frequencies stored for these symbol counts: exact, or scaled when n >= 2**16."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n < _EXACT_COUNTS_BELOW:
        return counts
    return np.maximum(1, np.rint(counts * (_EXACT_COUNTS_BELOW / n))).astype(np.int64)


def encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """ANS-code ``symbols`` (ints in ``[0, alphabet)``) into a self-describing stream."""
    s = sym.check_symbols(symbols, alphabet)
    if s.size == 0:
        raise ValueError("cannot code an empty symbol stream")
    present, counts = sym.histogram(s, alphabet)
    freqs = frequencies(counts)
    table = sym.write_table(present) + sym.write_varints(freqs)
    if present.size == 1:
        return table
    rank = np.zeros(alphabet, dtype=np.int32)
    rank[present] = np.arange(present.size, dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(rank[s], _model(freqs))
    return table + coder.get_compressed().astype("<u4").tobytes()


def _parse(buf: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Check a stream's header: ``(symbols, frequencies, payload offset)``."""
    what = "ans stream"
    symbols, pos = sym.read_table(buf, alphabet, what)
    freqs, pos = sym.read_varints(buf, pos, symbols.size, what)
    if int(freqs.min()) < 1 or int(freqs.max()) >= 1 << 32:
        raise ContainerError(f"{what}: frequencies must be in [1, 2**32)")
    return symbols, freqs.astype(np.int64), pos


def payload_offset(data: bytes, n: int, alphabet: int) -> int:
    """Bytes of a stream's header (symbol table and frequencies)."""
    return _parse(np.frombuffer(data, dtype=np.uint8), alphabet)[2]


def decode(data: bytes, n: int, alphabet: int) -> np.ndarray:
    """Decode ``n`` symbols (int64) from a stream written by :func:`encode`."""
    what = "ans stream"
    buf = np.frombuffer(data, dtype=np.uint8)
    symbols, freqs, pos = _parse(buf, alphabet)
    payload = buf[pos:]
    if symbols.size == 1:
        if payload.size:
            raise ContainerError(f"{what}: a one-symbol stream must have no payload")
        return np.full(n, symbols[0], dtype=np.int64)
    if payload.size % 4:
        raise ContainerError(f"{what}: payload of {payload.size} bytes is not whole u32 words")
    words = payload.view("<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        ranks = coder.decode(_model(freqs), n)
        finished = coder.is_empty()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise ContainerError(f"{what}: cannot decode ({exc})") from None
    if not finished:
        raise ContainerError(f"{what}: data left over after {n} symbols (corrupt)")
    return symbols[np.asarray(ranks, dtype=np.int64)]
