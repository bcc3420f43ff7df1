"""Hardware cost, measured once per layer configuration, then predicted.

**Runtimes on this machine** (ONNX Runtime, PyTorch), NetAdapt / nn-Meter style: a model is
cut into *units* -- a Conv2d or Linear with what the runtime fuses into it (the BatchNorm
after a conv is folded, a ReLU / ReLU6 / GELU module applied to its output is fused) --
and each unit configuration (op, input shape, output channels, kernel, stride, padding,
groups, bias, activation, bits) is timed once, alone, in the runtime (median of repeated
runs, minus the runtime's cost of an empty call). The table is cached on disk per machine
(platform, CPU model, threads) and runtime version: ``$EDGESLIM_CACHE/search/`` (default
``~/.cache/edgeslim/search/``). A whole model's latency is predicted as the sum of its
units' entries, times a scale, plus a constant overhead (the per-call cost and the unfused
ops: pooling, adds, flatten), both measured on the model itself: the line through the
(summed entries, measured latency) points of the dense model and the smallest candidate
(:meth:`RuntimeTarget.calibrate`; units timed alone run a little slower than inside a model,
whose activations are still in cache, so the scale is usually just below 1).

**Microcontrollers** (a device profile): the candidate is lowered to the int8 graph the C
backend uses; SRAM = the memory planner's arena + the input and output buffers (patch-based
execution when the plain plan does not fit); flash = the constants ``export_c`` writes
(weights compressed where that saves flash, as it stores them) + the code size measured once
on the dense model; latency = the device's cycles-per-MAC model
(:mod:`edgeslim.profiling.devices`). The verification exports the chosen model with
:func:`edgeslim.export.c.export_c` and reads the same numbers from the files written.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.fileio import atomic_write_text

FUSED_ACTS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.Hardswish: "hardswish"}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# bounds on the calibrated line's slope (model time per ms of summed table entries): they only
# catch a degenerate fit. Int8 models in ONNX Runtime run well above their units timed alone
# (Q/DQ pairs between units, per-op dispatch): MiniLM's int8 line hit the old upper bound of
# 2 and under-predicted the int8 models 22-25% (benchmarks/README.md, MiniLM 0.5x).
SCALE_MIN, SCALE_MAX = 0.25, 4.0


@dataclass(frozen=True)
class Unit:
    """One fused layer configuration: what a latency table entry is keyed by."""

    op: str  # "conv" | "linear"
    in_shape: tuple[int, ...]  # one sample, without the batch dimension
    out: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    act: str = ""
    bits: int = 32

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def module(self) -> tuple[nn.Module, torch.Tensor]:
        """A one-unit model and an input batch of one, to time the unit alone."""
        if self.op == "conv":
            layer: nn.Module = nn.Conv2d(
                self.in_shape[0],
                self.out,
                self.kernel,
                self.stride,
                self.padding,
                groups=self.groups,
                bias=self.bias,
            )
        else:
            layer = nn.Linear(self.in_shape[-1], self.out, bias=self.bias)
        acts = {v: k for k, v in FUSED_ACTS.items()}
        parts = [layer] + ([acts[self.act]()] if self.act else [])
        g = torch.Generator().manual_seed(0)
        module = nn.Sequential(*parts).eval()
        if self.bits < 32:  # int8 activations, weights on a ``bits`` grid (as the search does)
            from edgeslim.quant import Int8PTQ, quantize

            calib = torch.rand(8, *self.in_shape, generator=g)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = quantize(module, Int8PTQ(graph="auto", weight_bits=self.bits), calib=calib)
        return module, torch.rand(1, *self.in_shape, generator=g)


def layer_units(model: nn.Module, example: torch.Tensor) -> list[tuple[str, Unit]]:
    """``(layer name, unit)`` for every Conv2d / Linear ``model`` runs on ``example[:1]``,
    with the BatchNorm and activation modules applied to its output fused into it."""
    runs: list[tuple[str, nn.Module, int, int, tuple[int, ...]]] = []
    handles = []

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, out: Any) -> None:
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                runs.append((name, mod, id(x), id(out), tuple(x.shape[1:])))

        return record

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, *NORMS, *FUSED_ACTS)):
            handles.append(mod.register_forward_hook(hook(name)))
    was = model.training
    model.eval()
    keep: list[Any] = []
    try:
        with torch.no_grad():
            keep.append(model(example[:1]))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    units: list[tuple[str, Unit]] = []
    i = 0
    while i < len(runs):
        name, mod, _, out_id, shape = runs[i]
        i += 1
        if not isinstance(mod, nn.Conv2d | nn.Linear):
            continue
        folded = False
        if i < len(runs) and isinstance(runs[i][1], NORMS) and runs[i][2] == out_id:
            out_id, folded = runs[i][3], True
            i += 1
        act = ""
        if i < len(runs) and type(runs[i][1]) in FUSED_ACTS and runs[i][2] == out_id:
            act = FUSED_ACTS[type(runs[i][1])]
            i += 1
        bits = int(mod.weight_bits) if hasattr(mod, "weight_bits") else 32  # edgeslim.quant
        if isinstance(mod, nn.Conv2d):
            unit = Unit(
                "conv",
                shape,
                mod.out_channels,
                tuple(mod.kernel_size),
                tuple(mod.stride),
                tuple(mod.padding) if not isinstance(mod.padding, str) else (0, 0),
                mod.groups,
                mod.bias is not None or folded,  # a folded BatchNorm gives a bias
                act,
                bits,
            )
        else:
            unit = Unit(
                "linear", shape, mod.out_features, bias=mod.bias is not None, act=act, bits=bits
            )
        units.append((name, unit))
    return units


def machine() -> dict[str, str]:
    """What a latency table is valid for: platform, CPU model, threads."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu}


