"""Early exits: classifier heads after chosen blocks; confident inputs stop there.

Surat Teerapittayanon, Bradley McDanel, H.T. Kung. "BranchyNet: Fast Inference via Early
Exiting from Deep Neural Networks", ICPR 2016. https://arxiv.org/abs/1709.01686

    model = es.zoo.create("lenet5"); es.fit(model, data)
    add_exits_(model, Exits(after=["conv1", "conv2"]))   # -> an ExitModel, in place
    train_exits(model, data, ExitTraining(epochs=5))       # joint loss + distillation
    calibrate_exits(model, data, ExitCalibration(max_loss=0.003))
    model(x)      # eval: each sample leaves at the first exit that is confident enough

The network is cut into segments after the named modules (:mod:`.segments`); each early exit
is a small head (max-pool to about ``pool x pool``, optionally a 3x3 conv of ``conv``
channels, a hidden layer of ``hidden`` units, the classes; ``hidden=0``: one Linear from the
pooled features to the classes, the cheapest head to run at batch 1). Joint training minimises
BranchyNet's weighted sum of the exits' losses; here each early exit also distils from the
final exit (Hinton's soft targets,
:func:`edgeslim.core.kd.soft_target_loss`). An exit is taken when its confidence -- the
largest softmax probability, or minus the entropy -- reaches the exit's threshold
(:mod:`.calibration` picks them on validation data).

Inference really stops: a batch shrinks as samples leave (the rest go on through the next
segment, a head whose threshold is unset is not run), and at batch 1 nothing after the exit
runs. While ``torch.export`` / ONNX tracing, ``forward`` is the static network (every
segment, no head), since control flow that depends on the data cannot be traced: use
:func:`edgeslim.export.exits.export_exits` to deploy the exits themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn.modules import module as _nn_module

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.kd import soft_target_loss
from edgeslim.core.options import Options
from edgeslim.core.train import TrainConfig, fit
from edgeslim.dynamic.segments import count_macs, split

Criterion = Literal["maxprob", "entropy"]


class Exits(Options):
    """Where to attach early exits and what their heads look like."""

    after: list[str] = Field(default_factory=list, description="module names, in forward order")
    hidden: int = Field(
        64, ge=0, description="hidden units of each head (0: no hidden layer, one Linear)"
    )
    pool: int = Field(4, ge=1, description="features are max-pooled to about pool x pool")
    conv: int = Field(0, ge=0, description="channels of a 3x3 conv after the pool (0: none)")
    criterion: Criterion = Field("maxprob", description="confidence: max softmax or -entropy")

    @model_validator(mode="after")
    def _some_exit(self) -> Exits:
        if not self.after:
            raise ValueError("'after' must name at least one module to attach an exit after")
        return self


class ExitTraining(Options):
    """Joint training of the exits (BranchyNet) with distillation from the final exit."""

    epochs: int = Field(5, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    weights: list[float] | None = Field(
        None, description="loss weight per exit, final last (default: all 1)"
    )
    distill: float = Field(0.5, ge=0, le=1, description="weight of soft targets from the final")
    temperature: float = Field(4.0, gt=0)
    backbone: Literal["train", "freeze"] = Field(
        "train", description="freeze: train the heads only (the final exit stays as it was)"
    )
    shift: int = Field(0, ge=0, description="augment: random translation by up to N pixels")
    seed: int = 0

    @field_validator("weights")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(w < 0 for w in v):
            raise ValueError("exit loss weights must be >= 0")
        return v


def _is_exporting() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _plain_calls() -> bool:
    """True when ``module.forward(x)`` may stand for ``module(x)`` on modules without hooks
    of their own: no global hooks are set and nothing is being traced."""
    m = _nn_module
    return not (
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def _direct(module: nn.Module, plain: bool):
    """``module.forward`` where calling it is what ``module(x)`` would do (``plain`` from
    :func:`_plain_calls`, and no hooks on the module, not compiled), else ``module``."""
    if (
        not plain
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module._compiled_call_impl is not None
    ):
        return module
    return module.forward


def confidence(logits: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """Per-sample confidence score (higher = surer): max softmax, or minus the entropy."""
    p = F.softmax(logits.float(), dim=-1)  # (B, classes)
    if criterion == "maxprob":
        return p.max(dim=-1).values
    return (p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)  # -entropy, in nats


def _classifier(features: int, classes: int, hidden: int) -> list[nn.Module]:
    """Linear -> ReLU -> Linear through ``hidden`` units, or one Linear when ``hidden`` is 0."""
    if hidden == 0:
        return [nn.Linear(features, classes)]
    return [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)]


def make_head(feature: torch.Tensor, classes: int, cfg: Exits) -> nn.Module:
    """An exit head for features like ``feature`` (B, C, H, W) or (B, F)."""
    if feature.dim() == 4:
        c, h, w = feature.shape[1:]
        k = max(1, math.ceil(max(h, w) / cfg.pool))  # a plain max pool: exports everywhere
        ceil = h % k != 0 or w % k != 0  # ceil mode only where it changes the result
        layers: list[nn.Module] = [nn.MaxPool2d(k, k, ceil_mode=ceil)]
        if cfg.conv:
            layers += [nn.Conv2d(c, cfg.conv, 3, padding=1), nn.ReLU()]
        with torch.no_grad():
            flat = nn.Sequential(*layers)(feature[:1]).numel()
        return nn.Sequential(*layers, nn.Flatten(), *_classifier(flat, classes, cfg.hidden))
    if feature.dim() == 2:
        return nn.Sequential(*_classifier(feature.shape[1], classes, cfg.hidden))
    raise ShapeError(f"an exit needs (B, C, H, W) or (B, F) features, got {tuple(feature.shape)}")


class ExitModel(nn.Module):
    """Segments plus early-exit heads; ``forward`` exits early in eval mode.

    ``thresholds[k]`` is exit k's threshold on :func:`confidence` (``inf``: never exit there,
    and its head is not run). After a forward pass in eval mode, ``last_exit`` holds the exit
    index each sample took (the final exit is ``len(heads)``).
    """

    def __init__(
        self, segments: list[nn.Module], heads: list[nn.Module], after: list[str], cfg: Exits
    ) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.after = list(after)
        self.criterion: Criterion = cfg.criterion
        self.register_buffer("thresholds", torch.full((len(heads),), math.inf))
        self.joint = False  # forward returns every exit's logits (set by joint_outputs)
        self.frozen = False  # backbone in eval mode and without gradients
        self._last_exit: torch.Tensor | int | None = None  # an int after a batch-1 pass
        self._cached: tuple[int, list[float]] | None = None

    @property
    def last_exit(self) -> torch.Tensor | None:
        """Exit index per sample (B,) of the last eval forward pass; ``None`` before one."""
        taken = self._last_exit
        if isinstance(taken, int):  # batch 1 keeps a plain int until someone asks
            taken = self._last_exit = torch.tensor([taken])
        return taken

    @property
    def num_exits(self) -> int:
        """Number of exits, the final one included."""
        return len(self.segments)

    def train(self, mode: bool = True) -> ExitModel:
        super().train(mode)
        if self.frozen:
            self.segments.eval()
        return self

    def all_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits on the whole batch: ``[(B, classes)] * num_exits``."""
        outs, h = [], x
        for k, segment in enumerate(self.segments):
            h = segment(h)
            outs.append(self.heads[k](h) if k < len(self.heads) else h)
        return outs

    def static(self, x: torch.Tensor) -> torch.Tensor:
        """The network without exits (the final exit's logits)."""
        for segment in self.segments:
            x = segment(x)
        return x

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Early-exit inference: ``(logits (B, classes), exit index (B,))``.

        Samples that exit are removed from the batch; the rest go on.
        """
        b = x.shape[0]
        last = len(self.heads)
        thresholds = self._threshold_list()
        if b == 1:
            logits, k = self._infer_one(x, thresholds)
            self._last_exit = taken = torch.tensor([k])
            return logits, taken
        out: torch.Tensor | None = None
        taken = torch.full((b,), last, dtype=torch.long)
        idx = torch.arange(b)
        h = x
        for k, segment in enumerate(self.segments):
            h = segment(h)
            if k == last:
                logits = h
                done = None
            else:
                t = thresholds[k]
                if t == math.inf:
                    continue
                logits = self.heads[k](h)
                done = confidence(logits, self.criterion) >= t  # (B_left,)
            if out is None:
                out = logits.new_empty((b, *logits.shape[1:]))
            if done is None:
                out[idx] = logits
                break
            if bool(done.any()):
                out[idx[done]] = logits[done]
                taken[idx[done]] = k
                keep = ~done
                idx, h = idx[keep], h[keep]
                if idx.numel() == 0:
                    break
        self._last_exit = taken
        return out, taken

    def _threshold_list(self) -> list[float]:
        """``thresholds`` as Python floats, cached until the buffer changes (its version)."""
        thresholds = self._buffers["thresholds"]  # (a dict lookup, not Module.__getattr__)
        version = thresholds._version
        if self._cached is None or self._cached[0] != version:
            self._cached = (version, thresholds.tolist())
        return self._cached[1]

    def _infer_one(self, x: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, int]:
        """Batch 1: ``(logits (1, classes), exit taken)``; a plain branch after each enabled
        exit, nothing after the one taken.

        The same ops as the batched path; only Python overhead is cut: segments and heads
        without hooks are called through ``forward`` (what ``nn.Module.__call__`` does for a
        module without hooks, minus its checks; global hooks and tracing are checked once),
        the max-prob test is one softmax, one max and one ``.item()`` (no dtype move for
        float32 logits), and the exit index stays an int (``last_exit`` makes the tensor).
        """
        h = x
        heads = self.heads
        last = len(heads)
        maxprob = self.criterion == "maxprob"
        plain = _plain_calls()
        for k, segment in enumerate(self.segments):
            h = _direct(segment, plain)(h)
            if k == last:
                break
            t = thresholds[k]
            if t == math.inf:
                continue
            logits = _direct(heads[k], plain)(h)
            if maxprob:
                f32 = logits if logits.dtype == torch.float32 else logits.float()
                score = f32.softmax(-1).max().item()
            else:
                score = float(confidence(logits, self.criterion))
            if score >= t:
                self._last_exit = k
                return logits, k
        self._last_exit = last
        return h, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.joint and self.training:
            return torch.stack(self.all_exits(x))  # (exits, B, classes)
        if self.training or _is_exporting():
            return self.static(x)
        if x.shape[0] == 1:  # the exit index stays an int until last_exit is read
            return self._infer_one(x, self._threshold_list())[0]
        return self.infer(x)[0]


def add_exits_(model: nn.Module, cfg: Exits, *, example: torch.Tensor | None = None) -> ExitModel:
    """Cut ``model`` after ``cfg.after`` and attach fresh exit heads; returns the ExitModel.

    The model's parameters are shared (not copied). ``example`` is an input batch used to
    size the heads (default: zeros of ``model.input_shape``).
    """
    segments = split(model, cfg.after, where="Exits.after")
    if example is None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ConfigError("add_exits_: pass example= (the model has no input_shape)")
        example = torch.zeros(1, *shape)
    feats, h = [], example[:1]
    with torch.no_grad():
        for k, segment in enumerate(segments):
            try:
                h = segment(h)
            except RuntimeError as exc:
                where = f"add_exits_: segment {k} cannot run on the example of shape"
                raise ShapeError.from_torch(f"{where} {tuple(example.shape)}", exc) from exc
            feats.append(h)
    final = feats[-1]
    if final.dim() != 2:
        raise ShapeError(
            f"add_exits_: the model must output (B, classes), got {tuple(final.shape)}"
        )
    classes = final.shape[1]
    heads = [make_head(f, classes, cfg) for f in feats[:-1]]
    exit_model = ExitModel(segments, heads, cfg.after, cfg)
    exit_model.input_shape = tuple(example.shape[1:])
    exit_model.num_classes = classes
    return exit_model.eval()


@contextmanager
def joint_outputs(model: ExitModel) -> Iterator[ExitModel]:
    """While inside, ``model(x)`` in training mode returns every exit's logits
    ``(exits, B, classes)`` (eval mode still exits early)."""
    model.joint = True
    try:
        yield model
    finally:
        model.joint = False


def exit_loss(stacked: torch.Tensor, y: torch.Tensor, cfg: ExitTraining) -> torch.Tensor:
    """BranchyNet's weighted sum of per-exit losses; early exits also distil from the last."""
    n = stacked.shape[0]
    weights = cfg.weights or [1.0] * n
    final = stacked[-1]
    loss = weights[-1] * F.cross_entropy(final, y)
    for k in range(n - 1):
        term = (1 - cfg.distill) * F.cross_entropy(stacked[k], y)
        if cfg.distill > 0:
            term = term + cfg.distill * soft_target_loss(
                stacked[k], final.detach(), cfg.temperature
            )
        loss = loss + weights[k] * term
    return loss


