"""Task metrics: what "quality" means for a model, by name.

    metric = get_metric("top5")
    total, count = metric.batch(outputs, labels, None)     # one batch
    value = metric.finish(total / count)                    # the split's value

=============  ============================================================  ======  ==========
name           value on a split                                              better  loss
=============  ============================================================  ======  ==========
``top1``       fraction of examples whose largest output is the label        higher  cross-ent.
               (the default; ``accuracy`` is the same metric)
``top5``       fraction whose label is among the 5 largest outputs           higher  cross-ent.
``mse``        mean squared error between outputs and float targets          lower   MSE
               (regression)
``cosine``     mean cosine similarity between each example's output and a    higher  cross-ent.
               reference model's (the baseline, or a teacher)
``perplexity`` exp(mean cross-entropy of the outputs against the labels)     lower   cross-ent.
``py:M:F``     ``F(outputs, targets)`` from module ``M``: the batch's mean,  F's     F's
               averaged over the split weighted by batch size
=============  ============================================================  ======  ==========

The "loss" column is what :func:`edgeslim.fit` / :func:`edgeslim.finetune` minimise on data
whose metric this is (a regression task trains on the squared error). A ``py:`` function may
say ``F.higher_is_better = False`` and ``F.loss = "mse"`` (defaults: True, cross-entropy), or
``F`` may be a :class:`Metric` itself.

Every metric works batch by batch -- ``batch(outputs, targets, reference_outputs)`` returns a
``(total, count)`` pair whose sums over the batches give ``total / count`` -- so a dataset is
evaluated as it streams. Outputs are the model's (a tensor, or a ``.logits`` / first element);
sequence outputs ``(B, T, classes)`` with labels ``(B, T)`` are scored per position.

This module imports torch only inside the metric functions: the report (which must not import
torch) reads :func:`display` from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edgeslim.core.errors import ConfigError

BatchFn = Callable[[Any, Any, Any], tuple[float, int]]
IGNORE_INDEX = -100  # a label that perplexity skips (torch's cross_entropy convention)


def _identity(value: float) -> float:
    return value


@dataclass(frozen=True)
class Metric:
    """A metric: how to score one batch, how to finish the mean, and what it implies.

    - ``batch(outputs, targets, reference_outputs) -> (total, count)``;
    - ``finish(total / count)``: the split's value (``exp`` for perplexity);
    - ``higher_is_better``: which way "better" points (keeping the best epoch, reports);
    - ``loss``: what training minimises on such data (``cross_entropy`` or ``mse``);
    - ``labels``: targets are class indices, checked against the model's outputs;
    - ``reference``: needs a reference model's outputs (``cosine``);
    - ``unit``: how reports show it: ``%`` (a fraction as a percentage), ``ppl`` or plain;
    - ``label``: the name reports print (default ``name``); ``ignore``: a label value skipped.
    """

    name: str
    batch: BatchFn
    finish: Callable[[float], float] = _identity
    higher_is_better: bool = True
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    labels: bool = True
    reference: bool = False
    unit: Literal["%", "ppl", ""] = "%"
    label: str = ""
    ignore: int | None = None

    @property
    def title(self) -> str:
        """The name reports print (``accuracy`` for top-1)."""
        return self.label or self.name


# --------------------------------------------------------------------------------------
# the built-in metrics (each: outputs, targets, reference outputs -> (total, count))
# --------------------------------------------------------------------------------------


def _flat_scores(outputs: Any, targets: Any) -> tuple[Any, Any]:
    """Outputs (N, classes) and labels (N,): sequence outputs are flattened per position."""
    if outputs.dim() > 2 and targets.dim() == outputs.dim() - 1:
        return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
    return outputs, targets


def _top1(outputs: Any, targets: Any, _ref: Any) -> tuple[int, int]:
    outputs, targets = _flat_scores(outputs, targets)
    return int((outputs.argmax(-1) == targets).sum()), len(targets)


def _top5(outputs: Any, targets: Any, _ref: Any) -> tuple[int, int]:
    outputs, targets = _flat_scores(outputs, targets)
    k = min(5, outputs.shape[-1])
    hits = (outputs.topk(k, dim=-1).indices == targets[:, None]).any(-1)
    return int(hits.sum()), len(targets)


def regression_targets(outputs: Any, targets: Any) -> Any:
    """Float targets shaped and typed like ``outputs`` ((B,) targets for (B, 1) outputs)."""
    targets = targets.to(outputs.dtype)
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    return targets


def _mse(outputs: Any, targets: Any, _ref: Any) -> tuple[float, int]:
    diff = outputs.float() - regression_targets(outputs, targets).float()
    return float(diff.pow(2).sum()), diff.numel()


def _cosine(outputs: Any, _targets: Any, ref: Any) -> tuple[float, int]:
    import torch.nn.functional as F

    a, b = outputs.flatten(1).float(), ref.flatten(1).float()
    return float(F.cosine_similarity(a, b, dim=-1).sum()), len(a)


def _perplexity(outputs: Any, targets: Any, _ref: Any) -> tuple[float, int]:
    import torch.nn.functional as F

    outputs, targets = _flat_scores(outputs, targets)
    nll = F.cross_entropy(outputs.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
    return float(nll), int((targets != IGNORE_INDEX).sum())


def _exp(value: float) -> float:
    import math

    return math.exp(value)


METRICS: dict[str, Metric] = {
    "top1": Metric("top1", _top1, label="accuracy"),
    "top5": Metric("top5", _top5, label="top-5 accuracy"),
    "mse": Metric(
        "mse", _mse, higher_is_better=False, loss="mse", labels=False, unit="", label="MSE"
    ),
    "cosine": Metric("cosine", _cosine, labels=False, reference=True, unit=""),
    "perplexity": Metric(
        "perplexity",
        _perplexity,
        finish=_exp,
        higher_is_better=False,
        unit="ppl",
        ignore=IGNORE_INDEX,
    ),
}
ALIASES = {"accuracy": "top1", "top-1": "top1", "top-5": "top5"}
# metrics that other tasks compute themselves (text tasks): shown like these
_DISPLAY_ONLY = {"embedding_cosine": ("%", True, "embedding_cosine")}


def names() -> list[str]:
    """The built-in metric names (besides ``py:module:function``)."""
    return sorted(METRICS)


def check_name(name: str) -> str:
    """``name`` if it is a built-in metric, an alias of one or ``py:module:function``, else a
    :class:`ConfigError` listing the choices (nothing is imported)."""
    if name in METRICS or name in ALIASES:
        return name
    if name.startswith("py:"):
        module, sep, attr = name[3:].partition(":")
        if sep and module and attr:
            return name
        raise ConfigError(f"metric {name!r} must look like 'py:package.module:function'")
    raise ConfigError(
        f"unknown metric {name!r}; known: {', '.join(names())} or 'py:package.module:function'"
    )


def get_metric(name: str | Metric | None) -> Metric:
    """The :class:`Metric` called ``name`` (None: ``top1``); ``py:module:function`` imports the
    module and wraps the function (see the module docstring)."""
    if isinstance(name, Metric):
        return name
    name = check_name(name or "top1")
    if not name.startswith("py:"):
        return METRICS[ALIASES.get(name, name)]
    return _py_metric(name)


def _py_metric(name: str) -> Metric:
    module_name, _, attr = name[3:].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"metric {name!r}: cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if isinstance(fn, Metric):
        return fn
    if fn is None or not callable(fn):
        raise ConfigError(f"metric {name!r}: {module_name} has no callable {attr!r}")
    loss = getattr(fn, "loss", "cross_entropy")
    if loss not in ("cross_entropy", "mse"):
        raise ConfigError(f"metric {name!r}: {attr}.loss must be 'cross_entropy' or 'mse'")

    def batch(outputs: Any, targets: Any, _ref: Any) -> tuple[float, int]:
        n = len(outputs)
        return float(fn(outputs, targets)) * n, n

    return Metric(
        name,
        batch,
        higher_is_better=bool(getattr(fn, "higher_is_better", True)),
        loss=loss,
        labels=False,
        unit="",
    )


def display(name: str | None, higher_is_better: bool | None = None) -> tuple[str, bool, str]:
    """``(unit, higher_is_better, title)`` of a metric name for reports, without importing
    anything (a ``py:`` metric shows as a plain number; ``higher_is_better`` as recorded)."""
    name = name or "top1"
    name = ALIASES.get(name, name)
    if name in METRICS:
        m = METRICS[name]
        return m.unit, m.higher_is_better, m.title
    if name in _DISPLAY_ONLY:
        return _DISPLAY_ONLY[name]
    return "", True if higher_is_better is None else bool(higher_is_better), name


def format_value(name: str | None, value: float, digits: int = 2) -> str:
    """A metric's value as reports print it: ``97.40%``, ``12.31 ppl``, ``0.0123``."""
    unit = display(name)[0]
    if unit == "%":
        return f"{100 * value:.{digits}f}%"
    if unit == "ppl":
        return f"{value:.{digits}f} ppl"
    return f"{value:.{digits + 2}g}"
