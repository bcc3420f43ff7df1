"""Any torch device, checked on a CPU-only machine: inputs follow the model, statistics live
where the model is, recipes and the CLI take ``device``.

Two stand-ins for a GPU, each a real check of where tensors are:

- the ``meta`` device: a model there runs (shapes and devices propagate, nothing is
  computed), and a CPU input given to it is an error ("Tensor on device meta is not on the
  expected device cpu"), so a calibration loop that forgets to move its batches fails here;
- the one-shot kernels (Wanda, SparseGPT, GPTQ, SmoothQuant, the statistics) run on meta
  tensors: a CPU tensor they allocate and mix in raises, and what they return must be on
  meta. A value read back to the host (``.item()``) raises too, so this also checks that
  the kernels never make a GPU wait for the host.

Real CUDA runs, compared with the CPU, are in ``test_cuda.py`` (skipped without a GPU).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from collections import UserDict
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import edgeslim as es
from edgeslim.core.device import model_device, to_device
from edgeslim.core.device_check import check_device
from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import iter_batches, run_calibration
from edgeslim.oneshot.engine import compress_layerwise
from edgeslim.oneshot.registry import OneShotAlgorithm
from edgeslim.oneshot.stats import (
    Hessian,
    InputAbsMax,
    InputNorms,
    damped_inverse_cholesky,
    wide_dtype,
)
from edgeslim.profiling.latency import batch_latency_ms, measure_latency_ms

CUDA = torch.cuda.is_available()
META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def test_model_device_is_the_first_parameter_or_buffer_else_cpu():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2).to(META)) == META
    only_buffers = nn.BatchNorm1d(3, affine=False).to(META)
    assert model_device(only_buffers) == META
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_to_device_walks_tensors_tuples_lists_and_mappings():
    t = torch.ones(2)
    batch = {"a": t, "b": (t, [t, 3]), "c": "text", "d": None}
    moved = to_device(batch, META)
    assert moved["a"].device == META
    assert isinstance(moved["b"], tuple) and moved["b"][0].device == META
    assert isinstance(moved["b"][1], list) and moved["b"][1][0].device == META
    assert moved["b"][1][1] == 3 and moved["c"] == "text" and moved["d"] is None
    mapping = UserDict({"input_ids": torch.zeros(1, 4, dtype=torch.long)})  # a Mapping
    out = to_device(mapping, META)
    assert isinstance(out, UserDict) and out["input_ids"].device == META  # its type is kept
    assert out["input_ids"].dtype == torch.long
    # on the device they are already on, tensors are returned as they are: no copy on the CPU
    assert to_device(t, "cpu") is t
    assert to_device((t,), torch.device("cpu"))[0] is t


def test_to_device_takes_a_tokenizers_batch_encoding():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    out = to_device(enc, META)
    assert out["input_ids"].device == META


# ------------------------------------------------------------------- device checking


def test_check_device_accepts_the_cpu_and_names_what_it_refuses():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"'tpu9'.* not a torch device"):
        check_device("tpu9")
    with pytest.raises(ConfigError, match=r"meta"):
        check_device("meta")
    with pytest.raises(ConfigError, match=r"device"):
        check_device("")


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_is_refused_where_there_is_none():
    with pytest.raises(ConfigError, match=r"'cuda'.*not available on this machine"):
        check_device("cuda")
    with pytest.raises(ConfigError, match=r"'cuda:1'.*not available"):
        check_device("cuda:1", "--device")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_cuda_index_beyond_the_gpus_is_refused():
    n = torch.cuda.device_count()
    assert check_device(f"cuda:{n - 1}").type == "cuda"
    with pytest.raises(ConfigError, match=rf"cuda:{n}.*does not exist"):
        check_device(f"cuda:{n}")


def test_wide_dtype_is_float64_except_where_the_device_has_none():
    assert wide_dtype("cpu") == torch.float64
    assert wide_dtype(None) == torch.float64
    assert wide_dtype("mps") == torch.float32


# ------------------------------------------------------- calibration: inputs follow the model


def _calib_forms(x: torch.Tensor) -> dict[str, object]:
    y = torch.zeros(len(x), dtype=torch.long)
    return {
        "tensor": x,
        "list of tensors": [x[:3], x[3:]],
        "list of 1-tuples": [(x[:3],), (x[3:],)],
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=4),
        "Dataset": TensorDataset(x, y),
    }


@pytest.mark.parametrize("form", list(_calib_forms(torch.zeros(8, 4))))
def test_run_calibration_moves_every_form_of_calibration_data_to_the_model(form):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(META)
    calib = _calib_forms(torch.randn(8, 4))[form]
    seen = []
    n = run_calibration(
        model,
        calib,
        {"0": model[0], "2": model[2]},
        lambda name, m, args, out: seen.append((name, args[0].device, out.device)),
        batch_size=4,
    )
    assert n >= 2 and len(seen) == 2 * n
    assert all(a == META and o == META for _, a, o in seen)


def test_run_calibration_moves_keyword_inputs():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            return self.fc(input_ids.float() * attention_mask[..., None])

    model = Keyword().to(META)
    batch = {"input_ids": torch.ones(2, 3, 4), "attention_mask": torch.ones(2, 3)}
    seen = []
    run_calibration(model, [batch, batch], {"fc": model.fc}, lambda *a: seen.append(a[2][0]))
    assert [t.device for t in seen] == [META, META]


def test_iter_batches_moves_only_when_asked():
    x = torch.randn(5, 2)
    assert all(b.device.type == "cpu" for b in iter_batches(x, 2))
    assert all(b.device == META for b in iter_batches(x, 2, device=META))


# ---------------------------------------------- the one-shot engine: statistics on the model's


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(h)))


class _Stack(nn.Module):
    """Embedding -> a ModuleList of identical blocks -> head (what find_blocks looks for)."""

    def __init__(self, vocab: int = 32, d: int = 8, n: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def _recorder(stats_type: type):
    seen: list[dict] = []

    class Record(OneShotAlgorithm):
        def compress_layer(self, name, module, stats):
            tensors = [v for v in vars(stats).values() if isinstance(v, torch.Tensor)]
            seen.append(
                {
                    "name": name,
                    "weight": module.weight.device,
                    "stats": {t.device for t in tensors},
                    "dtypes": {t.dtype for t in tensors},
                }
            )
            return 0.0

    Record.stats_type = stats_type
    return Record(None), seen


@pytest.mark.parametrize("stats_type", [InputNorms, Hessian, InputAbsMax])
def test_one_shot_statistics_are_allocated_on_the_models_device(stats_type):
    model = _Stack().to(META)
    calib = torch.randint(0, 32, (6, 5))  # on the CPU: must be moved to the model
    algo, seen = _recorder(stats_type)
    log = compress_layerwise(model, calib, algo, batch_size=4, label="record", progress=False)
    assert set(log) == {f"layers.{i}.{n}" for i in range(2) for n in ("up", "down")}
    assert [s["name"] for s in seen] == list(log)
    assert all(s["weight"] == META and s["stats"] == {META} for s in seen)
    wide = {InputNorms: {torch.float64}, Hessian: {torch.float32}, InputAbsMax: {torch.float32}}
    assert all(s["dtypes"] == wide[stats_type] for s in seen)


def test_a_model_without_blocks_is_calibrated_on_its_device_too():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(META)
    algo, seen = _recorder(Hessian)
    compress_layerwise(model, [torch.randn(3, 4), torch.randn(2, 4)], algo, progress=False)
    assert len(seen) == 2 and all(s["stats"] == {META} for s in seen)


def test_cpu_numbers_are_unchanged_by_the_device_plumbing():
    """float64 sums of squares (as before) and a float32 Hessian within float32 rounding of a
    float64 one: the CPU path computes what it computed before."""
    x = torch.randn(3, 50, 16)
    norms, hess = InputNorms(16), Hessian(16)
    for batch in x:
        norms.add(batch)
        hess.add(batch)
    rows = x.reshape(-1, 16).double()
    assert torch.allclose(norms.sq, rows.pow(2).sum(0), rtol=1e-6)
    ref = 2 / rows.shape[0] * rows.t() @ rows
    assert hess.h.dtype == torch.float32
    assert torch.allclose(hess.h.double(), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- the kernels where their inputs are


def _layer(out_f: int = 16, in_f: int = 32, tokens: int = 96):
    """A weight (out, in) and inputs (tokens, in) on the meta device."""
    return torch.randn(out_f, in_f, device=META), torch.randn(tokens, in_f, device=META)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1], device=x.device)
    h.add(x)
    return h.h


def _devices(*tensors: torch.Tensor) -> set[torch.device]:
    return {t.device for t in tensors}


def test_the_meta_device_does_catch_a_cpu_tensor():
    with pytest.raises(RuntimeError, match=r"device"):  # the check this section relies on
        torch.ones(4, device=META) + torch.ones(4)
    with pytest.raises(RuntimeError, match=r"device"):
        torch.ones(4, 4, device=META) + torch.eye(4)


def test_statistics_live_on_the_device_they_are_given():
    w, x = _layer()
    for cls in (InputNorms, Hessian, InputAbsMax):
        stats = cls(32, device=META)
        stats.add(x)
        stats.add(x[:10].reshape(2, 5, 32))
        assert _devices(*(v for v in vars(stats).values() if isinstance(v, torch.Tensor))) == {META}
    u = damped_inverse_cholesky(_hessian(x), w, 0.01)
    assert u.device == META and u.dtype == torch.float64


def test_wanda_masks_on_the_device():
    from edgeslim.prune import Wanda
    from edgeslim.prune.wanda import wanda_mask

    w, x = _layer()
    norms = InputNorms(32, device=META)
    norms.add(x)
    for cfg in (Wanda(sparsity=0.5), Wanda(n=2, m=4)):
        keep = wanda_mask(w, norms.sq, cfg)
        assert keep.device == META and keep.dtype == torch.bool
    assert wanda_mask(w.half(), norms.sq, Wanda(sparsity=0.5)).device == META


@pytest.mark.parametrize("target", ["sparsity", "n:m", "mask"])
def test_sparsegpt_runs_on_the_device(target):
    from edgeslim.prune.sparsegpt import sparsegpt_prune_

    w, x = _layer()
    kwargs = {
        "sparsity": {"sparsity": 0.5},
        "n:m": {"n": 2, "m": 4},
        "mask": {"mask": torch.rand(16, 32, device=META) > 0.5},
    }[target]
    keep = sparsegpt_prune_(w, _hessian(x), blocksize=8, **kwargs)
    assert _devices(keep, w) == {META}


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_and_rtn_run_on_the_device(act_order):
    from edgeslim.quant.gptq import gptq_quantize, rtn_quantize

    w, x = _layer()
    keep = torch.rand(16, 32, device=META) > 0.3
    for qw in (
        gptq_quantize(w, _hessian(x), 4, 8, act_order=act_order, blocksize=8, keep=keep),
        rtn_quantize(w, 4, 8),
    ):
        assert _devices(qw.weight, qw.codes, qw.scale, qw.zero, qw.g_idx) == {META}


def test_smoothquant_pieces_run_on_the_device():
    from edgeslim.quant.smoothquant import smoothing_factors, symmetric_quantize

    w, x = _layer()
    absmax = InputAbsMax(32, device=META)
    absmax.add(x)
    s = smoothing_factors(absmax.absmax, [w, w * 2], alpha=0.5)
    qw = symmetric_quantize(w * s, 8)
    assert _devices(s, qw.weight, qw.codes, qw.g_idx) == {META}


# ------------------------------------------------------------------ profiling, PTQ, modules


def test_latency_runs_the_example_on_the_models_device():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).to(META)
    # a CPU example given to a meta model fails unless it is moved there first
    assert measure_latency_ms(model, torch.randn(3, 4), repeats=2, warmup=1) >= 0
    assert batch_latency_ms(model, torch.randn(3, 4), repeats=2, warmup=0) >= 0


def test_profile_of_a_cpu_model_is_unchanged():
    model = es.load_model("zoo:lenet5")
    p = es.profile(model, torch.zeros(2, 1, 28, 28), repeats=3, warmup=1)
    assert p.latency_ms is not None and p.latency_ms > 0


def test_every_edgeslim_module_can_be_moved_with_to():
    """No nn.Module subclass of edgeslim shadows a method nn.Module relies on (a quantized
    layer's ``_apply(x, w, b)`` once broke ``model.to(device)`` for every quantized model)."""
    allowed = {"forward", "extra_repr", "_load_from_state_dict", "train", "__init__"}
    clashes = []
    for info in pkgutil.walk_packages(es.__path__, "edgeslim."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not (issubclass(cls, nn.Module) and cls.__module__ == module.__name__):
                continue
            for attr in vars(cls):
                if attr.startswith("__") or attr in allowed:
                    continue
                if callable(getattr(nn.Module, attr, None)):
                    clashes.append(f"{cls.__module__}.{cls.__name__}.{attr}")
    assert not clashes, clashes


def test_a_quantized_model_moves_with_to(mnist):
    from edgeslim.quant import Int8PTQ, quantize

    model = es.load_model("zoo:lenet5")
    qmodel = quantize(model, Int8PTQ(), calib=mnist.calib(32))
    moved = copy.deepcopy(qmodel).to(META)
    assert {t.device for t in [*moved.parameters(), *moved.buffers()]} == {META}
    again = copy.deepcopy(qmodel).to("cpu")
    x = mnist.example(4)
    assert torch.equal(again(x), qmodel(x))


def test_ptq_calibration_is_fed_through_the_models_device(monkeypatch, mnist):
    """run_calibration asks to_device for the model's device for every batch."""
    from edgeslim.core import hooks
    from edgeslim.quant import Int8PTQ, quantize

    targets = []
    real = hooks.to_device

    def spy(batch, device):
        targets.append(torch.device(device))
        return real(batch, device)

    monkeypatch.setattr(hooks, "to_device", spy)
    quantize(es.load_model("zoo:lenet5"), Int8PTQ(), calib=mnist.calib(40), batch_size=16)
    assert targets == [torch.device("cpu")] * 3


# ------------------------------------------------------------------------- recipes and CLI

RECIPE = {
    "name": "device",
    "seed": 1,
    "model": "zoo:lenet300",
    "data": {"source": "mnist", "max_train": 300, "calib": 32},
    "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}],
}


def test_recipe_device_defaults_to_cpu_validates_and_is_not_in_the_stage_hash():
    r = es.Recipe.from_dict(RECIPE)
    assert r.device == "cpu" and r.to_dict()["device"] == "cpu"
    assert es.Recipe.from_dict(yaml.safe_load(r.to_yaml())).device == "cpu"
    elsewhere = r.model_copy(update={"device": "cuda:0"})
    assert elsewhere.prefix_hash(1) == r.prefix_hash(1)  # a run may resume on another device
    for bad, message in (
        ("tpu9", r"device: .*'tpu9'"),
        ("meta", r"device: .*meta"),
        (3, r"device: .*string"),
    ):
        with pytest.raises(ConfigError, match=message):
            es.Recipe.from_dict({**RECIPE, "device": bad})


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_a_cuda_recipe_is_refused_without_cuda_and_the_override_wins(tmp_path):
    with pytest.raises(ConfigError, match=r"device: .*'cuda'.*not available"):
        es.Recipe.from_dict({**RECIPE, "device": "cuda"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "device": "cuda"}))
    assert es.Recipe.from_yaml(path, device="cpu").device == "cpu"
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"'cuda'.*not available"):
        es.run_recipe(es.Recipe.from_dict(RECIPE), out, device="cuda", progress=False)
    assert not out.exists()  # refused before anything was written


