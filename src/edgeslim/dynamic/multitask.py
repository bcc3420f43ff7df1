"""One backbone, several tasks: a shared trunk and one head per task (hard parameter sharing).

Rich Caruana. "Multitask Learning", Machine Learning 28, 1997.
https://doi.org/10.1023/A:1007379606734

Two tasks that read the same input (the digit, and its parity) need not run two networks:
``add_heads(model, Heads(after="fc1", tasks={"digit": "label", "parity": "parity"}))`` cuts
``model`` after ``after`` (:mod:`.segments`); the part before is the shared trunk, and every
task gets its own copy of the part after, whose last ``nn.Linear`` is resized to the task's
classes (the first task whose labels are the model's own keeps the trained layer).
:func:`train_heads` trains trunk and heads jointly on the sum of the tasks' losses.

``forward`` returns the first task's logits (so accuracy, profiling and the pipeline treat
it like any classifier); :meth:`MultiHead.forward_all` returns every task's logits. Task
labels are derived from the dataset's labels: ``label`` (as is), ``parity`` (y % 2),
``gt4`` (y > 4), or any function given to :func:`train_heads` / :func:`task_accuracy`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options
from edgeslim.core.train import TrainConfig, fit
from edgeslim.dynamic.segments import split

__all__ = ["DERIVED", "Heads", "MultiHead", "add_heads", "task_accuracy", "train_heads"]

Target = Callable[[torch.Tensor], torch.Tensor]
DERIVED: dict[str, tuple[Target, int | None]] = {
    "label": (lambda y: y, None),  # None: the model's own number of classes
    "parity": (lambda y: y % 2, 2),
    "gt4": (lambda y: (y > 4).long(), 2),
}


class Heads(Options):
    """Where the trunk ends and which tasks get a head."""

    after: str = Field("", description="the last module of the shared trunk")
    tasks: dict[str, Literal["label", "parity", "gt4"]] = Field(
        default_factory=dict, description="task name -> how its labels derive from the data's"
    )

    @model_validator(mode="after")
    def _required(self) -> Heads:
        if not self.after:
            raise ValueError("'after' must name the last module of the shared trunk")
        if not self.tasks:
            raise ValueError("'tasks' must name at least one task")
        return self


class MultiHead(nn.Module):
    """A shared trunk and one head per task."""

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module], kinds: dict[str, str]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)
        self.kinds = dict(kinds)
        self.joint = False

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every task's logits ``{task: (B, classes)}``; the trunk runs once."""
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.joint and self.training:  # for train_heads: every task, side by side
            return torch.cat(list(self.forward_all(x).values()), dim=1)
        return self.heads[self.tasks[0]](self.trunk(x))


def _last_linear(module: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError("Heads.after: the part after the trunk has no nn.Linear to resize")
    return found[-1]


def add_heads(model: nn.Module, cfg: Heads) -> MultiHead:
    """Cut ``model`` after ``cfg.after``: a shared trunk and one head per task (module doc)."""
    trunk, tail = split(model, [cfg.after], where="Heads.after")
    own = getattr(model, "num_classes", None)
    heads, kept = {}, False
    for name, kind in cfg.tasks.items():
        head = copy.deepcopy(tail)
        lname, linear = _last_linear(head)
        classes = DERIVED[kind][1] or own or linear.out_features
        if kind == "label" and not kept and classes == linear.out_features:
            kept = True  # the trained classifier serves this task as it is
        else:
            new = nn.Linear(linear.in_features, classes, bias=linear.bias is not None)
            parent, _, attr = lname.rpartition(".")
            setattr(head.get_submodule(parent) if parent else head, attr, new)
        heads[name] = head
    mh = MultiHead(trunk, heads, dict(cfg.tasks))
    mh.input_shape = getattr(model, "input_shape", None)
    mh.num_classes = _last_linear(heads[next(iter(heads))])[1].out_features
    return mh


def _targets(mh: MultiHead, targets: dict[str, Target] | None) -> dict[str, Target]:
    out = {t: DERIVED[k][0] for t, k in mh.kinds.items()}
    for name, fn in (targets or {}).items():
        if name not in out:
            raise ConfigError(f"targets: no task {name!r}; tasks are {mh.tasks}")
        out[name] = fn
    return out


def train_heads(
    mh: MultiHead,
    data: DataSplits,
    cfg: TrainConfig | None = None,
    *,
    weights: dict[str, float] | None = None,
    targets: dict[str, Target] | None = None,
    progress: bool | None = None,
) -> list[dict[str, float]]:
    """Train trunk and heads on the weighted sum of the tasks' cross-entropies (in place).

    The best epoch (``keep_best``) is judged on the first task's validation accuracy.
    """
    fns = _targets(mh, targets)
    weights = weights or {}
    unknown = set(weights) - set(mh.tasks)
    if unknown:
        raise ConfigError(f"weights: no task(s) {sorted(unknown)}; tasks are {mh.tasks}")
    sizes = [head_out(mh, t) for t in mh.tasks]

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(logits, sizes, dim=1)
        return sum(
            weights.get(t, 1.0) * F.cross_entropy(p, fns[t](y))
            for t, p in zip(mh.tasks, parts, strict=True)
        )

    mh.joint = True
    try:
        return fit(mh, data, cfg or TrainConfig(), loss_fn=loss_fn, progress=progress)
    finally:
        mh.joint = False


def head_out(mh: MultiHead, task: str) -> int:
    """Number of classes of ``task``'s head."""
    return _last_linear(mh.heads[task])[1].out_features


def task_accuracy(
    mh: MultiHead, x: torch.Tensor, y: torch.Tensor, targets: dict[str, Target] | None = None
) -> dict[str, float]:
    """Accuracy per task on ``(x, y)`` (task labels derived from ``y``)."""
    fns = _targets(mh, targets)
    was = mh.training
    mh.eval()
    correct = dict.fromkeys(mh.tasks, 0)
    with torch.no_grad():
        for i in range(0, len(x), 500):
            outs = mh.forward_all(x[i : i + 500])
            for t, logits in outs.items():
                correct[t] += int((logits.argmax(1) == fns[t](y[i : i + 500])).sum())
    mh.train(was)
    return {t: c / max(1, len(x)) for t, c in correct.items()}