def cache_dir() -> Path:
    base = os.environ.get("EDGESLIM_CACHE") or Path.home() / ".cache" / "edgeslim"
    return Path(base) / "search"


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's structure and parameter shapes (not its values)."""
    text = repr(model) + json.dumps([list(p.shape) for p in model.state_dict().values()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LatencyTable:
    """Measured per-unit latencies of one runtime on this machine, cached on disk."""

    def __init__(self, runtime: str, threads: int = 1, directory: str | Path | None = None):
        self.runtime = runtime
        self.threads = threads
        self.machine = {**machine(), "threads": str(threads), "runtime": runtime_version(runtime)}
        digest = hashlib.sha256(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()
        folder = Path(directory) if directory is not None else cache_dir()
        self.path = folder / f"latency-{runtime}-{digest[:12]}.json"
        self.entries: dict[str, float] = {}
        self.calibrations: dict[str, list[float]] = {}  # model -> [scale, overhead ms]
        self.measured = 0  # entries measured by this process (not read from the cache)
        self._saved = 0
        self._empty: float | None = None
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = {k: float(v) for k, v in data.get("entries", {}).items()}
                self.calibrations = {
                    k: [float(a), float(b)] for k, (a, b) in data.get("calibrations", {}).items()
                }
                self._empty = data.get("empty_ms")
            except (OSError, ValueError, AttributeError):
                warnings.warn(f"latency table {self.path} unreadable: measuring anew", stacklevel=2)

    def flush(self) -> None:
        """Save when entries were measured since the last save (a resume then reads them)."""
        if self.measured != self._saved:
            self.save()

    def save(self) -> None:
        self._saved = self.measured
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "machine": self.machine,
            "empty_ms": self._empty,
            "entries": dict(sorted(self.entries.items())),
            "calibrations": self.calibrations,
        }
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))

    def time_model(self, model: nn.Module, x: torch.Tensor, repeats: int = 100) -> float:
        """Median ms of ``model(x)`` in this runtime."""
        return self.timer(model, x, repeats)()

    def timer(self, model: nn.Module, x: torch.Tensor, repeats: int = 100) -> Callable[[], float]:
        """A function timing ``model(x)`` in this runtime: each call one median ms over
        ``repeats`` runs (10 warm-up runs first); the ONNX Runtime session is built once, so
        repeated calls (interleaved with another model's) cost only the runs."""
        if self.runtime == "ort":
            from edgeslim.profiling.runtimes import ort_latency_ms, ort_session

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if _quantized(model):  # what ships: the int8 QDQ graph of export_onnx
                    session = _qdq_session(model, x, self.threads)
                else:
                    session = ort_session(model, x, threads=self.threads)
            return lambda: ort_latency_ms(session, x, repeats=repeats, warmup=10)
        from edgeslim.profiling.latency import batch_latency_ms

        def run() -> float:
            with _torch_threads(self.threads):
                return batch_latency_ms(model, x, repeats=repeats, warmup=10)

        return run

    def empty_ms(self) -> float:
        """The runtime's cost of one call of a trivial model (subtracted from every unit)."""
        if self._empty is None:
            self._empty = self.time_model(_Trivial(), torch.zeros(1, 4), repeats=300)
        return self._empty

    def entry(self, unit: Unit) -> float:
        """The unit's latency in ms: from the table, else measured now (and kept)."""
        key = unit.key()
        if key not in self.entries:
            module, x = unit.module()
            ms = min(self.time_model(module, x) for _ in range(2))
            self.entries[key] = max(0.0, ms - self.empty_ms())
            self.measured += 1
        return self.entries[key]


