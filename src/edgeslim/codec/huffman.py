"""Canonical Huffman coding with a table-driven, vectorised decoder.

David A. Huffman. "A Method for the Construction of Minimum-Redundancy Codes", Proc. IRE
40(9), 1952. Canonical code assignment as in DEFLATE (RFC 1951, section 3.2.2); code lengths
limited to 16 bits with the JPEG rule (ITU-T T.81, Annex K.3). Used by Han et al. (2016) as
the last step of Deep Compression.

Stream layout (``docs/format.md``, section 4)::

    symbol table | m code lengths (u8) | varint chunk size S | C-1 varint chunk bit lengths
    | payload (codes MSB first)

Encoding places every code with numpy (no per-symbol loop). Decoding builds a lookup table
of ``2**L`` entries (L = longest code) that maps the next L bits to (symbol, length), then
follows the codes in one of two vectorised ways: for small streams it looks up every bit
position at once and finds the codes' start positions by pointer doubling; for large ones it
walks all chunks in lockstep (one numpy step per symbol of a chunk, across all chunks).
"""

from __future__ import annotations

import heapq

import numpy as np

from edgeslim.codec.symbols import (
    ceil_div,
    check_symbols,
    histogram,
    read_table,
    read_varints,
    write_table,
    write_varints,
)
from edgeslim.core.errors import ContainerError

MAX_CODE_LENGTH = 16
DEFAULT_CHUNK = 4096  # symbols per chunk: C = ceil(n / S) chunk offsets are stored
MAX_CHUNK = 1 << 16
_DOUBLING_MAX_BITS = 1 << 22  # decode by pointer doubling up to this many payload bits


