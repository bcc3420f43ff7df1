"""Coders: varints, canonical Huffman, ANS, sparse gap indices -- against scalar references."""

import heapq

import numpy as np
import pytest

from edgeslim import ContainerError
from edgeslim.codec import ans, huffman
from edgeslim.codec.sparse_index import (
    best_index_bits,
    decode_gaps,
    encode_gaps,
    index_cost_bits,
)
from edgeslim.codec.symbols import entropy_bits, read_varints, write_table, write_varints

RNG = np.random.default_rng(0)


def _skewed(n: int, alphabet: int, concentration: float = 0.3) -> np.ndarray:
    p = RNG.dirichlet(np.full(alphabet, concentration))
    return RNG.choice(alphabet, size=n, p=p)


# ------------------------------------------------------------------------------ varints


def test_varints_round_trip_and_reject_truncation():
    values = [0, 1, 127, 128, 300, 2**32, 2**63 - 1]
    data = write_varints(values)
    assert data[:5] == bytes([0, 1, 127, 0x80, 0x01])  # LEB128, low group first
    got, end = read_varints(np.frombuffer(data, np.uint8), 0, len(values), "t")
    assert got.tolist() == values and end == len(data)
    with pytest.raises(ContainerError, match="truncated"):
        read_varints(np.frombuffer(data[:-1], np.uint8), 0, len(values), "t")
    with pytest.raises(ContainerError, match="longer than 9"):
        read_varints(np.frombuffer(b"\x80" * 12 + b"\x01", np.uint8), 0, 1, "t")
    with pytest.raises(ContainerError, match="needs 5 varints"):
        read_varints(np.frombuffer(b"\x01\x02", np.uint8), 0, 5, "t")


# ------------------------------------------------------------------------------ Huffman


def _reference_lengths(counts):
    """Textbook Huffman (heap of (weight, symbols)); returns code lengths."""
    heap = [(c, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = [0] * len(counts)
    while len(heap) > 1:
        c1, s1 = heapq.heappop(heap)
        c2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, s1 + s2))
    return lengths


def _reference_bits(symbols, present, lengths):
    """RFC 1951's canonical code assignment (bl_count / next_code), bit by bit."""
    bl_count = [0] * 17
    for length in lengths:
        bl_count[length] += 1
    next_code, code = [0] * 17, 0
    for bits in range(1, 17):
        code = (code + bl_count[bits - 1]) << 1 if bits > 1 else 0
        next_code[bits] = code
    codes = {}
    for sym, length in sorted(zip(present, lengths, strict=True), key=lambda t: (t[1], t[0])):
        codes[sym] = format(next_code[length], f"0{length}b")
        next_code[length] += 1
    return "".join(codes[s] for s in symbols)


def test_huffman_lengths_are_optimal_on_the_textbook_example():
    counts = np.array([5, 9, 12, 13, 16, 45])  # CLRS figure 16.5: optimal cost 224
    lengths = huffman.code_lengths(counts)
    assert (
        int((lengths * counts).sum())
        == 224
        == sum(c * n for c, n in zip(counts, _reference_lengths(counts.tolist()), strict=True))
    )
    assert lengths.tolist() == [4, 4, 3, 3, 3, 1]


@pytest.mark.parametrize(("n", "alphabet"), [(1000, 33), (4096, 7), (4097, 300), (9000, 2)])
def test_huffman_payload_equals_the_reference_bit_string(n, alphabet):
    symbols = _skewed(n, alphabet)
    data = huffman.encode(symbols, alphabet)
    present = np.unique(symbols)
    buf = np.frombuffer(data, np.uint8)
    m = present.size
    table = write_table(present)
    lengths = buf[len(table) : len(table) + m].tolist()
    counts = np.bincount(symbols)[present]
    assert sum(a * b for a, b in zip(lengths, counts, strict=True)) == sum(
        a * b for a, b in zip(_reference_lengths(counts.tolist()), counts, strict=True)
    )
    ref = _reference_bits(symbols.tolist(), present.tolist(), lengths)
    payload_bits = "".join(format(b, "08b") for b in data[len(data) - (len(ref) + 7) // 8 :])
    assert payload_bits[: len(ref)] == ref and set(payload_bits[len(ref) :]) <= {"0"}


@pytest.mark.parametrize("method", ["doubling", "lockstep"])
@pytest.mark.parametrize(
    ("n", "alphabet", "chunk"), [(1, 4, 4096), (5000, 2, 64), (8192, 40, 4096), (777, 3000, 100)]
)
def test_huffman_round_trip_both_decoders(n, alphabet, chunk, method):
    symbols = _skewed(n, alphabet)
    data = huffman.encode(symbols, alphabet, chunk=chunk)
    assert np.array_equal(huffman.decode(data, n, alphabet, method=method), symbols)


def test_huffman_one_symbol_costs_no_payload_and_long_codes_are_limited():
    data = huffman.encode(np.full(1000, 3), 8)
    assert len(data) == 3  # m, the symbol, length 0
    assert np.array_equal(huffman.decode(data, 1000, 8), np.full(1000, 3))
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])  # Fibonacci counts: unlimited Huffman needs 29 bits
    counts = np.array(fib)
    assert max(_reference_lengths(fib)) == 29
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == 16 and (2.0**-lengths).sum() == 1.0
    symbols = np.repeat(np.arange(30), np.minimum(counts, 3000))
    RNG.shuffle(symbols)
    assert np.array_equal(huffman.decode(huffman.encode(symbols, 30), symbols.size, 30), symbols)