def _quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "weight_bits") for m in model.modules())


def _qdq_session(model: nn.Module, x: torch.Tensor, threads: int) -> Any:
    """An ONNX Runtime session of ``model`` (quantized by edgeslim.quant) as int8 QDQ."""
    import tempfile

    import onnxruntime as ort

    from edgeslim.export.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, x[:1], verify=False)
        data = path.read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class _Trivial(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


class _torch_threads:
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def runtime_version(runtime: str) -> str:
    if runtime == "ort":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"


def param_kb(model: nn.Module) -> float:
    """fp32 bytes of the parameters (what a dense runtime's file holds), in KB."""
    return sum(p.numel() for p in model.parameters()) * 4 / 1024


class RuntimeTarget:
    """ONNX Runtime (``"ort"``) or PyTorch (``"torch"``) on this machine, float32."""

    kind = "runtime"
    metrics = ("latency_ms", "size_kb")
    # a dense runtime runs sparse weights at full cost: shapes change time, and on ONNX
    # Runtime int8 (QDQ: QLinearConv / MatMulInteger kernels) -- searched only when asked
    # (SearchSpace(techniques=[..., "bits"], bits=[8]): every width runs as int8 there, so
    # narrower weights cost accuracy and save no time)
    # On ONNX Runtime the whole-model float / int8 switch (``precision``) is searched by
    # default: int8 is the cheapest latency cut there at full width.
    techniques: tuple[str, ...] = ("channel", "lowrank")
    optional: tuple[str, ...] = ()

    def __init__(self, runtime: str = "ort", threads: int = 1, cache: str | Path | None = None):
        self.name = runtime
        if runtime == "ort":
            self.techniques = ("channel", "lowrank", "precision")
            self.optional = ("bits",)
        self.table = LatencyTable(runtime, threads, cache)
        self.overhead: float | None = None
        self.scale = 1.0
        # int8 models: their own (scale, overhead) line (Q/DQ and per-op costs differ)
        self.lines: dict[str, tuple[float, float]] = {}

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "machine": self.table.machine, "table": str(self.table.path)}

    def units_ms(self, model: nn.Module, example: torch.Tensor) -> float:
        return sum(self.table.entry(u) for _, u in layer_units(model, example))

    def calibrate(
        self, models: list[nn.Module], example: torch.Tensor, key: str
    ) -> tuple[float, float]:
        """``(scale, overhead ms)``: the line through (summed entries, measured latency) of
        ``models`` (two: through both; more: least squares; one: scale 1), cached in the
        table under ``key``."""
        if key in self.table.calibrations:
            self.scale, self.overhead = self.table.calibrations[key]
        else:
            sums = [self.units_ms(m, example) for m in models]
            times = [self.measure_ms(m, example) for m in models]
            scale = 1.0
            spread = max(sums) - min(sums) if sums else 0.0
            if len(models) > 1 and spread > 0.05 * max(sums):
                mu, mt = sum(sums) / len(sums), sum(times) / len(times)
                scale = sum((u - mu) * (t - mt) for u, t in zip(sums, times, strict=True)) / sum(
                    (u - mu) ** 2 for u in sums
                )
                # a guard against a degenerate fit, not a prior (see SCALE_MIN)
                scale = min(SCALE_MAX, max(SCALE_MIN, scale))
            self.scale = scale
            self.overhead = sum(t - scale * u for t, u in zip(times, sums, strict=True)) / len(
                models
            )
            self.table.calibrations[key] = [self.scale, self.overhead]
        self.table.save()
        return self.scale, self.overhead

    def predict(self, model: nn.Module, example: torch.Tensor, calib: Any = None) -> dict:
        """Predicted cost (no running of ``model`` in the runtime)."""
        if self.overhead is None:
            raise ConfigError("RuntimeTarget.predict before calibrate(): no overhead measured")
        cost = {
            "latency_ms": self.line_ms(self.units_ms(model, example), _quantized(model)),
            "size_kb": param_kb(model),
        }
        self.table.flush()
        return cost

    def line_ms(self, summed: float, int8: bool = False) -> float:
        """A whole-model latency from its summed table entries: the calibrated line (the
        int8 line for an int8 model, when one was calibrated)."""
        scale, overhead = (
            self.lines.get("int8", (self.scale, self.overhead))
            if int8
            else (
                self.scale,
                self.overhead,
            )
        )
        if overhead is None:
            raise ConfigError("RuntimeTarget: no overhead measured (calibrate() first)")
        return scale * summed + overhead

    repeats = 200  # timed runs per whole-model measurement (x2, the faster median kept)

    def measure_ms(self, model: nn.Module, example: torch.Tensor) -> float:
        timer = self.timer(model, example)
        return min(timer() for _ in range(2))

    def timer(self, model: nn.Module, example: torch.Tensor) -> Callable[[], float]:
        """A function timing the whole model in the runtime (each call: one median ms of
        :attr:`repeats` runs; the session is built once), for re-measuring near a limit
        (:class:`edgeslim.search.fit.FitRule`)."""
        return self.table.timer(model, example[:1], self.repeats)

    def measure(self, model: nn.Module, example: torch.Tensor, calib: Any = None) -> dict:
        """Measured cost: the whole model run in the runtime."""
        return {"latency_ms": self.measure_ms(model, example), "size_kb": param_kb(model)}