def train_exits(
    model: ExitModel, data: DataSplits, cfg: ExitTraining | None = None, *, progress=None
) -> list[dict[str, float]]:
    """Train the exits jointly (in place); returns :func:`edgeslim.fit`'s history.

    The best epoch is chosen by the mean validation accuracy over all exits.
    """
    cfg = cfg or ExitTraining()
    if not isinstance(model, ExitModel):
        raise ConfigError(f"train_exits: expected an ExitModel (add_exits_), got {type(model)}")
    if cfg.weights is not None and len(cfg.weights) != model.num_exits:
        raise ConfigError(
            f"ExitTraining.weights: {len(cfg.weights)} weights for {model.num_exits} exits "
            "(give one per exit, the final exit last)"
        )
    model.frozen = cfg.backbone == "freeze"
    for p in model.segments.parameters():
        p.requires_grad_(not model.frozen)
    tc = TrainConfig(
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, shift=cfg.shift,
        seed=cfg.seed, keep_best=False,
    )  # fmt: skip
    try:
        with joint_outputs(model):
            history = fit(
                model, data, tc, progress=progress,
                loss_fn=lambda out, y, _x: exit_loss(out, y, cfg),
            )  # fmt: skip
    finally:
        for p in model.segments.parameters():
            p.requires_grad_(True)
        model.frozen = False
    model.eval()
    return history


def exit_accuracies(model: ExitModel, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy of every exit on its own (every sample forced through it)."""
    with torch.no_grad():
        outs = batched_exits(model, x)
    return [float((o.argmax(-1) == y).float().mean()) for o in outs]


def batched_exits(model: ExitModel, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Every exit's logits on ``x``, in eval mode: ``(exits, N, classes)``."""
    was = model.training
    model.eval()
    with torch.no_grad():
        parts = [
            torch.stack(model.all_exits(x[i : i + batch_size]))
            for i in range(0, len(x), batch_size)
        ]
    model.train(was)
    return torch.cat(parts, dim=1)


def exit_costs(model: ExitModel, example: torch.Tensor) -> dict[str, list[int]]:
    """MACs per sample of each segment and each head (counted by running them at batch 1)."""
    seg, head = [], []
    h = example[:1]
    with torch.no_grad():
        for k, segment in enumerate(model.segments):
            seg.append(count_macs(segment, h))
            h = segment(h)
            if k < len(model.heads):
                head.append(count_macs(model.heads[k], h))
    return {"segments": seg, "heads": head}
