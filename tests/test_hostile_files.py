"""Hostile files: proof-of-concept attacks on the readers, and a fuzzer.

Every file is built here (no binary fixtures) and loaded in a fresh subprocess, which
reports the exception and the load's own peak memory (``memprobe.Peak``: tracemalloc for
Python and numpy, the per-case resident high-water mark for torch, an address-space cap at
the budget). Each attack must be refused with an ``EdgeslimError``, leave no marker file
(no code ran) and stay under ``2 x the tensor bytes the file holds + 64 MB``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

import edgeslim as es
from edgeslim.core.errors import CheckpointError

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
MB = 1 << 20

# Runs in a fresh interpreter: loads argv[2] with loader argv[1] under a memory budget of
# argv[3] bytes (memprobe.Peak: this load's own peak, traced and resident), prints one line.
_CHILD = r"""
import json, sys
from pathlib import Path
import edgeslim
from edgeslim.core.errors import EdgeslimError
from edgeslim.core.models import hf, storage
from memprobe import Peak

kind, path, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
loaders = {
    "pt2": lambda p: edgeslim.load_model(p),
    "weights": lambda p: storage.load_weights(p),
    "hf": lambda p: hf._read(Path(p).parent),
    "slim": lambda p: edgeslim.unpack(p),
}
result = {"error": None, "edgeslim": False, "message": ""}
try:
    with Peak(budget) as peak:
        loaders[kind](path)
except EdgeslimError as exc:
    result.update(error=type(exc).__name__, edgeslim=True, message=str(exc)[:300])
    peak.note(exc)
except BaseException as exc:
    result.update(error=type(exc).__name__, message=str(exc)[:300])
result.update(peak=peak.bytes, traced=peak.traced, resident=peak.resident, over=peak.over)
print(json.dumps(result))
"""


def _env() -> dict:
    path = os.pathsep.join([str(SRC), str(HERE)])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def load_isolated(kind: str, path: Path, budget: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(path), str(budget)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=path.parent,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_refused(kind: str, path: Path, marker: Path, tensor_bytes: int) -> dict:
    out = load_isolated(kind, path, budget=2 * tensor_bytes + 64 * MB)
    assert not marker.exists(), f"{path.name}: the planted code ran"
    assert out["edgeslim"], f"{path.name}: {out['error']}: {out['message']}"
    assert not out["over"], f"{path.name}: over 2 x {tensor_bytes} bytes + 64 MB: {out}"
    return out


# --------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------


class _Plant:
    """Unpickling this runs code that writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def valid_pt2(tmp_path: Path) -> Path:
    """A legitimate .pt2 with a dynamic batch dimension (so it holds a shape symbol)."""
    return es.save_model(_tiny_model(), tmp_path / "ok.pt2", torch.zeros(2, 8))


