"""The .slim container: bitwise round trips, a fresh process without the class, hostile files."""

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import edgeslim as es
from edgeslim.codec import PackConfig, pack, restorable_state, unpack
from edgeslim.codec.header import MAGIC, PREAMBLE, frame
from edgeslim.codec.layout import tensor_bytes


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and np.array_equal(tensor_bytes(a[k]), tensor_bytes(b[k]))
        for k in a
    )


def _shared_lenet300() -> nn.Module:
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300")
    es.prune_(model, es.MagnitudePrune(layer_sparsity={"fc1": 0.92, "fc2": 0.9, "fc3": 0.5}))
    es.share_(model, es.KMeansShare(bits=5, bias_bits=4))
    return model.eval()


class Custom(nn.Module):
    """A model whose class a fresh process does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 26 * 26, 3)
        self.input_shape = (1, 28, 28)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.bn(self.conv(x))), 1)) * 0.5


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", es.zoo.names())
def test_every_zoo_model_round_trips_bitwise(name, tmp_path):
    model = es.load_model(f"zoo:{name}").eval()
    report = pack(model, tmp_path / "m.slim")
    assert report.architecture == "zoo"
    restored = unpack(tmp_path / "m.slim")
    assert type(restored) is type(model)
    assert _same(restored.state_dict(), model.state_dict())


def test_shared_model_round_trips_in_both_forms_and_is_small(tmp_path):
    model = _shared_lenet300()
    x = torch.randn(4, 1, 28, 28)
    sizes = {}
    for form in ("zoo", "graph"):
        report = pack(model, tmp_path / f"{form}.slim", PackConfig(architecture=form))
        restored = unpack(tmp_path / f"{form}.slim")
        assert _same(restorable_state(restored), restorable_state(model))
        assert torch.equal(restored(x), model(x))
        sizes[form] = report.size_bytes
        assert report.size_bytes == (tmp_path / f"{form}.slim").stat().st_size
    assert sizes["zoo"] < sizes["graph"] < sizes["zoo"] + 2500  # the graph costs ~1.5 KB
    assert sizes["zoo"] < 4 * 266_610 / 40  # > 40x smaller than fp32 (on untrained weights)
    layouts = {row["name"]: row["layout"] for row in report.tensors}
    assert layouts["fc1.weight"] == layouts["fc1.bias"] == "shared"
    # the restored model is still a shared model: centroid fine-tuning continues
    restored = unpack(tmp_path / "zoo.slim")
    assert isinstance(restored.fc1.weight_centroids, nn.Parameter)


def test_hashed_and_plain_models_round_trip(tmp_path):
    torch.manual_seed(1)
    hashed = es.load_model("zoo:lenet5")
    es.share_(hashed, es.HashShare(ratio=1 / 16))
    custom = Custom().eval()
    es.prune_(custom, es.MagnitudePrune(sparsity=0.95))  # sparse layout, masks not stored
    x = torch.randn(2, 1, 28, 28)
    for model, form in ((hashed, "zoo"), (hashed, "graph"), (custom, "auto")):
        path = tmp_path / f"{type(model).__name__}-{form}.slim"
        report = pack(model, path, PackConfig(architecture=form, index_bits="auto"))
        restored = unpack(path)
        assert torch.equal(restored(x), model.eval()(x))
        assert _same(restorable_state(restored), restorable_state(model))
    assert report.architecture == "graph"
    assert {r["name"]: r["layout"] for r in report.tensors}["head.weight"] == "sparse"
    with pytest.raises(es.ContainerError, match="not a zoo network"):
        pack(custom, tmp_path / "x.slim", PackConfig(architecture="zoo"))


def test_column_structured_sparsity_is_scanned_by_columns(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    with torch.no_grad():  # dead inputs: 80% of the columns are zero, the rest nearly dense
        live = (torch.rand(400) < 0.2) & (torch.rand(64, 400) < 0.9)
        model[0].weight.mul_(live)
    report = pack(
        model, tmp_path / "m.slim", PackConfig(index_bits="auto"), example=torch.randn(2, 400)
    )
    row = next(r for r in report.tensors if r["name"] == "0.weight")
    assert (row["layout"], row["order"]) == ("sparse", "col")
    assert _same(restorable_state(unpack(tmp_path / "m.slim")), restorable_state(model))


def test_fresh_process_restores_the_weights_without_the_class(tmp_path):
    custom = Custom().eval()
    shared = _shared_lenet300()
    pack(custom, tmp_path / "custom.slim")
    pack(shared, tmp_path / "shared.slim")
    x = torch.randn(3, 1, 28, 28)
    for name, model in (("custom", custom), ("shared", shared)):
        want = {k: v.contiguous() for k, v in restorable_state(model).items()}
        save_file({**want, "__out__": model(x).detach(), "__x__": x}, tmp_path / f"{name}.st")
    script = f"""
