"""The int8 early-exit network: one integer graph per stage and per exit head, and an
integer-only exit rule -- what the C runner (:mod:`.exits_c`) computes, in numpy.

BranchyNet (Teerapittayanon et al., ICPR 2016), quantized::

    q = quantize_exits(model, calib)     # int8 graphs (edgeslim.export.int8), chained
    logits, taken = q.run(x)             # int8 logits and the exit each input took

The model is cut as :func:`edgeslim.export.exits.export_exits` cuts it: stage ``n`` runs the
segments since the previous enabled exit (an exit whose threshold is unset is merged away);
head ``n`` is that exit's head. Each is lowered to its own integer graph. The graphs are
chained: stage ``n``'s input tensor has the qparams of stage ``n - 1``'s output, so the int8
features go from one graph to the next as they are (no requantization), and head ``n`` reads
the same int8 features as stage ``n + 1``.

**The exit rule, integer only.** With int8 logits ``q`` of scale ``s`` the largest softmax
probability is ``p = 1 / sum_j exp(-s (q_max - q_j))``. A table per exit,
``E[d] = round(2**15 exp(-s d))`` for ``d = 0 .. 255``, gives ``S = sum_j E[q_max - q_j]``
(``E[0] = 2**15``), and an input leaves at the exit iff ``S <= floor(2**15 / t)`` for the
exit's max-probability threshold ``t`` (:func:`edgeslim.dynamic.set_thresholds`). The
reference (:meth:`Int8Exits.run`) and the C runner compute exactly this, so they take the
same exit for every input. The float model decides on float logits and may differ on inputs
whose confidence is within the int8 rounding of a threshold. Only the ``maxprob`` criterion
has an integer rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.dynamic.exits import ExitModel
from edgeslim.export.int8 import ir, lower, qparams, reference, trace
from edgeslim.quant import spec

__all__ = ["ONE", "Int8Exits", "confident", "exit_limit", "exp_table", "quantize_exits"]

ONE = 1 << 15  # exp(0) in the exit rule's fixed point


def exp_table(scale: float) -> np.ndarray:
    """``E[d] = round(2**15 exp(-scale d))`` for ``d = 0 .. 255`` (int64, fits uint16)."""
    d = np.arange(256, dtype=np.float64)
    return np.round(ONE * np.exp(-float(scale) * d)).astype(np.int64)


def exit_limit(threshold: float) -> int:
    """The integer limit on ``S`` for a max-probability threshold (leave iff ``S <= limit``)."""
    if threshold <= 0:
        return spec.INT32_MAX  # every sample is confident enough
    return int(min(math.floor(ONE / threshold), spec.INT32_MAX))


def confident(q: np.ndarray, table: np.ndarray, limit: int) -> np.ndarray:
    """The integer exit rule on int8 logits ``q`` (N, classes): a bool per sample."""
    q = np.asarray(q, dtype=np.int64)
    d = q.max(axis=-1, keepdims=True) - q
    return table[d].sum(axis=-1) <= limit


@dataclass
class Int8Exits:
    """The quantized early-exit network: int8 graphs and the integer exit rule.

    ``stages[n]`` ends at exit ``exit_index[n]`` of the model (the last at the final exit);
    ``heads[n]`` (one fewer) is that exit's head; ``tables`` / ``limits`` its rule.
    """

    stages: list[ir.Graph]
    heads: list[ir.Graph]
    exit_index: list[int]
    thresholds: list[float]
    tables: list[np.ndarray] = field(default_factory=list)
    limits: list[int] = field(default_factory=list)

    @property
    def classes(self) -> int:
        g = self.stages[-1]
        return g[g.output].size

    def logit_graph(self, n: int) -> ir.Graph:
        """The graph whose output is exit ``n``'s logits."""
        return self.stages[n] if n == len(self.heads) else self.heads[n]

    def quantize_input(self, x: Any) -> np.ndarray:
        """Float inputs (N, C, H, W) -> the first stage's int8 inputs (NHWC)."""
        return reference.quantize_input(self.stages[0], np.asarray(x, dtype=np.float32))

    def run(self, x: Any, *, quantized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Early-exit inference in the reference interpreter: ``(int8 logits (N, classes),
        model exit index (N,))``; ``quantized``: ``x`` is already int8 (NHWC)."""
        q = np.asarray(x) if quantized else self.quantize_input(x)
        n = len(q)
        out = np.zeros((n, self.classes), np.int64)
        taken = np.full(n, self.exit_index[-1], np.int64)
        idx, h = np.arange(n), q
        for k, stage in enumerate(self.stages):
            h = reference.run_batch(stage, h)
            if k == len(self.heads):
                out[idx] = h.reshape(len(idx), -1)
                break
            logits = reference.run_batch(self.heads[k], h).reshape(len(idx), -1)
            done = confident(logits, self.tables[k], self.limits[k])
            out[idx[done]] = logits[done]
            taken[idx[done]] = self.exit_index[k]
            idx, h = idx[~done], h[~done]
            if idx.size == 0:
                break
        return out, taken

    def run_at(self, x: Any, n: int, *, quantized: bool = False) -> np.ndarray:
        """Exit ``n``'s int8 logits for every input, whatever its confidence."""
        h = np.asarray(x) if quantized else self.quantize_input(x)
        for stage in self.stages[: n + 1]:
            h = reference.run_batch(stage, h)
        if n < len(self.heads):
            h = reference.run_batch(self.heads[n], h)
        return h.reshape(len(h), -1)

    def dequantize(self, logits: np.ndarray, taken: np.ndarray) -> np.ndarray:
        """Float logits from the int8 logits of the exits ``taken`` (model exit indices)."""
        out = np.zeros(logits.shape, np.float64)
        for n, k in enumerate(self.exit_index):
            rows = taken == k
            g = self.logit_graph(n)
            out[rows] = reference.dequantize(g, g.output, logits[rows])
        return out


class _FixedInput:
    """A qparam source whose graph input takes given qparams (the previous graph's output)."""

    def __init__(self, inner: qparams.QParamSource, value: str, qp: spec.QParams) -> None:
        self.inner, self.value, self.qp = inner, value, qp

    def activation(self, value: str) -> spec.QParams:
        return self.qp if value == self.value else self.inner.activation(value)

    def weight(self, op: Any, weight: np.ndarray, axis: int | None) -> spec.QParams:
        return self.inner.weight(op, weight, axis)


def _output_qparams(graph: ir.Graph) -> spec.QParams:
    t = graph[graph.output]
    return spec.QParams(t.scale.copy(), t.zero_point.copy())


def _lower(module: nn.Module, calib: torch.Tensor, qp: spec.QParams | None, name: str):
    gm = trace.trace(module, calib)
    _, value, _ = trace.float_ops(gm)
    source: Any = qparams.CalibratedQParams(qparams.calibrate_ranges(gm, calib))
    if qp is not None:
        source = _FixedInput(source, value, qp)
    graph = lower(module, calib, source=source, name=name)
    if qp is not None and not np.array_equal(graph[graph.input].scale, qp.scale):
        raise ExportError(f"{name}: its input did not take the previous graph's qparams")
    return graph


def _check_head(model: ExitModel, k: int, feature: torch.Tensor) -> None:
    for m in model.heads[k].modules():
        if isinstance(m, nn.MaxPool2d) and m.ceil_mode:
            raise ExportError(
                f"exit {k} ({model.after[k]!r}): its head pools the {tuple(feature.shape[2:])} "
                f"features with a ceil-mode {m.kernel_size}x{m.kernel_size} max pool, which the "
                "int8 backends cannot lower; rebuild the exits with an Exits.pool whose window "
                "divides the feature map (e.g. a divisor of its height)"
            )


def quantize_exits(model: ExitModel, calib: torch.Tensor, *, name: str = "exits") -> Int8Exits:
    """The int8 graphs of ``model``'s stages and enabled exits, calibrated on ``calib``.

    Raises :class:`ExportError` for a criterion without an integer rule (``entropy``) or a
    head the int8 backends cannot lower, :class:`LoweringError` for unsupported layers.
    """
    if not isinstance(model, ExitModel):
        raise ExportError(f"quantize_exits needs an ExitModel (add_exits_), got {type(model)}")
    if model.criterion != "maxprob":
        raise ExportError(
            f"the C exits support criterion 'maxprob' only (an integer rule on int8 logits); "
            f"this model uses {model.criterion!r}: rebuild it with Exits(criterion='maxprob')"
        )
    if not isinstance(calib, torch.Tensor) or calib.dim() < 2 or len(calib) == 0:
        raise ExportError("quantize_exits: calib must be a non-empty batch of inputs (N, ...)")
    model.eval()
    thresholds = model.thresholds.tolist()
    enabled = [k for k, t in enumerate(thresholds) if t != math.inf]
    bounds = [*enabled, len(model.segments) - 1]
    result = Int8Exits([], [], bounds, [thresholds[k] for k in enabled])
    h, lo, qp = calib.float(), 0, None
    for n, hi in enumerate(bounds):
        part = nn.Sequential(*model.segments[lo : hi + 1]).eval()
        stage = _lower(part, h, qp, f"{name}_stage{n}")
        result.stages.append(stage)
        qp = _output_qparams(stage)
        with torch.no_grad():
            h = part(h)
        if n < len(enabled):
            _check_head(model, hi, h)
            head = _lower(model.heads[hi].eval(), h, qp, f"{name}_head{n}")
            result.heads.append(head)
            result.tables.append(exp_table(head[head.output].qscale))
            result.limits.append(exit_limit(thresholds[hi]))
        lo = hi + 1
    if result.classes >= (spec.INT32_MAX // ONE):
        raise ExportError(f"{result.classes} classes: the exit rule's int32 sum would overflow")
    return result
