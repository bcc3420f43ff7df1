"""The same seed writes the same bytes in two processes (docs/determinism.md).

Every writer edgeslim has (safetensors, ``.pt2``, ``.slim``, ONNX fp32 and int8, ``.tflite``,
generated C, OpenVINO IR) runs in two fresh Python processes (each with its own hash seed and
memory layout) and the files must be equal byte for byte. A recipe run twice must give the
same stage files; only measured times (``seconds``, ``latency_ms``) may differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import edgeslim
from repro_helpers import assert_same_bytes, assert_same_run, files

SRC = str(Path(edgeslim.__file__).resolve().parents[1])

# argv[1]: the output directory. A user-style CNN (global-average-pool head via ``mean``),
# seeded weights and a seeded calibration batch; then every writer.
_WRITE_ALL = r"""
import sys
from pathlib import Path

import torch
from torch import nn

import edgeslim as es
from edgeslim.core.fileio import save_tensors
from edgeslim.core.models.storage import save_weights
from edgeslim.quant import Int8PTQ, quantize

out = Path(sys.argv[1])
torch.manual_seed(0)


class MeanHeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)
        self.input_shape, self.num_classes = (1, 12, 12), 10

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


model = MeanHeadNet().eval()
calib = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
save_tensors(model.state_dict(), out / "state.safetensors", metadata={"z": "1", "a": "2"})
es.save_model(model, out / "model.pt2")
es.export_onnx(model, out / "fp32.onnx", calib[:4])
es.export_tflite(model, out / "model.tflite", calib=calib)
es.export_c(model, out / "c", calib=calib)
if "openvino" in sys.argv[2:]:
    es.export_openvino(model, out / "ov" / "model.xml", calib[:4])
q = quantize(model, Int8PTQ(), calib=calib)
es.export_onnx(q, out / "int8.onnx", calib[:4])
es.save_model(q, out / "int8.pt2")  # a quantized graph: torch.export records graph ids
es.prune_(model, es.MagnitudePrune(sparsity=0.6))
es.share_(model, es.KMeansShare(bits=4))
save_weights(model.state_dict(), out / "weights.sparse.safetensors", "sparse")
es.pack(model, out / "model.slim")  # not a zoo network: the graph form
es.export_c(model, out / "c_packed", calib=calib, compress_weights="auto")
print("done")
"""


def _run_twice(script: str, tmp_path: Path, *args: str) -> tuple[Path, Path]:
    """Run ``script`` (argv[1] = its output directory) in two processes at once."""
    env = {**os.environ, "PYTHONPATH": SRC, "EDGESLIM_QUIET": "1"}
    env.pop("PYTHONHASHSEED", None)  # each process its own hash seed (set iteration order)
    (tmp_path / "script.py").write_text(script)
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for out in outs:
        out.mkdir()
        cmd = [sys.executable, str(tmp_path / "script.py"), str(out), *args]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-3000:]
    return outs[0], outs[1]


def test_every_writer_is_byte_reproducible_in_two_processes(tmp_path):
    try:
        import openvino  # noqa: F401

        extra = ["openvino"]
    except ImportError:
        extra = []
    a, b = _run_twice(_WRITE_ALL, tmp_path, *extra)
    files_a, files_b = files(a), files(b)
    assert files_a.keys() == files_b.keys()
    expected = {"state.safetensors", "weights.sparse.safetensors", "model.pt2", "int8.pt2",
                "fp32.onnx", "int8.onnx", "model.tflite", "model.slim", "c/model.c",
                "c/model.h", "c/weights.h", "c_packed/weights.h"}  # fmt: skip
    if extra:
        expected |= {"ov/model.xml", "ov/model.bin"}
    assert expected <= files_a.keys(), sorted(files_a)
    assert not [n for n in files_a if "/." in n or n.startswith(".")], "temporaries left behind"
    assert_same_bytes(a, b, sorted(files_a))
    # nor anything of this install: torch.export records source paths in its node metadata
    embedding = [n for n, p in files_a.items() if SRC.encode() in p.read_bytes()]
    assert not embedding, f"{embedding} hold the path of edgeslim's source ({SRC})"


# -------------------------------------------------------------------------- a recipe, twice

# Stage kinds that each write another file: sparse safetensors (prune), shared weights
# (share), a .slim of the zoo form (pack), packed int8 weights and a quantized .pt2 (quantize).
RECIPE = {
    "name": "repro",
    "seed": 5,
    "model": "zoo:lenet5",
    "data": {"source": "mnist", "max_train": 256},
    "train": {"epochs": 1, "lr": 0.002},
    "stages": [
        {"prune": {"method": "magnitude", "sparsity": 0.6}, "finetune": {"epochs": 1}},
        {"share": {"method": "kmeans", "bits": 4}},
        {"pack": {"index_bits": "auto"}},
        {"quantize": {"method": "int8_ptq", "calib_size": 32}},
    ],
}

_COMPRESS = r"""
import sys
import edgeslim as es

es.run_recipe(es.Recipe.from_yaml(sys.argv[2]), sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_a_recipe_run_in_two_processes_writes_the_same_bytes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    a, b = _run_twice(_COMPRESS, tmp_path, str(recipe))
    names = files(a)
    for stage in ("stage-1/weights.sparse.safetensors", "stage-3/model.slim",
                  "stage-4/weights.int.safetensors", "stage-4/model.pt2"):  # fmt: skip
        assert stage in names
    assert_same_run(a, b)


def test_a_pt2_file_does_not_depend_on_its_name(tmp_path):
    """torch.export.save names the archive's top folder after the file; save_model always
    writes ``model/``, so the same model gives the same bytes under any file name."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(2, 4)
    a = edgeslim.save_model(model, tmp_path / "first.pt2", x)
    b = edgeslim.save_model(model, tmp_path / "sub" / "other name.pt2", x)
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(edgeslim.load_model(b)(x), model(x))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporaries


_WRITE_HF = r"""
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import edgeslim as es
from edgeslim.core.models.hf import save_hf

torch.manual_seed(0)
cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
model = BertForSequenceClassification(cfg).eval()
es.prune_(model, es.MagnitudePrune(sparsity=0.5))
save_hf(model, Path(sys.argv[1]) / "hf")
"""


@pytest.mark.slow
def test_a_transformers_directory_is_byte_reproducible(tmp_path):
    pytest.importorskip("transformers")
    a, b = _run_twice(_WRITE_HF, tmp_path)
    names = files(a)
    assert {"hf/config.json", "hf/model.safetensors"} <= names.keys()
    assert names.keys() == files(b).keys()
    assert_same_bytes(a, b, sorted(names))
