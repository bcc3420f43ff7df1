"""Profile a model: parameters, MACs, peak activation memory, bytes on disk, latency.

Everything is measured on the model as it is, for ONE sample (batch 1)::

    p = profile(model, example)          # example: a batch (B, ...) of real inputs
    print(p.summary()); rich.print(p.table())

MACs and activation memory come from the ATen graph that ``torch.export`` records for
``example[:1]`` (see :mod:`.counting` for which ops are counted, :mod:`.memory` for the
liveness rules); bytes are the payload of the weight files :mod:`edgeslim.core.models.storage`
writes; latency is the median of timed forward passes (:mod:`.latency`).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field

import torch
from rich.table import Table
from torch import nn

from edgeslim.core.device import model_device
from edgeslim.core.errors import EdgeslimError, ShapeError
from edgeslim.core.hooks import eval_mode
from edgeslim.core.masks import iter_masks
from edgeslim.core.models.storage import deployable_state, payload_bytes
from edgeslim.core.sparsity import nm_pattern
from edgeslim.core.timing import check_timing
from edgeslim.profiling.counting import (
    ModuleCount,
    count_params,
    memory_access_bytes,
    module_counts,
)
from edgeslim.profiling.latency import measure_latency_ms
from edgeslim.profiling.memory import activation_trace, peak_activation_bytes

__all__ = [
    "LayerProfile",
    "Profile",
    "activation_trace",
    "count_params",
    "measure_latency_ms",
    "memory_access_bytes",
    "peak_activation_bytes",
    "profile",
]


@dataclass
class LayerProfile:
    """One module: its own parameters and the MACs of the ops it issued (batch 1).

    ``name`` is the module path as in ``model.named_modules()`` ("" is the model itself, for
    ops in its own forward(); shown as "(root)"). ``params``/``nonzero_params`` count the
    module's own parameters (``recurse=False``). ``output_shape`` is the shape of the last
    tensor the module computed, *without* the batch dimension, e.g. ``(20, 24, 24)``;
    ``None`` when the module did not run.
    """

    name: str
    type: str
    params: int
    nonzero_params: int
    macs: int
    effective_macs: int
    output_shape: tuple[int, ...] | None

    @property
    def sparsity(self) -> float:
        """Fraction of this module's own parameters that are zero."""
        return 1 - self.nonzero_params / self.params if self.params else 0.0