def rezip(src: Path, dst: Path, change=None, add=None) -> Path:
    """Copy a .pt2 member by member (stored, like torch writes), replacing member bytes
    through ``change(name, data) -> data`` and appending ``add`` members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, change(item.filename, data) if change else data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def _edit_json(member: str, edit):
    def change(name: str, data: bytes) -> bytes:
        if not name.endswith(member):
            return data
        obj = json.loads(data)
        edit(obj)
        return json.dumps(obj).encode()

    return change


def _sparse_file(path: Path, shapes_json: str, values=(1.0,), bitmap=(0x80,)) -> Path:
    tensors = {
        "w::values": torch.tensor(values, dtype=torch.float32),
        "w::bitmap": torch.tensor(bitmap, dtype=torch.uint8),
    }
    path.write_bytes(st_save(tensors, metadata={"format": "sparse", "shapes": shapes_json}))
    return path


# --------------------------------------------------------------------------------------
# proof-of-concept attacks
# --------------------------------------------------------------------------------------


def legacy_pt2(tmp_path: Path, marker: Path, ok: Path | None = None) -> Path:
    """The torch 2.7 layout (everything at the root) with pickles that write ``marker``."""
    from torch._export.serde.schema import SCHEMA_VERSION

    ok = ok or valid_pt2(tmp_path)
    with zipfile.ZipFile(ok) as zf:
        program = zf.read(next(n for n in zf.namelist() if n.endswith("models/model.json")))
    evil = pickle.dumps(_Plant(marker))
    path = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        zf.writestr("serialized_exported_program.json", program)
        for name in ("state_dict", "constants", "example_inputs"):
            zf.writestr(f"serialized_{name}.pt", evil)
    return path


def test_legacy_layout_pt2_with_root_pickles_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    path = legacy_pt2(tmp_path, marker)
    out = assert_refused("pt2", path, marker, tensor_bytes=path.stat().st_size)
    assert "legacy" in out["message"] and "legacy.pt2" in out["message"]


def test_pt2_with_a_legacy_weights_pickle_in_its_folder_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    ok = valid_pt2(tmp_path)
    prefix = zipfile.ZipFile(ok).namelist()[0].split("/")[0]
    buf = io.BytesIO()
    torch.save({"w": _Plant(marker)}, buf)
    path = rezip(
        ok, tmp_path / "legacyw.pt2", add={f"{prefix}/data/weights/model.pt": buf.getvalue()}
    )
    out = assert_refused("pt2", path, marker, tensor_bytes=len(buf.getvalue()))
    assert "data/weights/model.pt" in out["message"]


def _sympy_payload(text: str, marker: Path) -> str:
    """``text`` with every shape symbol replaced by an expression that writes ``marker``."""
    import re

    payload = f"(__import__('pathlib').Path({str(marker)!r}).write_text('ran'), \\1)[1]"
    assert '"expr_str": "Symbol(' in text  # the payload goes where torch sympifies
    return re.sub(
        r'"expr_str": "(Symbol\([^"]*\))"',
        lambda m: '"expr_str": "' + payload.replace("\\1", m.group(1)) + '"',
        text,
    )


def sympy_pt2(tmp_path: Path, marker: Path, ok: Path | None = None) -> Path:
    ok = ok or valid_pt2(tmp_path)

    def change(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        return _sympy_payload(data.decode(), marker).encode()

    return rezip(ok, tmp_path / "sympy.pt2", change)


def test_pt2_with_a_sympy_payload_in_a_shape_expression_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    path = sympy_pt2(tmp_path, marker)
    out = assert_refused("pt2", path, marker, tensor_bytes=path.stat().st_size)
    assert "expr_str" in out["message"] and "sympy.pt2" in out["message"]


@pytest.mark.parametrize(
    "target",
    [
        "torch.os.system",
        "torch.ops.load_library",
        "builtins.exec",
        "#custom.op",
        "torch.ops.aten.__class__.x",
    ],
)
def test_pt2_with_a_non_operator_node_target_is_refused(tmp_path, target):
    ok = valid_pt2(tmp_path)

    def edit(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    path = rezip(ok, tmp_path / "target.pt2", _edit_json("models/model.json", edit))
    out = assert_refused("pt2", path, tmp_path / "MARKER", tensor_bytes=ok.stat().st_size)
    assert "node target" in out["message"]


def test_pt2_with_an_importing_pytree_spec_is_refused(tmp_path):
    ok = valid_pt2(tmp_path)
    enum = json.dumps([{"__enum__": True, "fqn": "antigravity:x", "name": "y"}])
    spec = json.dumps([1, {"type": "builtins.dict", "context": enum, "children_spec": []}])

    def edit(program):
        program["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = spec

    path = rezip(ok, tmp_path / "spec.pt2", _edit_json("models/model.json", edit))
    out = assert_refused("pt2", path, tmp_path / "MARKER", tensor_bytes=ok.stat().st_size)
    assert "in_spec" in out["message"]


def _spec(node_type: str) -> str:
    return json.dumps([1, {"type": node_type, "context": "[]", "children_spec": []}])


SWIN = "transformers.models.swin.modeling_swin"


@pytest.mark.parametrize(
    "node_type",
    [
        "os.system",
        "builtins.eval",
        f"{SWIN}.SwinModel",  # a transformers class, not a ModelOutput
        f"{SWIN}.ModelOutput",  # the base class, imported there but defined elsewhere
        f"{SWIN}.torch",
        f"{SWIN}.SwinImageClassifierOutput.__init__",
        "transformers.models.swin.modeling_bert.BertModel",  # module of another package
        "transformers.models.antigravity.modeling_antigravity.XOutput",  # no such model
        "transformers.models.swin.modeling_swin_x.SwinImageClassifierOutput",
        "transformers.utils.ModelOutput",
        "transformers.trainer.TrainerState",
    ],
)
def test_pytree_spec_naming_anything_but_a_model_output_is_refused(node_type):
    pytest.importorskip("transformers")
    from edgeslim.core.models.safe_program import check_treespec

    with pytest.raises(CheckpointError, match=r"pytree node type .* is not allowed"):
        check_treespec(_spec(node_type), "m.slim: out_spec")


@pytest.mark.parametrize(
    "node_type",
    [
        f"{SWIN}.SwinImageClassifierOutput",
        "transformers.modeling_outputs.ImageClassifierOutput",
        "transformers.models.gpt2.modeling_gpt2.GPT2DoubleHeadsModelOutput",
    ],
)
def test_pytree_spec_naming_a_transformers_model_output_is_allowed(node_type):
    pytest.importorskip("transformers")
    from edgeslim.core.models.safe_program import check_treespec

    check_treespec(_spec(node_type), "m.slim: out_spec")


def test_pt2_whose_out_spec_names_a_non_output_transformers_class_is_refused(tmp_path):
    pytest.importorskip("transformers")
    ok = valid_pt2(tmp_path)

    def edit(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["out_spec"] = _spec(f"{SWIN}.SwinModel")

    path = rezip(ok, tmp_path / "out.pt2", _edit_json("models/model.json", edit))
    out = assert_refused("pt2", path, tmp_path / "MARKER", tensor_bytes=ok.stat().st_size)
    assert "out_spec" in out["message"] and "SwinModel" in out["message"]


def test_pt2_with_an_empty_record_of_a_huge_declared_shape_is_refused(tmp_path):
    ok = valid_pt2(tmp_path)

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("data/weights/weight_0"):
            return b""
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            entry = next(e for e in cfg["config"].values() if e["path_name"] == "weight_0")
            entry["tensor_meta"]["sizes"] = [{"as_int": 60_000}, {"as_int": 60_000}]
            return json.dumps(cfg).encode()
        return data

    path = rezip(ok, tmp_path / "zeros.pt2", change)
    out = assert_refused("pt2", path, tmp_path / "MARKER", tensor_bytes=ok.stat().st_size)
    assert "weight" in out["message"]


def test_five_byte_sparse_payload_with_huge_shape_is_refused(tmp_path):
    path = _sparse_file(tmp_path / "huge.safetensors", json.dumps({"w": [40_000_000]}))
    out = assert_refused("weights", path, tmp_path / "MARKER", tensor_bytes=5)
    assert "'w'" in out["message"] and "huge.safetensors" in out["message"]


@pytest.mark.parametrize("shape", [[-8], [-2, -4], [2.5], [True], "8", [[8]]])
def test_sparse_payload_with_bad_dimensions_is_refused(tmp_path, shape):
    path = _sparse_file(tmp_path / "neg.safetensors", json.dumps({"w": shape}))
    out = assert_refused("weights", path, tmp_path / "MARKER", tensor_bytes=5)
    assert "'w'" in out["message"]


@pytest.mark.parametrize(
    "shapes_json",
    ['{"w": [1' + "0" * 5000 + "]}", '{"w": [Infinity]}', '{"w": [NaN]}', '{"w": [1e999]}'],
    ids=["huge-int", "infinity", "nan", "overflow"],
)
def test_hostile_json_numbers_in_sparse_metadata_are_refused(tmp_path, shapes_json):
    path = _sparse_file(tmp_path / "num.safetensors", shapes_json)
    out = assert_refused("weights", path, tmp_path / "MARKER", tensor_bytes=5)
    assert "num.safetensors" in out["message"]


@pytest.mark.parametrize(
    "meta_json",
    ['{"shapes": {"w": [1' + "0" * 5000 + ']}, "quantized": {}}', '{"shapes": {"w": [-8]}}'],
    ids=["huge-int", "negative"],
)
def test_hostile_hf_shard_metadata_is_refused(tmp_path, meta_json):
    tensors = {
        "w::values": torch.tensor([1.0]),
        "w::bitmap": torch.tensor([0x80], dtype=torch.uint8),
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(st_save(tensors, metadata={"format": "pt", "edgeslim": meta_json}))
    assert_refused("hf", path, tmp_path / "MARKER", tensor_bytes=5)


# ------------------------------------------------------------------------------ .slim files


def _slim_parts(path: Path) -> tuple[dict, list[bytes]]:
    """The header (as data) and the streams of a ``.slim`` file."""
    import zlib

    import numpy as np

    from edgeslim.codec.header import PREAMBLE

    data = path.read_bytes()
    _, _, flags, _, h, n, _ = PREAMBLE.unpack_from(data)
    head = data[24 : 24 + h]
    header = json.loads(zlib.decompress(head) if flags else head)
    table = np.frombuffer(data[24 + h : 24 + h + 8 * n], "<u4").reshape(n, 2).astype(np.int64)
    offsets = 24 + h + 8 * n + np.concatenate(([0], np.cumsum(table[:, 0])))
    return header, [data[offsets[i] : offsets[i + 1]] for i in range(n)]


def _slim_file(path: Path, header: dict, streams: list[bytes]) -> Path:
    from edgeslim.codec.header import frame

    path.write_bytes(frame(header, streams)[0])
    return path


def graph_slim(tmp_path: Path) -> Path:
    """A legitimate graph-form .slim of a tiny model."""
    from edgeslim.codec import PackConfig, pack

    path = tmp_path / "graph.slim"
    pack(_tiny_model(), path, PackConfig(architecture="graph"), example=torch.zeros(2, 8))
    return path


def zoo_slim(tmp_path: Path) -> Path:
    """A legitimate zoo-form .slim of a hashed LeNet-300-100 (small buckets)."""
    from edgeslim.codec import PackConfig, pack

    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300")
    es.share_(model, es.HashShare(ratio=1 / 64))
    path = tmp_path / "zoo.slim"
    pack(model, path, PackConfig(architecture="zoo"))
    return path


def _zoo_header(tensors: list[dict], modules: dict | None = None) -> dict:
    arch = {"kind": "zoo", "name": "lenet300", "kwargs": {}, "modules": modules or {}}
    return {
        "format": "edgeslim.slim", "edgeslim": "0", "architecture": arch,
        "input_shape": None, "num_classes": None, "tensors": tensors,
    }  # fmt: skip


def sympy_slim(tmp_path: Path, marker: Path, ok: Path | None = None) -> Path:
    import lzma

    ok = ok or graph_slim(tmp_path)
    header, streams = _slim_parts(ok)
    sid = header["architecture"]["stream"]
    text = _sympy_payload(lzma.decompress(streams[sid]).decode(), marker)
    streams[sid] = lzma.compress(text.encode())
    return _slim_file(tmp_path / "sympy.slim", header, streams)


def test_slim_with_a_sympy_payload_in_its_graph_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    path = sympy_slim(tmp_path, marker)
    out = assert_refused("slim", path, marker, tensor_bytes=path.stat().st_size)
    assert "graph stream" in out["message"] and "sympy.slim" in out["message"]


def _declare_lzma_dictionary(blob: bytes, prop: int) -> bytes:
    """An .xz stream whose LZMA2 filter declares dictionary property ``prop`` (40: 4 GiB),
    with the block header's CRC32 recomputed (the data still decodes)."""
    import zlib

    size = (blob[12] + 1) * 4  # the block header follows the 12-byte stream header
    head = bytearray(blob[12 : 12 + size])
    assert head[1] & 0xC0 == 0 and head[2] == 0x21  # no size fields; filter 0x21 = LZMA2
    head[4] = prop
    head[-4:] = zlib.crc32(head[:-4]).to_bytes(4, "little")
    return blob[:12] + bytes(head) + blob[12 + size :]