# --------------------------------------------------------------------------------------
# code construction
# --------------------------------------------------------------------------------------


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (m,) for symbols with these counts (all > 0), at most ``max_length``.

    One symbol gets length 0 (it needs no bits). Ties are broken by symbol order, so the
    result is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    m = counts.size
    if m == 1:
        return np.zeros(1, dtype=np.int64)
    if m > 1 << max_length:
        raise ValueError(f"{m} symbols do not fit in codes of at most {max_length} bits")
    # build the tree: heap of (count, tie-break, node); leaves are 0..m-1
    heap = [(int(c), i, i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = np.zeros(2 * m - 1, dtype=np.int64)
    next_node = m
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_node
        heapq.heappush(heap, (c1 + c2, next_node, next_node))
        next_node += 1
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for node in range(2 * m - 3, -1, -1):  # parents have larger ids than children
        depth[node] = depth[parent[node]] + 1
    lengths = depth[:m]
    if lengths.max() <= max_length:
        return lengths
    return _limit_lengths(counts, lengths, max_length)


def _limit_lengths(counts: np.ndarray, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Shorten codes longer than ``max_length`` keeping the code complete (JPEG Annex K.3)."""
    bits = np.bincount(lengths, minlength=int(lengths.max()) + 1).tolist()  # symbols per length
    for i in range(len(bits) - 1, max_length, -1):
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2  # two leaves at depth i ...
            bits[i - 1] += 1  # ... one moves up to replace their parent
            bits[j + 1] += 2  # the other joins a leaf at depth j, which moves down
            bits[j] -= 1
    # most frequent symbols get the shortest codes (stable: ties keep symbol order)
    order = np.argsort(-counts, kind="stable")
    new = np.empty_like(lengths)
    new[order] = np.repeat(np.arange(len(bits)), bits)
    return new


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (m,) for these lengths: by (length, symbol), consecutive."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, prev = 0, 0
    for i in np.lexsort((np.arange(lengths.size), lengths)):
        length = int(lengths[i])
        if length == 0:
            continue
        code <<= length - prev
        codes[i] = code
        code += 1
        prev = length
    return codes


# --------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------


def encode(symbols: np.ndarray, alphabet: int, chunk: int = DEFAULT_CHUNK) -> bytes:
    """Huffman-code ``symbols`` (ints in ``[0, alphabet)``) into a self-describing stream."""
    s = check_symbols(symbols, alphabet)
    if s.size == 0:
        raise ValueError("cannot code an empty symbol stream")
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be in [1, {MAX_CHUNK}], got {chunk}")
    present, counts = histogram(s, alphabet)
    lengths = code_lengths(counts)
    table = write_table(present) + lengths.astype(np.uint8).tobytes()
    if present.size == 1:
        return table
    rank = np.zeros(alphabet, dtype=np.int64)
    rank[present] = np.arange(present.size)
    r = rank[s]  # (n,) index into present
    lens = lengths[r]  # (n,) bits per symbol
    codes = canonical_codes(lengths)[r]  # (n,)
    starts = np.cumsum(lens) - lens  # (n,) bit offset of each code
    total = int(starts[-1] + lens[-1])
    n_chunks = ceil_div(s.size, chunk)
    bounds = starts[np.arange(1, n_chunks) * chunk]  # bit offset of chunks 1..C-1
    chunk_bits = np.diff(np.concatenate(([0], bounds)))
    header = table + write_varints([chunk]) + write_varints(chunk_bits)
    return header + _place_codes(codes, lens, starts, total)


def _place_codes(codes: np.ndarray, lens: np.ndarray, starts: np.ndarray, total: int) -> bytes:
    """Write each code (MSB first) at its bit offset; ``ceil(total / 8)`` bytes.

    Codes are at most 16 bits, so each touches one or two big-endian 32-bit words. The
    pieces of different codes never overlap, so a word is the (exact, float64) sum of its
    pieces: one ``bincount`` per word half, no per-symbol loop.
    """
    n_words = ceil_div(total, 32) + 1
    word = starts >> 5  # (n,) 32-bit word holding the code's first bit
    end = (starts & 31) + lens  # (n,) bit just after the code, counted from that word
    high = (codes << np.maximum(0, 32 - end)) >> np.maximum(0, end - 32)  # part in `word`
    spill = end > 32  # (n,) code continues into the next word
    low = (codes[spill] << (64 - end[spill])) & 0xFFFFFFFF
    acc = np.bincount(word, weights=high, minlength=n_words)
    acc += np.bincount(word[spill] + 1, weights=low, minlength=n_words)
    return acc.astype(np.uint32).astype(">u4").tobytes()[: ceil_div(total, 8)]


def stream_bits(symbols: np.ndarray, alphabet: int) -> int:
    """Payload bits (without table) that :func:`encode` would spend on ``symbols``."""
    _, counts = histogram(check_symbols(symbols, alphabet), alphabet)
    return int((code_lengths(counts) * counts).sum())


# --------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------


def _parse(buf: np.ndarray, n: int, alphabet: int):
    """Check a stream's header: ``(symbols, lengths, chunk, chunk starts or None, offset)``.

    ``offset`` is where the payload starts; chunk starts are None for a one-symbol stream.
    """
    what = "huffman stream"
    symbols, pos = read_table(buf, alphabet, what)
    m = symbols.size
    if m > len(buf) - pos:
        raise ContainerError(f"{what}: truncated in its code lengths")
    lengths = buf[pos : pos + m].astype(np.int64)
    pos += m
    if m == 1:
        if lengths[0] != 0 or pos != len(buf):
            raise ContainerError(f"{what}: a one-symbol stream must have length 0 and no payload")
        return symbols, lengths, 0, None, pos
    if lengths.min() < 1 or lengths.max() > MAX_CODE_LENGTH:
        raise ContainerError(f"{what}: code lengths must be in [1, {MAX_CODE_LENGTH}]")
    if int((1 << (MAX_CODE_LENGTH - lengths)).sum()) != 1 << MAX_CODE_LENGTH:
        raise ContainerError(f"{what}: code lengths do not form a complete prefix code")
    (chunk,), pos = read_varints(buf, pos, 1, what)
    chunk = int(chunk)
    if not 1 <= chunk <= MAX_CHUNK:
        raise ContainerError(f"{what}: chunk size {chunk} outside [1, {MAX_CHUNK}]")
    chunk_bits, pos = read_varints(buf, pos, max(0, ceil_div(n, chunk) - 1), what)
    nbits = 8 * (len(buf) - pos)
    if n > nbits:
        raise ContainerError(f"{what}: {len(buf) - pos} payload bytes cannot hold {n} symbols")
    if chunk_bits.size and int(chunk_bits.max()) > nbits:
        raise ContainerError(f"{what}: a chunk is longer than the payload")
    starts = np.concatenate(([0], np.cumsum(chunk_bits.astype(np.int64))))  # (C,)
    if int(starts[-1]) > nbits:
        raise ContainerError(f"{what}: chunk offsets point past the end of the payload")
    return symbols, lengths, chunk, starts, pos


def payload_offset(data: bytes, n: int, alphabet: int) -> int:
    """Bytes of a stream's header (symbol table, code lengths, chunk table)."""
    return _parse(np.frombuffer(data, dtype=np.uint8), n, alphabet)[4]


def decode(data: bytes, n: int, alphabet: int, *, method: str | None = None) -> np.ndarray:
    """Decode ``n`` symbols (int64) from a stream written by :func:`encode`.

    ``method`` forces ``"doubling"`` or ``"lockstep"`` (both give the same result; by
    default the stream's size decides). Raises :class:`ContainerError` on a malformed stream.
    """
    what = "huffman stream"
    buf = np.frombuffer(data, dtype=np.uint8)
    symbols, lengths, chunk, starts, pos = _parse(buf, n, alphabet)
    if starts is None:
        return np.full(n, symbols[0], dtype=np.int64)
    payload = buf[pos:]
    nbits = 8 * payload.size
    n_chunks = starts.size

    peek_bits = int(lengths.max())
    sym_of, len_of = _lookup_tables(lengths, peek_bits)
    padded = np.concatenate((payload, np.zeros(4, dtype=np.uint8))).astype(np.uint32)
    words = padded[:-3] << 24 | padded[1:-2] << 16 | padded[2:-1] << 8 | padded[3:]

    def peek(p: np.ndarray) -> np.ndarray:  # the next `peek_bits` bits at bit offsets p
        return (words[p >> 3] >> (32 - peek_bits - (p & 7)).astype(np.uint32)) & (
            (1 << peek_bits) - 1
        )

    if method is None:
        method = "doubling" if nbits <= _DOUBLING_MAX_BITS else "lockstep"
    steps = min(chunk, n)
    last = n - (n_chunks - 1) * chunk  # symbols in the last chunk
    if method == "doubling":
        ranks, ends, last_end = _walk_doubling(peek, sym_of, len_of, starts, nbits, steps, last)
    elif method == "lockstep":
        ranks, ends, last_end = _walk_lockstep(peek, sym_of, len_of, starts, nbits, steps, last)
    else:
        raise ValueError(f"method must be 'doubling' or 'lockstep', got {method!r}")
    if n_chunks > 1 and not np.array_equal(ends, starts[1:]):
        raise ContainerError(f"{what}: a chunk does not end where the next one starts (corrupt)")
    if not nbits - 8 < last_end <= nbits:
        raise ContainerError(f"{what}: codes do not end in the last payload byte (corrupt)")
    return symbols[ranks.reshape(-1)[:n]]


def _lookup_tables(lengths: np.ndarray, peek_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For each ``peek_bits``-bit value: the rank of the symbol whose code starts it, and
    that code's length."""
    codes = canonical_codes(lengths)
    span = 1 << (peek_bits - lengths)  # table entries per code
    first = codes << (peek_bits - lengths)
    order = np.argsort(first)  # codes are contiguous and cover the table (complete code)
    sym_of = np.repeat(order, span[order])
    len_of = lengths[sym_of]
    return sym_of.astype(np.int64), len_of.astype(np.int64)


def _walk_lockstep(peek, sym_of, len_of, starts, nbits, steps, last):
    """Decode all chunks in parallel, one symbol per chunk per numpy step."""
    pos = starts.copy()  # (C,) bit offset of each chunk's next code
    ranks = np.empty((starts.size, steps), dtype=np.int64)
    last_end = 0
    for t in range(steps):
        k = peek(np.minimum(pos, nbits))
        ranks[:, t] = sym_of[k]
        pos = np.minimum(pos, nbits) + len_of[k]
        if t == last - 1:
            last_end = int(pos[-1])
    return ranks, pos[:-1], last_end


def _walk_doubling(peek, sym_of, len_of, starts, nbits, steps, last):
    """Decode by looking up every bit position, then pointer doubling along the codes."""
    over = nbits + 1  # sink for codes that run past the payload: never a valid end
    every = np.arange(nbits + 2, dtype=np.int64)
    k_all = peek(np.minimum(every, nbits))
    nxt = every + len_of[k_all]  # where the code starting at each position ends
    nxt[nxt > nbits] = over
    nxt[over] = over
    pos = np.empty((starts.size, steps), dtype=np.int64)  # start of each chunk's t-th code
    pos[:, 0] = starts
    jump, filled = nxt, 1  # jump = nxt applied `filled` times
    while filled < steps:
        take = min(filled, steps - filled)
        pos[:, filled : filled + take] = jump[pos[:, :take]]
        filled += take
        if filled < steps:
            jump = jump[jump]
    ends = nxt[pos[:-1, steps - 1]]
    last_end = int(nxt[pos[-1, last - 1]])
    return sym_of[k_all[pos]], ends, last_end
