"""Fuzzing the .slim reader: 10,000 mutated files, each refused cleanly or read correctly.

Half the files are raw byte mutations (the CRCs catch them); the other half mutate the
header's values or a stream's bytes and then recompute every CRC, so the mutation reaches
the validators and the decoders. Every file must give a ContainerError or a model, within
hypothesis' deadline (no hang) and under the reader's own memory limit (``max_bytes``). The
peak memory each case really takes is measured by the readers' fuzzer
(``tests/fuzz_readers.py``, run by ``tests/test_hostile_files.py``), not here.
"""

import json
import struct
import zlib
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgeslim as es
from edgeslim.codec import PackConfig, pack, unpack
from edgeslim.codec.header import PREAMBLE, frame

pytestmark = pytest.mark.slow
FUZZ = settings(
    max_examples=5000,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
LIMIT = 64 << 20  # the reader may allocate at most this much per file
INTERESTING = [0, 1, 2, 3, 7, 8, 255, 256, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32, -1, 2**63]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300")
    es.prune_(model, es.MagnitudePrune(layer_sparsity={"fc1": 0.97, "fc2": 0.9, "fc3": 0.5}))
    es.share_(model, es.KMeansShare(bits={"fc1": 3, "fc2": 5}))
    path = tmp_path_factory.mktemp("fuzz") / "base.slim"
    pack(model, path, PackConfig(index_bits="auto"))
    data = path.read_bytes()
    _, _, flags, _, h, n, _ = PREAMBLE.unpack_from(data)
    head = data[24 : 24 + h]
    header = json.loads(zlib.decompress(head) if flags else head)
    lengths = struct.unpack_from(f"<{2 * n}I", data, 24 + h)[::2]
    offsets = np.concatenate(([0], np.cumsum(lengths))) + 24 + h + 8 * n
    streams = [data[offsets[i] : offsets[i + 1]] for i in range(n)]
    return _Base(data, header, streams, tmp_path_factory.mktemp("cases"))


class _Base(tuple):
    """The valid file and its parts (with a short repr for hypothesis' reports)."""

    def __new__(cls, *parts):
        return super().__new__(cls, parts)

    def __repr__(self) -> str:
        return f"<valid .slim file of {len(self[0])} bytes>"


def _check(data: bytes, where) -> None:
    path = where / "case.slim"
    path.write_bytes(data)
    try:
        model = unpack(path, max_bytes=LIMIT)
    except es.ContainerError:
        return
    assert isinstance(model, torch.nn.Module)


@FUZZ
@given(st.data())
def test_byte_mutations_are_refused_or_harmless(base, data):
    raw = bytearray(base[0])
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del raw[at : at + data.draw(st.integers(1, 16))]
    _check(bytes(raw), base[3])


def _mutate_value(data, value):
    if isinstance(value, bool) or value is None:
        return data.draw(st.sampled_from([True, False, None, 0, "x"]))
    if isinstance(value, int):
        return data.draw(st.sampled_from([*INTERESTING, value + 1, value - 1, value * 2]))
    if isinstance(value, str):
        return data.draw(st.sampled_from(["", "raw", "shared", "ans", "huffman", "zstd", "x" * 9]))
    if isinstance(value, list):
        return data.draw(st.lists(st.sampled_from(INTERESTING), max_size=9))
    return data.draw(st.sampled_from([{}, [], 0]))


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))
    else:
        yield prefix


@FUZZ
@given(st.data())
def test_valid_crc_mutations_reach_the_decoders_and_are_refused(base, data):
    _, header, streams, where = base
    header, streams = json.loads(json.dumps(header)), list(streams)
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):  # a header value
            path = data.draw(st.sampled_from(list(_paths(header))))
            node = header
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = _mutate_value(data, node[path[-1]])
        else:  # a stream's bytes
            i = data.draw(st.integers(0, len(streams) - 1))
            s = bytearray(streams[i])
            if s and data.draw(st.booleans()):
                at = data.draw(st.integers(0, len(s) - 1))
                s[at] = data.draw(st.integers(0, 255))
            else:
                s = s[: data.draw(st.integers(0, len(s)))] + data.draw(st.binary(max_size=8))
            streams[i] = bytes(s)
    try:
        framed = frame(header, streams)[0]
    except (TypeError, ValueError):  # the mutation made the header unserialisable
        return
    _check(framed, where)
