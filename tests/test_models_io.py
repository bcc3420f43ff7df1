import io
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import edgeslim as es
from edgeslim.core.models.storage import load_weights, save_weights


def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (no edgeslim zoo classes imported) and return stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_NET_SOURCE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y + self.dw(y)  # residual
        return self.fc(y.mean((2, 3)))


def net():
    return Net()
"""


def test_saved_pruned_model_reloads_in_fresh_process_without_its_class(tmp_path, monkeypatch):
    (tmp_path / "gone_nets.py").write_text(_NET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = es.load_model("py:gone_nets:net").eval()
    es.prune_(model, es.MagnitudePrune(sparsity=0.5))
    x = torch.randn(5, 1, 28, 28)
    path = es.save_model(model, tmp_path / "m.pt2", x)
    (tmp_path / "gone_nets.py").unlink()  # the class definition no longer exists anywhere
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    out = _run_python(
        f"""
        import torch
        from edgeslim import load_model
        m = load_model({str(path)!r}).eval()  # train()/eval() work on a loaded graph
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        with torch.no_grad():
            y = m(x)
        torch.save(y, {str(tmp_path / "y.pt")!r})
        print(type(m).__name__, m.input_shape)
        """
    )
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(got, expected)  # bitwise identical outputs
    assert out.split()[0] != "Net" and out.split(" ", 1)[1].strip() == "(1, 28, 28)"


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "mobilenetv2", "resnet8"])
def test_every_zoo_model_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = es.load_model(f"zoo:{name}").eval()
    es.prune_(model, es.MagnitudePrune(sparsity=0.7))
    loaded = es.load_model(es.save_model(model, tmp_path / f"{name}.pt2"))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.input_shape == (1, 28, 28) and loaded.num_classes == 10


def test_py_model_source(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))\n"
        "def not_a_model():\n"
        "    return 3\n"
        "VALUE = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = es.load_model("py:mynets:tiny")
    assert sum(p.numel() for p in m.parameters()) == 7850
    with pytest.raises(es.ModelSourceError, match=r"not a torch\.nn\.Module"):
        es.load_model("py:mynets:not_a_model")
    with pytest.raises(es.ModelSourceError, match="no callable 'VALUE'"):
        es.load_model("py:mynets:VALUE")
    with pytest.raises(es.ModelSourceError, match="cannot import 'no_such_module'"):
        es.load_model("py:no_such_module:f")
    with pytest.raises(es.ModelSourceError, match="must look like"):
        es.load_model("py:mynets")


def test_model_source_errors(tmp_path):
    with pytest.raises(es.ModelSourceError, match="cannot resolve model source"):
        es.load_model("alexnet")
    with pytest.raises(es.ModelSourceError, match="does not exist"):
        es.load_model(tmp_path / "missing.pt2")
    with pytest.raises(es.ModelSourceError, match=r"\.pt2"):
        es.save_model(es.load_model("zoo:lenet300"), tmp_path / "m.pth")


def test_save_model_wrong_example_shape_is_a_shape_error(tmp_path):
    with pytest.raises(es.ShapeError, match=r"\(2, 3, 32, 32\)"):
        es.save_model(es.load_model("zoo:lenet5"), tmp_path / "m.pt2", torch.zeros(2, 3, 32, 32))
    assert not (tmp_path / "m.pt2").exists()


def test_corrupt_pt2_is_a_checkpoint_error(tmp_path):
    path = es.save_model(es.load_model("zoo:lenet300"), tmp_path / "m.pt2")
    data = path.read_bytes()
    (tmp_path / "trunc.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(es.CheckpointError, match=r"trunc\.pt2"):
        es.load_model(tmp_path / "trunc.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"definitely not a zip archive")
    with pytest.raises(es.CheckpointError, match=r"junk\.pt2"):
        es.load_model(tmp_path / "junk.pt2")


class _Boom:
    def __reduce__(self):
        return (print, ("EXECUTED",))


def test_pt2_with_malicious_pickle_is_refused(tmp_path, capfd):
    """A sample-input pickle that would run code on load is refused, never executed."""
    path = es.save_model(es.load_model("zoo:lenet300"), tmp_path / "m.pt2")
    evil = tmp_path / "evil.pt2"
    buf = io.BytesIO()
    torch.save({"x": _Boom()}, buf)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        sample = next(n for n in src.namelist() if "/data/sample_inputs/" in n)
        for item in src.infolist():
            payload = buf.getvalue() if item.filename == sample else src.read(item.filename)
            dst.writestr(item, payload)
    with pytest.raises(es.CheckpointError, match="refusing to load"):
        es.load_model(evil)
    assert "EXECUTED" not in capfd.readouterr().out


def test_sparse_weight_file_round_trips_and_is_smaller(tmp_path):
    model = es.load_model("zoo:lenet300")
    es.prune_(model, es.MagnitudePrune(sparsity=0.9))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_keep")}
    dense = save_weights(state, tmp_path / "d.safetensors", "dense")
    sparse = save_weights(state, tmp_path / "s.safetensors", "sparse")
    back = load_weights(tmp_path / "s.safetensors")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # values (10% of 266,200 weights, fp32) + bitmap (1 bit per weight) + biases, plus a header
    weights = 266_200
    payload = round(0.1 * weights) * 4 + sum((n + 7) // 8 for n in (235_200, 30_000, 1000))
    payload += 410 * 4
    assert payload < sparse < payload + 2048
    assert dense > 4 * 266_610


def test_corrupt_weight_file_is_a_checkpoint_error(tmp_path):
    state = {"w": torch.randn(4, 4)}
    path = tmp_path / "w.safetensors"
    save_weights(state, path, "dense")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(es.CheckpointError, match=r"w\.safetensors"):
        load_weights(path)