def test_slim_graph_stream_declaring_a_huge_lzma_dictionary_is_refused(tmp_path):
    import lzma

    ok = graph_slim(tmp_path)
    header, streams = _slim_parts(ok)
    sid = header["architecture"]["stream"]
    graph = lzma.decompress(streams[sid])
    assert lzma.LZMADecompressor(memlimit=1 << 20).decompress(streams[sid]) == graph  # fitted
    streams[sid] = _declare_lzma_dictionary(streams[sid], 40)  # a 4 GiB dictionary
    path = _slim_file(tmp_path / "dict.slim", header, streams)
    out = assert_refused("slim", path, tmp_path / "MARKER", tensor_bytes=path.stat().st_size)
    assert "graph stream" in out["message"] and "Memory usage limit" in out["message"]


def test_slim_with_a_non_operator_target_in_its_graph_is_refused(tmp_path):
    import lzma

    ok = graph_slim(tmp_path)
    header, streams = _slim_parts(ok)
    sid = header["architecture"]["stream"]
    program = json.loads(lzma.decompress(streams[sid]))
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    streams[sid] = lzma.compress(json.dumps(program).encode())
    path = _slim_file(tmp_path / "target.slim", header, streams)
    out = assert_refused("slim", path, tmp_path / "MARKER", tensor_bytes=ok.stat().st_size)
    assert "node target" in out["message"]


