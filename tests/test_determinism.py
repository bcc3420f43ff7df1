"""Byte-reproducible files and what float determinism edgeslim promises (docs/determinism.md)."""

import subprocess
import sys

import torch
from safetensors.torch import load_file

from edgeslim.core.fileio import canonical_safetensors, save_tensors

_SAVE = """
import sys, torch
from edgeslim.core.fileio import save_tensors
from edgeslim.core.models.storage import save_weights
g = torch.Generator().manual_seed(0)
state = {{name: torch.randn(5, 3, generator=g) for name in ("fc1.weight", "b", "a", "zeta")}}
state["fc1.weight"][state["fc1.weight"].abs() < 0.8] = 0
meta = {{k: str(i) for i, k in enumerate("qwertyuiopasdfghjkl")}}
save_tensors(state, r"{out}/plain.safetensors", metadata=meta)
save_weights(state, r"{out}/sparse.safetensors", "sparse")
"""


def test_safetensors_bytes_are_identical_in_two_processes(tmp_path):
    """Regression: safetensors writes its metadata map in hash order, which differs per process."""
    outs = []
    for i in range(2):
        out = tmp_path / str(i)
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", _SAVE.format(out=out)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    for name in ("plain.safetensors", "sparse.safetensors"):
        a, b = ((out / name).read_bytes() for out in outs)
        assert a == b, name


def test_canonical_header_keeps_the_tensors(tmp_path):
    from safetensors.torch import save

    state = {"b": torch.arange(7.0), "a": torch.ones(2, 3, dtype=torch.int8)}
    raw = save(state, metadata={"z": "1", "y": "2", "x": "3"})
    data = canonical_safetensors(raw)
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    assert data[8:].startswith(b'{"__metadata__":{"x":"3","y":"2","z":"1"},"a":')
    assert canonical_safetensors(data) == data  # idempotent
    save_tensors(state, tmp_path / "s.safetensors", metadata={"z": "1"})
    back = load_file(str(tmp_path / "s.safetensors"))
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