def _with_lengths(data: bytes, m: int, lengths: list[int]) -> bytes:
    table = write_table(np.arange(m))
    return table + bytes(lengths) + data[len(table) + m :]


def test_huffman_rejects_malformed_streams():
    symbols = _skewed(2000, 4, 1.0)
    data = huffman.encode(symbols, 4)
    assert np.unique(symbols).size == 4
    with pytest.raises(ContainerError, match="complete prefix code"):
        huffman.decode(_with_lengths(data, 4, [1, 1, 1, 1]), 2000, 4)
    with pytest.raises(ContainerError, match=r"code lengths must be in \[1, 16\]"):
        huffman.decode(_with_lengths(data, 4, [0, 1, 2, 2]), 2000, 4)
    with pytest.raises(ContainerError, match="symbol table lists 4 symbols; alphabet has 3"):
        huffman.decode(data, 2000, 3)
    with pytest.raises(ContainerError, match="cannot hold"):
        huffman.decode(data, 4100, 4)
    with pytest.raises(ContainerError, match="do not end in the last payload byte"):
        huffman.decode(data + b"\x00", 2000, 4)
    with pytest.raises(ContainerError):
        huffman.decode(data[:-20], 2000, 4)
    chunked = huffman.encode(symbols, 4, chunk=100)
    flipped = bytearray(chunked)
    flipped[-300] ^= 0xFF  # corrupt codes in a middle chunk
    with pytest.raises(ContainerError, match="chunk does not end where the next one starts"):
        huffman.decode(bytes(flipped), 2000, 4)


# ------------------------------------------------------------------------------ ANS


def test_ans_round_trip_within_one_percent_of_the_entropy():
    symbols = _skewed(100_000, 33)
    data = ans.encode(symbols, 33)
    assert np.array_equal(ans.decode(data, symbols.size, 33), symbols)
    bound = entropy_bits(np.bincount(symbols)) / 8
    assert bound < len(data) < 1.01 * bound
    one = ans.encode(np.zeros(50, int), 2)
    assert np.array_equal(ans.decode(one, 50, 2), np.zeros(50))


def test_ans_rejects_malformed_streams():
    symbols = _skewed(3000, 5, 1.0)
    data = ans.encode(symbols, 5)
    with pytest.raises(ContainerError, match="not whole u32 words"):
        ans.decode(data[:-1], 3000, 5)
    with pytest.raises(ContainerError, match="left over"):
        ans.decode(data, 100, 5)
    with pytest.raises(ContainerError, match="cannot decode"):
        ans.decode(data[:-4] + b"\x00\x00\x00\x00", 3000, 5)  # last word zero: invalid
    with pytest.raises(ContainerError, match="one-symbol stream"):
        ans.decode(write_table(np.array([1])) + write_varints([9]) + b"\x01\x00\x00\x00", 9, 5)


# ------------------------------------------------------------------------------ sparse index


def _reference_gaps(positions, bits):
    """The paper's rule written as a loop: gaps of at most 2**bits, filler zeros between."""
    span, gaps, carries, last = 1 << bits, [], [], -1
    for p in positions:
        d = p - last
        while d > span:
            gaps.append(span - 1)
            carries.append(False)
            d -= span
        gaps.append(d - 1)
        carries.append(True)
        last = p
    return gaps, carries


def test_gap_coding_matches_the_paper_rule():
    gaps, carries = encode_gaps(np.array([2, 20]), 3)
    assert gaps.tolist() == [2, 7, 7, 1] and carries.tolist() == [True, False, False, True]
    assert decode_gaps(gaps, 21).tolist() == [2, 10, 18, 20]
    mask = RNG.random(50_000) < 0.03
    mask[1000:9000] = False  # a long run of zeros
    positions = np.flatnonzero(mask)
    for bits in (1, 3, 5, 8):
        gaps, carries = encode_gaps(positions, bits)
        ref_gaps, ref_carries = _reference_gaps(positions.tolist(), bits)
        assert gaps.tolist() == ref_gaps and carries.tolist() == ref_carries
        assert np.array_equal(decode_gaps(gaps, mask.size)[carries], positions)
    with pytest.raises(ContainerError, match="reaches position"):
        decode_gaps(gaps, int(positions[-1]))
    codes = RNG.integers(1, 17, positions.size)
    for filler_bits, codes_or_none in ((32.0, None), (0.0, codes)):
        best = best_index_bits(positions, codes_or_none, filler_bits)
        costs = [index_cost_bits(positions, b, codes_or_none, filler_bits) for b in range(1, 13)]
        assert costs[best - 1] == min(costs)