def test_tiny_hashed_slim_cannot_make_the_reader_allocate_much(tmp_path):
    # the 334-byte file: one hashed record, no streams, 4M virtual weights
    rec = {
        "name": "fc1.sign", "layout": "hash", "dtype": "float32", "shape": [2000, 2000],
        "crc": 0, "role": "sign", "buckets": 1, "seed": 0,
    }  # fmt: skip
    path = _slim_file(tmp_path / "hashed.slim", _zoo_header([rec]), [])
    size = path.stat().st_size
    assert size < 400
    out = assert_refused("slim", path, tmp_path / "MARKER", tensor_bytes=size)
    assert "fc1.sign" in out["message"] and "limit" in out["message"]


def test_slim_record_without_stream_bytes_and_a_huge_shape_is_refused(tmp_path):
    rec = {
        "name": "fc1.weight", "layout": "sparse", "dtype": "float32", "shape": [8000, 8000],
        "crc": 0, "order": "row", "index_bits": 4, "entries": 0, "index": None, "values": 0,
    }  # fmt: skip
    path = _slim_file(tmp_path / "zeros.slim", _zoo_header([rec]), [b""])
    out = assert_refused("slim", path, tmp_path / "MARKER", tensor_bytes=path.stat().st_size)
    assert "fc1.weight" in out["message"] and "limit" in out["message"]