import sys, numpy as np, torch, edgeslim as es
from safetensors.torch import load_file
for name in ("custom", "shared"):
    # load_file maps the file: its tensors start wherever the header ends (8-byte aligned, not
    # 64), and the float GEMM takes a different path for unaligned input -- clone to compare
    # the model, not the memory allocator (docs/determinism.md)
    want = {{k: v.clone() for k, v in load_file(r"{tmp_path}/" + name + ".st").items()}}
    x, out = want.pop("__x__"), want.pop("__out__")
    model = es.unpack(r"{tmp_path}/" + name + ".slim")
    state = {{k: v for k, v in model.state_dict().items()}}
    assert state.keys() == want.keys(), (name, sorted(state), sorted(want))
    for k in want:
        a, b = (t.contiguous().reshape(-1).view(torch.uint8) for t in (state[k], want[k]))
        assert state[k].dtype == want[k].dtype and torch.equal(a, b), k
    assert torch.equal(model(x), out), name
    print(name, type(model).__name__, "ok")
assert "tests.test_container" not in sys.modules and "test_container" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "custom GraphModule ok" in proc.stdout and "shared LeNet300 ok" in proc.stdout


def test_pack_refuses_untied_shared_weights(tmp_path):
    model = _shared_lenet300()
    with torch.no_grad():
        model.fc2.weight[0, 0] += 1.0  # trained without apply_masks_
    with pytest.raises(es.ContainerError, match=r"'fc2.weight' is not equal to its shared"):
        pack(model, tmp_path / "m.slim")
    assert not (tmp_path / "m.slim").exists()