class McuTarget:
    """A microcontroller profile: the C backend's SRAM and flash, the device latency model."""

    kind = "mcu"
    metrics = ("latency_ms", "flash_kb", "sram_kb", "size_kb")
    techniques = ("channel", "lowrank", "sparsity", "nm", "bits")

    def __init__(self, device: str) -> None:
        from edgeslim.profiling.devices import load_device

        self.device = load_device(device)
        self.name = self.device.name
        self.code_bytes: int | None = None

    def describe(self) -> dict[str, Any]:
        dev = self.device
        return {"target": self.name, "sram_bytes": dev.sram_bytes, "flash_bytes": dev.flash_bytes}

    def _graph(self, model: nn.Module, calib: torch.Tensor):
        from edgeslim.export import int8

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int8.lower(model, calib, name=type(model).__name__)

    def calibrate(self, models: list[nn.Module], example: torch.Tensor, key: str, calib=None):
        """The code size: text of the dense model's generated C compiled on this host, minus
        its constants (0 without a C compiler)."""
        from edgeslim.export.c import code_bytes

        self.code_bytes = code_bytes(
            self._graph(models[0], calib if calib is not None else example)
        )
        return self.code_bytes

    def predict(self, model: nn.Module, example: torch.Tensor, calib: Any = None) -> dict:
        from edgeslim.export.c import codegen, compress, plan_for
        from edgeslim.export.c.workload import workload

        graph = self._graph(model, calib if calib is not None else example)
        packed = compress.choose(graph, "auto")
        plan = plan_for(graph, sram_bytes=self.device.sram_bytes, packed=packed)
        io = graph.io_bytes()
        flash = codegen.constant_bytes(graph, packed) + (self.code_bytes or 0)
        return {
            "latency_ms": self.device.latency_ms(workload(graph, packed, plan)),
            "flash_kb": flash / 1024,
            "sram_kb": (plan.arena_size + io) / 1024,
            "size_kb": flash / 1024,
        }

    def measure(
        self, model: nn.Module, example: torch.Tensor, calib: Any = None, out: Path | None = None
    ) -> dict:
        """The C export's own numbers (compiled and checked), written to ``out``."""
        import tempfile

        from edgeslim.export.c import export_c, hostbuild
        from edgeslim.export.c.workload import workload

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            where = out if out is not None else Path(tmp) / "c"
            done = export_c(model, where, None, calib=calib, arm=False)
            flash = done.weight_bytes
            if hostbuild.compiler() is not None:
                sizes = hostbuild.object_size(
                    {p.name: p.read_text() for p in done.files if p.suffix in (".c", ".h")}
                )
                flash = sizes["text"] + sizes["rodata"]
            work = workload(done.graph, done.packed, done.plan)
        return {
            "latency_ms": self.device.latency_ms(work),
            "flash_kb": flash / 1024,
            "sram_kb": (done.arena_bytes + done.io_bytes) / 1024,
            "size_kb": flash / 1024,
        }


def resolve_target(name: str | None, *, threads: int = 1, cache: str | Path | None = None):
    """A target by name: ``"ort"`` / ``"onnxruntime"``, ``"torch"``, or a device profile."""
    text = (name or "ort").lower()
    if text in ("ort", "onnxruntime"):
        return RuntimeTarget("ort", threads, cache)
    if text in ("torch", "pytorch"):
        return RuntimeTarget("torch", threads, cache)
    if text in ("openvino", "litert", "tflite"):
        raise ConfigError(
            f"target {name!r}: no latency table for it yet (search targets: ort, torch, or a "
            "microcontroller profile)"
        )
    return McuTarget(text)