def _buckets_slim(path: Path, buckets) -> Path:
    spec = {
        "class": "HashedLinear",
        "args": {"in_features": 784, "out_features": 300, "buckets": buckets, "seed": 0},
    }
    return _slim_file(path, _zoo_header([], {"fc1": spec}), [])


@pytest.mark.parametrize("buckets", [float("inf"), 10**30])
def test_slim_hashed_module_with_infinite_or_huge_buckets_is_refused(tmp_path, buckets):
    path = _buckets_slim(tmp_path / "buckets.slim", buckets)
    out = assert_refused("slim", path, tmp_path / "MARKER", tensor_bytes=path.stat().st_size)
    assert "buckets" in out["message"] or "Infinity" in out["message"], out


def test_slim_hashed_module_with_bad_buckets_is_refused(tmp_path):
    from edgeslim.core.errors import ContainerError

    for buckets in (0, -3, 2.5, True, "8", None, 300 * 784 + 1):
        path = _buckets_slim(tmp_path / "buckets.slim", buckets)
        with pytest.raises(ContainerError, match="buckets"):
            es.unpack(path)


def test_legitimate_slim_files_still_load(tmp_path):
    for path in (graph_slim(tmp_path), zoo_slim(tmp_path)):
        assert isinstance(es.unpack(path), nn.Module)