# ------------------------------------------------------------------------------ hostile files


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid file, its header as data and its streams."""
    path = tmp_path_factory.mktemp("slim") / "good.slim"
    pack(_shared_lenet300(), path)
    data = path.read_bytes()
    _, _, flags, _, h, n, _ = PREAMBLE.unpack_from(data)
    head = data[24 : 24 + h]
    header = json.loads(zlib.decompress(head) if flags else head)
    table = np.frombuffer(data[24 + h : 24 + h + 8 * n], "<u4").reshape(n, 2).astype(np.int64)
    offsets = 24 + h + 8 * n + np.concatenate(([0], np.cumsum(table[:, 0])))
    streams = [data[offsets[i] : offsets[i + 1]] for i in range(n)]
    return data, header, streams


def _frame(header, streams) -> bytes:
    return frame(header, streams)[0]


def _raw_frame(head: bytes, streams, flags: int = 0) -> bytes:
    directory = b"".join(struct.pack("<II", len(s), zlib.crc32(s)) for s in streams)
    fixed = struct.pack("<8sBBHII", MAGIC, 1, flags, 0, len(head), len(streams))
    crc = zlib.crc32(directory, zlib.crc32(head, zlib.crc32(fixed)))
    return fixed + struct.pack("<I", crc) + head + directory + b"".join(streams)


def _edit(good, change):
    _, header, streams = good
    header, streams = json.loads(json.dumps(header)), list(streams)
    change(header, streams)
    return _frame(header, streams)


def _tensor(header, name):
    return next(r for r in header["tensors"] if r["name"] == name)


def _set(name, **fields):
    return lambda h, s: _tensor(h, name).update(fields)


def _poke(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


FRAMING = {
    "empty": (lambda d: b"", "truncated: 0 bytes"),
    "truncated preamble": (lambda d: d[:20], "truncated: 20 bytes"),
    "truncated header": (lambda d: d[:100], "truncated: header and directory need"),
    "truncated stream": (lambda d: d[:-1], "stream lengths add up"),
    "trailing bytes": (lambda d: d + b"\x00", "stream lengths add up"),
    "bad magic": (lambda d: b"\x89SLAM" + d[5:], "bad magic"),
    "version 2": (lambda d: _poke(d, 8, b"\x02"), "format version 2"),
    "unknown flag": (lambda d: _poke(d, 9, b"\x03"), "unknown flags"),
    "header past end": (lambda d: _poke(d, 12, struct.pack("<I", 10**6)), "truncated: header"),
    "huge header": (lambda d: _poke(d, 12, struct.pack("<I", 2**31)), "exceeds the format"),
    "huge stream count": (lambda d: _poke(d, 16, struct.pack("<I", 2**30)), "exceeds the format"),
    "header bit flip": (lambda d: _poke(d, 30, bytes([d[30] ^ 1])), "header CRC32 mismatch"),
    "stream bit flip": (lambda d: d[:-3] + bytes([d[-3] ^ 4]) + d[-2:], r"stream \d+: CRC32"),
}


def test_oversized_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "big.slim"
    with path.open("wb") as f:
        f.truncate(100 << 20)  # a sparse 100 MiB file: refused before it is read
    with pytest.raises(es.ContainerError, match="more than a file restoring at most 1,000 bytes"):
        unpack(path, max_bytes=1000)
    with pytest.raises(es.ContainerError, match="cannot read"):
        unpack(tmp_path / "missing.slim")


@pytest.mark.parametrize("case", FRAMING)
def test_malformed_framing_is_refused(case, good, tmp_path):
    mutate, message = FRAMING[case]
    path = tmp_path / "bad.slim"
    path.write_bytes(mutate(good[0]))
    with pytest.raises(es.ContainerError, match=message):
        unpack(path)


def _garbage_stream(h, s):
    ref = _tensor(h, "fc1.weight")["index"]
    s[ref["stream"]] = bytes(range(256)) * 8


HEADERS = {
    "unknown key": (lambda h, s: h.update(extra=1), "extra: unknown key"),
    "unknown codec": (
        lambda h, s: _tensor(h, "fc1.weight")["codes"].update(codec="zstd"),
        r"codes\.function-after.*codec|codec: Input should be 'huffman' or 'ans'",
    ),
    "unknown layout": (_set("fc2.bias", layout="lz4"), "does not match any of the expected tags"),
    "absurd shape": (_set("fc1.weight", shape=[2**30, 2**30]), "more than 2\\*\\*31 elements"),
    "negative dim": (_set("fc1.weight", shape=[-1, 784]), "greater than or equal to 0"),
    "budget": (_set("fc1.weight", shape=[20000, 20000]), "allocate .* over the limit"),
    "entries > numel": (_set("fc3.weight", entries=10**6), "entries for 1000 elements"),
    "stream out of range": (_set("fc2.bias", centroids=999), "refers to stream 999"),
    "raw length": (
        lambda h, s: h["tensors"].append(
            {"name": "x", "layout": "raw", "dtype": "float32", "shape": [7], "crc": 0, "stream": 0}
        ),
        r"raw stream is not 7 x 4 bytes",
    ),
    "duplicate name": (lambda h, s: h["tensors"].append(h["tensors"][0]), "appears twice"),
    "wrong crc": (_set("fc2.weight", crc=1), "fc2.weight.*does not match its CRC32"),
    "index past the end": (_set("fc2.weight", shape=[11, 300]), "reaches position 29"),
    "garbage coded stream": (_garbage_stream, "fc1.weight"),
    "codes dtype": (_set("fc1.weight", clusters=4000), "clusters overflow uint8|centroids"),
    "unknown module": (
        lambda h, s: h["architecture"]["modules"].update({"fc1": {"class": "Evil", "args": {}}}),
        "unknown module class 'Evil'",
    ),
    "unknown zoo name": (lambda h, s: h["architecture"].update(name="alexnet"), "alexnet"),
    "huge zoo kwargs": (
        lambda h, s: h["architecture"].update(kwargs={"num_classes": 10**9}),
        "would allocate .* over the limit",
    ),
    "huge hashed layer": (
        lambda h, s: h["architecture"]["modules"].update(
            {
                "fc1": {
                    "class": "HashedLinear",
                    "args": {
                        "in_features": 10**6,
                        "out_features": 10**6,
                        "buckets": 8,
                        "bias": True,
                        "seed": 0,
                    },
                }
            }
        ),
        "would allocate .* over the limit",
    ),
    "bad zoo kwargs": (
        lambda h, s: h["architecture"].update(kwargs={"widht": 2}),
        "cannot rebuild zoo network 'lenet300'.*widht",
    ),
    "bad graph": (
        lambda h, s: (
            s.append(b"not xz"),
            h.update(architecture={"kind": "graph", "stream": len(s) - 1, "torch": "x"}),
        ),
        "graph stream does not decompress",
    ),
}


@pytest.mark.parametrize("case", HEADERS)
def test_malformed_headers_and_streams_are_refused(case, good, tmp_path):
    change, message = HEADERS[case]
    path = tmp_path / "bad.slim"
    path.write_bytes(_edit(good, change))
    with pytest.raises(es.ContainerError, match=message):
        unpack(path)


@pytest.mark.parametrize(
    ("head", "flags", "message"),
    [
        (b"\xff\xfe", 0, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 0, "not valid JSON|nested too deeply|invalid header"),
        (zlib.compress(b" " * (20 << 20)), 1, "inflates past 16 MiB"),
        (b"not deflate", 1, "does not inflate"),
        (b'{"format": "edgeslim.slim"}', 0, "required key is missing"),
    ],
)
def test_malformed_header_bytes_are_refused(head, flags, message, good, tmp_path):
    path = tmp_path / "bad.slim"
    path.write_bytes(_raw_frame(head, good[2], flags))
    with pytest.raises(es.ContainerError, match=message):
        unpack(path)


def test_cli_pack_unpack(tmp_path, capsys, monkeypatch):
    from edgeslim.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "m.slim"
    assert main(["pack", "zoo:lenet300", str(out), "--index-bits", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "fc2.weight" in printed and f"wrote {out}" in printed
    assert main(["unpack", str(out)]) == 0
    assert "architecture zoo:lenet300" in capsys.readouterr().out
    (tmp_path / "bad.slim").write_bytes(b"GIF89a" + bytes(30))
    assert main(["unpack", str(tmp_path / "bad.slim")]) == 2
    assert "not a .slim file" in capsys.readouterr().err
    assert main(["pack", "zoo:lenet300", str(out), "--index-bits", "conv=9,linear=x"]) == 2
    assert "--index-bits must be" in capsys.readouterr().err