@dataclass
class Profile:
    """What a model costs, per sample (batch 1). Counts are exact, latency is measured."""

    params: int
    nonzero_params: int
    macs: int
    effective_macs: int
    peak_activation_bytes: int
    bytes: dict[str, int]  # storage format -> weight payload bytes ("fp32" = dense file)
    latency_ms: float | None
    layers: list[LayerProfile] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()  # one sample, without the batch dimension
    memory_access_bytes: int = 0  # bytes read + written by all ops (ShuffleNetV2's MAC)
    notes: list[str] = field(default_factory=list)  # e.g. "N:M sparsity gives no CPU speedup"

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters that are zero."""
        return 1 - self.nonzero_params / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        for layer in d["layers"]:
            shape = layer["output_shape"]
            layer["output_shape"] = list(shape) if shape is not None else None
        return d

    def summary(self) -> str:
        """One line: params, MACs, peak memory, bytes, latency."""
        parts = [
            f"{self.params:,} params ({self.nonzero_params:,} nonzero)",
            f"{self.macs:,} MACs ({self.effective_macs:,} effective)",
            f"peak activations {_human_bytes(self.peak_activation_bytes)}",
            ", ".join(f"{k} {_human_bytes(v)}" for k, v in self.bytes.items()),
        ]
        if self.latency_ms is not None:
            parts.append(f"latency {self.latency_ms:.3f} ms")
        return "; ".join(parts) + "".join(f"\nnote: {n}" for n in self.notes)

    __str__ = summary

    def table(self, title: str | None = None) -> Table:
        """A rich table: one row per layer, then totals; memory, bytes, latency in the caption."""
        table = Table(title=title, caption=self._caption(), show_footer=False)
        table.add_column("layer")
        table.add_column("type")
        table.add_column("output", no_wrap=True)
        for col in ("params", "nonzero", "sparsity", "MACs", "eff. MACs"):
            table.add_column(col, justify="right")
        for i, layer in enumerate(self.layers):
            shape = "x".join(map(str, layer.output_shape)) if layer.output_shape else "-"
            table.add_row(
                layer.name or "(root)",
                layer.type,
                shape,
                f"{layer.params:,}",
                f"{layer.nonzero_params:,}",
                f"{layer.sparsity:.1%}" if layer.params else "-",
                f"{layer.macs:,}",
                f"{layer.effective_macs:,}",
                end_section=i == len(self.layers) - 1,
            )
        table.add_row(
            "total",
            "",
            "x".join(map(str, (1, *self.input_shape))) + " in",
            f"{self.params:,}",
            f"{self.nonzero_params:,}",
            f"{self.sparsity:.1%}",
            f"{self.macs:,}",
            f"{self.effective_macs:,}",
            style="bold",
        )
        return table

    def _caption(self) -> str:
        parts = [f"peak activations {_human_bytes(self.peak_activation_bytes)}"]
        parts += [f"{fmt} {_human_bytes(n)}" for fmt, n in self.bytes.items()]
        if self.latency_ms is not None:
            parts.append(f"latency {self.latency_ms:.3f} ms (median, batch 1)")
        return " · ".join(parts) + "".join(f"\nnote: {n}" for n in self.notes)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exp:.2f} {('B', 'KiB', 'MiB', 'GiB')[exp]}"


# --------------------------------------------------------------------------------------
# profile()
# --------------------------------------------------------------------------------------


def profile(
    model: nn.Module,
    example: torch.Tensor,
    *,
    latency: bool = True,
    repeats: int = 30,
    warmup: int = 5,
) -> Profile:
    """Measure ``model`` on one sample of ``example`` (a batch ``(B, ...)``).

    Runs where the model is: ``example`` is moved to the model's device, and the latency is
    measured there (CUDA events on a GPU). Raises :class:`ShapeError` when the model cannot
    run on the example, and :class:`EdgeslimError` when ``torch.export`` cannot trace it.
    The model's training flags are restored afterwards; its weights are not changed.
    """
    if latency:
        check_timing(repeats, warmup)
    x = _one_sample(model, example).to(model_device(model))
    with eval_mode(model):
        _check_runs(model, x, tuple(example.shape))
        ep = _export(model, x)
        counts = module_counts(ep)
        peak = peak_activation_bytes(ep)
        moved = memory_access_bytes(ep)
    del ep
    params, nonzero = count_params(model)
    state = deployable_state(model)
    return Profile(
        params=params,
        nonzero_params=nonzero,
        macs=sum(c.macs for c in counts.values()),
        effective_macs=sum(c.effective_macs for c in counts.values()),
        peak_activation_bytes=peak,
        bytes={"fp32": payload_bytes(state, "dense"), "sparse": payload_bytes(state, "sparse")},
        latency_ms=(
            measure_latency_ms(model, x, repeats=repeats, warmup=warmup) if latency else None
        ),
        layers=_layers(model, counts),
        input_shape=tuple(example.shape[1:]),
        memory_access_bytes=moved,
        notes=sparsity_notes(model),
    )


UNSTRUCTURED_NOTE_AT = 0.3  # an unmasked weight this sparse is treated as pruned


def sparsity_notes(model: nn.Module) -> list[str]:
    """What a model's zeros do *not* buy on dense CPU runtimes, said plainly.

    N:M patterns (2:4, 4:8 ...) and unstructured masks leave every tensor its dense shape:
    PyTorch, ONNX Runtime and TFLite on a CPU multiply the zeros like any other number, so
    latency does not fall (effective MACs count the zeros as skipped; the measured latency
    is the truth). Only removing channels (``ChannelPrune``) makes them faster.
    """
    patterns: dict[tuple[int, int], list[str]] = {}
    masked = []
    labels = {f"{n}.{p}" if n else p for n, _, p, _ in iter_masks(model)}
    for label, weight in model.named_parameters():
        if weight.dim() < 2:
            continue
        found = nm_pattern(weight)
        if found is not None:
            patterns.setdefault(found, []).append(label)
        elif label in labels or float((weight == 0).float().mean()) >= UNSTRUCTURED_NOTE_AT:
            masked.append(label)  # masked, or a reloaded model whose zeros have no masks
    notes = []
    for (n, m), layers in sorted(patterns.items()):
        notes.append(
            f"{n}:{m} semi-structured sparsity in {len(layers)} layer(s) ({', '.join(layers[:4])}"
            f"{' ...' if len(layers) > 4 else ''}): dense CPU runtimes (PyTorch, ONNX Runtime, "
            "TFLite) gain no speed from it; only sparse tensor cores (NVIDIA Ampere+) do"
        )
    if masked:
        notes.append(
            f"unstructured sparsity in {len(masked)} layer(s): the zeros shrink the sparse "
            "file but dense CPU runtimes gain no speed from them; remove channels "
            "(ChannelPrune) for a faster model"
        )
    return notes


def _one_sample(model: nn.Module, example: object) -> torch.Tensor:
    """``example[:1]``, after checking that ``example`` is a non-empty batch."""
    name = type(model).__name__
    if not isinstance(example, torch.Tensor):
        raise ShapeError(f"profiling {name} needs an example tensor (B, ...), got {example!r}")
    if example.dim() == 0 or example.shape[0] == 0:
        raise ShapeError(
            f"profiling {name} needs an example batch (B, ...) with B >= 1, "
            f"got shape {tuple(example.shape)}"
        )
    return example[:1]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_runs(model: nn.Module, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Run one plain forward pass on ``x``; a failure there is the input (of ``shape``)."""
    try:
        with torch.inference_mode():
            model(x)
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
        msg = f"{type(model).__name__} cannot run on input of shape {shape}: {_first_line(exc)}"
        expected = getattr(model, "input_shape", None)
        if expected is not None:
            msg += f" (it expects (B, {', '.join(map(str, expected))}))"
        raise ShapeError(msg) from exc


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence what torch.export says while tracing (warnings, graph dumps on failure)."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        sink = io.StringIO()  # torch.export prints partial graphs to stderr when it fails
        with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` at batch 1 (fixed shapes), with tracing noise silenced."""
    try:
        with _quiet():
            return torch.export.export(model, (x,))
    except Exception as exc:  # torch.export raises many types; all mean "cannot trace"
        raise EdgeslimError(
            f"cannot trace model {type(model).__name__} for profiling: {_first_line(exc)}"
        ) from exc


def _layers(model: nn.Module, counts: dict[str, ModuleCount]) -> list[LayerProfile]:
    """One row per module with parameters of its own or MAC ops, in execution order.

    Modules that never ran (but hold parameters) come last, in definition order.
    """
    rows: list[tuple[int, LayerProfile]] = []
    seen: set[int] = set()  # a shared (tied) parameter is counted in its first module only
    modules = dict(model.named_modules())
    for definition, (name, module) in enumerate(modules.items()):
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        count = counts.get(name)
        if not own and not (count and count.has_mac_ops):
            continue
        order = count.order if count else (1 << 40) + definition  # never ran: last
        rows.append((order, _row(name, type(module).__name__, own, count)))
    for name, count in counts.items():  # a path export names differently (rare)
        if name not in modules and count.has_mac_ops:
            rows.append((count.order, _row(name, count.class_name, [], count)))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def _row(name: str, kind: str, own: list[nn.Parameter], count: ModuleCount | None) -> LayerProfile:
    return LayerProfile(
        name=name,
        type=kind,
        params=sum(p.numel() for p in own),
        nonzero_params=sum(int(torch.count_nonzero(p.detach())) for p in own),
        macs=count.macs if count else 0,
        effective_macs=count.effective_macs if count else 0,
        output_shape=count.output_shape if count else None,
    )