def test_a_legitimate_pt2_still_loads_and_matches(tmp_path):
    model = _tiny_model()
    loaded = es.load_model(valid_pt2(tmp_path))
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_legitimate_int8_ptq_pt2_still_loads(tmp_path):
    """Integer PTQ graphs use ATen ops such as ``__rshift__``: they pass the target check."""
    from edgeslim.quant import Int8PTQ, quantize

    calib = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = quantize(es.zoo.create("lenet5").eval(), Int8PTQ(), calib=calib)
    loaded = es.load_model(es.save_model(model, tmp_path / "q.pt2"))
    with torch.no_grad():
        assert torch.equal(loaded(calib), model(calib))


# --------------------------------------------------------------------------------------
# fuzzing
# --------------------------------------------------------------------------------------
# fuzzing (tests/fuzz_readers.py, in a child process)
# --------------------------------------------------------------------------------------


def hf_shard(tmp_path: Path) -> Path:
    """A ``hf:`` directory's shard: one bit-packed 4-bit layer (2 groups), one sparse."""
    from edgeslim.core.models.hf import write_shard
    from edgeslim.core.models.quantstate import QuantizedWeight, attach_quantized_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    codes = torch.randint(0, 16, (8, 16), dtype=torch.uint8)
    scale = torch.rand(8, 2).add(0.5).half()
    zero = torch.full((8, 2), 8, dtype=torch.uint8)
    g_idx = (torch.arange(16) // 8).int()
    weight = scale.float()[:, g_idx.long()] * (codes.float() - zero.float()[:, g_idx.long()])
    attach_quantized_(model[0], QuantizedWeight(weight, codes, scale, zero, g_idx, 4))
    with torch.no_grad():
        model[1].weight[model[1].weight.abs() < 0.2] = 0
    folder = tmp_path / "hf"
    folder.mkdir()
    write_shard(model, folder / "model.safetensors")
    return folder / "model.safetensors"


def pruned_zoo_slim(tmp_path: Path) -> Path:
    """A zoo-form .slim with sparse, k-means-shared and raw records (LeNet-300-100)."""
    from edgeslim.codec import PackConfig, pack

    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300")
    es.prune_(model, es.MagnitudePrune(layer_sparsity={"fc1": 0.97, "fc2": 0.9, "fc3": 0.5}))
    es.share_(model, es.KMeansShare(bits={"fc1": 3, "fc2": 5}))
    path = tmp_path / "pruned.slim"
    pack(model, path, PackConfig(index_bits="auto"))
    return path


def fuzz_seeds(tmp_path: Path, marker: Path) -> list[str]:
    """``KIND=PATH`` of every seed: one legitimate file per reader and form, and the
    proof-of-concept attacks (their mutations must not run the payload either)."""
    from edgeslim.core.models.storage import save_weights

    state = {k: v.clone() for k, v in _tiny_model().state_dict().items()}
    state["0.weight"][state["0.weight"].abs() < 0.3] = 0  # sparse enough to be stored sparse
    sparse = tmp_path / "ok.safetensors"
    save_weights(state, sparse, "sparse")
    evil = tmp_path / "evil"
    evil.mkdir()
    pt2, graph = valid_pt2(tmp_path), graph_slim(tmp_path)
    seeds = {
        "pt2": [pt2, legacy_pt2(evil, marker, pt2), sympy_pt2(evil, marker, pt2)],
        "weights": [sparse],
        "hf": [hf_shard(tmp_path)],
        "slim": [
            zoo_slim(tmp_path),  # hashed records
            pruned_zoo_slim(tmp_path),  # sparse / shared records
            graph,
            sympy_slim(evil, marker, graph),
        ],
    }
    return [f"{kind}={path}" for kind, paths in seeds.items() for path in paths]


def run_fuzz(tmp_path: Path, n: int, seed: int) -> dict:
    """``n`` mutations of every seed; asserts the fuzzer saw no failure and returns its
    counts, time and largest per-case peak."""
    marker = tmp_path / "MARKER"
    seeds = fuzz_seeds(tmp_path, marker)
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz_readers.py"), str(n), str(seed), str(marker), *seeds],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=7200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "failure" not in out, out
    assert not marker.exists()
    assert out["cases"] == n * len(seeds), out
    print(f"fuzz: {out['cases']} cases in {out['seconds']} s, peak {out['peak_bytes']} bytes")
    return out


def test_fuzz_readers_small(tmp_path):
    out = run_fuzz(tmp_path, n=20, seed=1)
    # every reader both loads and refuses some mutations: the mutations reach it
    for label, counts in out["per_seed"].items():
        assert counts["refused"] > 0, (label, counts)


@pytest.mark.slow
def test_fuzz_readers_slow(tmp_path):
    """10,008 cases (9 seeds x 1112); CI runs it at the size ``EDGESLIM_FUZZ_N`` sets."""
    n = int(os.environ.get("EDGESLIM_FUZZ_N", 1112))
    out = run_fuzz(tmp_path, n=n, seed=2)
    assert out["cases"] >= 10_000 or "EDGESLIM_FUZZ_N" in os.environ


_PROBE_CHECK = r"""
import numpy as np, torch
from memprobe import MB, Peak
for make in (
    lambda: torch.ones(30_000_000),  # 120 MB touched, invisible to tracemalloc
    lambda: np.ones(30_000_000),  # 240 MB of numpy
    lambda: torch.empty(200_000_000),  # 800 MB never touched
):
    try:
        with Peak(64 * MB) as peak:
            make()
    except (MemoryError, RuntimeError):
        pass
    else:
        raise AssertionError("allocated past the cap")
    assert peak.over and peak.hit_limit, vars(peak)
for _ in range(20):  # within the budget, and seen every time (no reuse of resident heap)
    with Peak(64 * MB) as peak:
        torch.ones(2_000_000).add_(1)  # 8 MB
    assert not peak.over and 7 * MB < peak.bytes < 64 * MB, vars(peak)
print("ok")
"""


def test_the_memory_probe_sees_torch_numpy_and_untouched_allocations():
    """In a child: the probe fixes the child's malloc settings (see memprobe)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE_CHECK], capture_output=True, text=True, env=_env()
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("attack", ["negative_group_size", "negative_group_index"])
def test_hf_quantized_group_index_out_of_range_is_refused(tmp_path, attack):
    """Found by the 10,008-case fuzzer: a ``group_size`` of -1 (or a negative stored group
    index) made the ``hf:`` reader index the scales with negative numbers (IndexError)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from edgeslim.core.models import hf

    shard = hf_shard(tmp_path)
    with safe_open(str(shard), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edge = json.loads(meta["edgeslim"])
    quantized = edge["quantized"]
    (key,) = quantized
    if attack == "negative_group_size":
        quantized[key]["group_size"] = -1
    else:  # a stored group index (as GPTQ's act-order writes one) with negative entries
        tensors[key + "::qgidx"] = -(torch.arange(16) // 8).int() - 1
    meta["edgeslim"] = json.dumps(edge)
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(CheckpointError, match="group"):
        hf._read(shard.parent)