def test_a_recipe_with_device_cpu_runs_and_records_it(tmp_path):
    result = es.run_recipe(es.Recipe.from_dict({**RECIPE, "device": "cpu"}), tmp_path / "run")
    assert model_device(result.model).type == "cpu"
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["device"] == "cpu"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["baseline", "prune"]
    assert 0.45 < rows[1]["log"]["result"]["fc1"] < 0.55


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGESLIM_QUIET": "1", "COLUMNS": "200"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )


def test_cli_compress_with_device_cpu(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    proc = _cli("compress", str(path), "--out", str(tmp_path / "run"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["device"] == "cpu"


def test_cli_refuses_a_device_it_does_not_have(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    proc = _cli("compress", str(path), "--out", str(tmp_path / "run"), "--device", "tpu9")
    assert proc.returncode == 2 and "'tpu9'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("profile", "zoo:lenet5", "--no-latency", "--device", "meta")
    assert proc.returncode == 2 and "meta" in proc.stderr
    if not CUDA:
        proc = _cli("profile", "zoo:lenet5", "--device", "cuda")
        assert proc.returncode == 2 and "not available" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------- streaming


def test_streaming_takes_a_device(tmp_path):
    transformers = pytest.importorskip("transformers")
    from edgeslim.oneshot.streaming import compress_sharded
    from edgeslim.prune import Wanda

    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    calib = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    a = compress_sharded(tmp_path / "src", tmp_path / "a", Wanda(sparsity=0.5), calib=calib)
    b = compress_sharded(
        tmp_path / "src", tmp_path / "b", Wanda(sparsity=0.5), calib=calib, device="cpu"
    )
    assert a == b
    for bad in ("meta", "tpu9") + (() if CUDA else ("cuda",)):
        with pytest.raises(ConfigError, match="device"):
            compress_sharded(
                tmp_path / "src", tmp_path / "c", Wanda(sparsity=0.5), calib=calib, device=bad
            )
