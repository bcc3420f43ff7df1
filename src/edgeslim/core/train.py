"""Training, fine-tuning and evaluation loops used by every stage.

Deterministic for a given seed: the shuffling order comes from a generator seeded
by ``seed`` and the epoch, and ``torch.manual_seed(seed)`` is set before training (dropout).
Pruning masks (see :mod:`edgeslim.prune.masks`) are kept: gradients of pruned weights are
zeroed before each step and the masks re-applied after it, so pruned weights stay exactly 0.

The loops run where the model is: each batch is moved whole to the model's device
(:func:`edgeslim.core.device.model_device`, or the device given as ``device=``, which moves
the model first); data in memory is indexed directly, a streamed split is read through a
``DataLoader`` in the same order. What "quality" and the loss are follows the data's
``metric`` (:mod:`edgeslim.core.metrics`): top-1 accuracy and cross-entropy by default,
squared error for a regression task (``metric: mse``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from rich.progress import TextColumn
from torch import nn

from edgeslim.core.data.datasets import DatasetSplit, DataSplits, Split
from edgeslim.core.device import model_device, to_device
from edgeslim.core.errors import ConfigError, DataError, ShapeError
from edgeslim.core.hooks import eval_mode
from edgeslim.core.kd import KD, distillation
from edgeslim.core.masks import apply_masks_, mask_grads_
from edgeslim.core.metrics import Metric, format_value, get_metric, regression_targets
from edgeslim.core.options import Options
from edgeslim.core.progress import enabled, progress_bar

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Device = torch.device | str | None
# step_hook(model, step, total_steps): called after every optimizer step (step counts from 1)
StepHook = Callable[[nn.Module, int, int], None]


class TrainConfig(Options):
    """Hyperparameters of :func:`fit` (and, with other defaults, :func:`finetune`)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, description="passes over the training split")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = Field("cosine", description="learning-rate decay")
    keep_best: bool = Field(True, description="restore the epoch with the best val accuracy")
    shift: int = Field(0, ge=0, description="augment: random translation by up to N pixels")
    seed: int = 0
    distill: KD | None = Field(None, description="distil from the teacher given to fit()")


FINETUNE_DEFAULTS = {"epochs": 3, "lr": 1e-4}


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    """Run one example; turn a shape mismatch into a ShapeError naming both shapes."""
    was_training = model.training
    model.eval()
    one = x[:1]
    try:
        with torch.inference_mode():
            _forward(model, to_device(one, model_device(model)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        shape = tuple(one.shape[1:]) if isinstance(one, torch.Tensor) else type(one).__name__
        raise ShapeError(
            f"{type(model).__name__} cannot run on inputs of shape {shape} "
            f"(with a batch dimension in front): {first}"
        ) from exc
    finally:
        model.train(was_training)


def outputs_of(out: Any) -> torch.Tensor:
    """The scores of a model's output: the tensor, a ``.logits`` field, or the first item."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ShapeError(f"cannot score a model output of type {type(out).__name__}")


def check_labels(y: Any, outputs: torch.Tensor, where: str, ignore: int | None = None) -> None:
    """Class labels ``y`` must index the model's outputs: a label outside 0..classes-1 is a
    DataError naming the data, the label and the class count (checked where ``y`` is, once per
    batch: on CPU data this is a min and a max over the batch)."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.numel() == 0:
        return
    classes = outputs.shape[-1] if outputs.dim() > 1 else 1
    valid = y if ignore is None else y[y != ignore]
    if valid.numel() == 0:
        return
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise DataError(
            f"{where}: label {bad} is out of range for a model with {classes} outputs "
            f"(classes 0..{classes - 1}); the data's labels and the model's classes disagree"
        )


def _forward(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def task_loss(metric: Metric) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss on data scored by ``metric``: cross-entropy, or squared error."""
    if metric.loss == "mse":
        return lambda out, y: F.mse_loss(out, regression_targets(out, y))

    def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.dim() > 2 and y.dim() == out.dim() - 1:  # (B, T, classes) against (B, T)
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    return cross_entropy


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero fill."""
    b, _, h, w = x.shape  # (B, C, H, W)
    s = max_shift
    padded = F.pad(x, (s, s, s, s))  # (B, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * s + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].to(x.device)  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].to(x.device)  # (B, 1, W)
    batch = torch.arange(b)[:, None, None].to(x.device)  # (B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def evaluate(
    model: nn.Module,
    data: DataSplits | Split | DatasetSplit,
    split: Literal["train", "val", "test"] = "test",
    batch_size: int = 500,
    *,
    metric: str | Metric | None = None,
    reference: nn.Module | None = None,
    device: Device = None,
) -> float:
    """The metric of ``model`` on a split (the test split by default): top-1 accuracy in
    [0, 1] unless ``metric`` (or, when None, the data's ``metric``) says otherwise.

    ``reference`` is the model ``cosine`` compares with (default: the data's ``reference``);
    it runs on its own device. ``device`` moves ``model`` there first; batches go to the
    model's device. See :mod:`edgeslim.core.metrics` for the metrics.
    """
    part = getattr(data, split) if isinstance(data, DataSplits) else data
    m = get_metric(metric if metric is not None else getattr(data, "metric", None))
    if reference is None:
        reference = getattr(data, "reference", None)
    if m.reference and reference is None:
        raise ConfigError(
            f"metric {m.name!r} compares with a reference model's outputs: pass reference=MODEL "
            "(in a recipe the baseline is the reference)"
        )
    if device is not None:
        model.to(device)
    dev = model_device(model)
    ref_dev = model_device(reference) if m.reference else None
    where = getattr(data, "name", None) or getattr(part, "where", "the data")
    _check_input(model, part.x)
    was_training = model.training
    model.eval()
    total, count = 0, 0
    try:
        with torch.inference_mode(), eval_mode(reference) if m.reference else nullcontext():
            for x, y in part.batches(batch_size):
                out = outputs_of(_forward(model, to_device(x, dev)))  # (B, classes)
                if m.labels:
                    check_labels(y, out, where, ignore=m.ignore)
                ref = None
                if m.reference:
                    ref = to_device(outputs_of(_forward(reference, to_device(x, ref_dev))), dev)
                t, c = m.batch(out, to_device(y, dev), ref)
                total += t
                count += c
    finally:
        model.train(was_training)
    if not count:
        return 0.0 if m.higher_is_better else float("nan")
    return m.finish(total / count)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    step_hook: StepHook | None = None,
    progress: bool | None = None,
    device: Device = None,
    **overrides: object,
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``data.train``; returns one dict per epoch.

    ``cfg`` fields may be overridden by keyword (``fit(model, data, epochs=5)``).
    ``loss_fn(logits, y, x)`` replaces the task's loss (cross-entropy, or squared error when
    the data's metric is ``mse``). With a ``teacher`` the loss is
    knowledge distillation as ``cfg.distill`` says (``KD()`` when unset; see
    :mod:`edgeslim.core.kd`), with ``loss_fn`` as its hard-label term.
    ``step_hook(model, step, total_steps)`` runs after every optimizer step (e.g. to prune
    on a schedule during training, see :class:`edgeslim.prune.AGPSchedule`).
    With ``keep_best`` the weights of the epoch with the best validation metric are
    restored at the end (ties keep the earlier epoch). Training runs on the model's device
    (``device`` moves the model there first); each batch is moved there whole, a teacher
    runs on its own device.
    """
    cfg = (cfg or TrainConfig()).model_copy(update=overrides)
    cfg = TrainConfig.model_validate(cfg.model_dump())  # validate the overrides too
    if device is not None:
        model.to(device)
    if cfg.distill is None and teacher is None:
        return _train(model, data, cfg, loss_fn, step_hook, progress, None)
    if teacher is None:
        raise ConfigError(
            "distill is set but no teacher was given: pass teacher=MODEL (in a recipe, the "
            "model before a stage teaches that stage's finetune)"
        )
    _check_input(model, data.train.x)
    torch.manual_seed(cfg.seed)  # the hint adapters' initial weights
    hook = None
    if step_hook is not None:  # the hook sees the student, not the wrapper with the adapters

        def hook(_trainee: nn.Module, step: int, total: int) -> None:
            step_hook(model, step, total)

    if loss_fn is None and get_metric(getattr(data, "metric", None)).loss == "mse":
        mse = task_loss(get_metric("mse"))
        loss_fn = lambda out, y, _x: mse(out, y)  # noqa: E731 (the regression hard loss)
    with distillation(model, teacher, cfg.distill or KD(), data.train.x[:2], loss_fn) as (
        trainee,
        kd_loss,
    ):
        return _train(trainee, data, cfg, kd_loss, hook, progress, teacher)


def _train(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    loss_fn: LossFn | None,
    step_hook: StepHook | None,
    progress: bool | None,
    teacher: nn.Module | None,
) -> list[dict[str, float]]:
    """The training loop of :func:`fit` (``cfg`` already validated)."""
    _check_input(model, data.train.x)
    torch.manual_seed(cfg.seed)
    metric = get_metric(getattr(data, "metric", None))
    task = task_loss(metric)
    classify = loss_fn is None and metric.loss == "cross_entropy"
    # what picks the best epoch: the data's metric; one that compares with a reference model
    # uses the data's reference, else the teacher, else (a baseline being trained) top-1
    val_metric, reference = metric, getattr(data, "reference", None)
    if metric.reference and reference is None:
        reference = teacher
        if reference is None:
            val_metric = get_metric("top1")
    dev = model_device(model)
    opt = _optimizer(model, cfg)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        (lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        if cfg.schedule == "cosine"
        else (lambda s: 1.0),
    )
    history: list[dict[str, float]] = []
    sign = 1.0 if val_metric.higher_is_better else -1.0
    best_score, best_state = -math.inf, None
    step = 0
    columns = TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]}")
    with progress_bar(columns, disable=not enabled(progress)) as bar:
        task_id = bar.add_task(
            "train", total=cfg.epochs * steps_per_epoch, loss=float("nan"), val="–"
        )
        for epoch in range(cfg.epochs):
            bar.update(task_id, description=f"epoch {epoch + 1}/{cfg.epochs}")
            model.train()
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
            loss_sum = 0.0
            # in memory: indexed directly; streamed: a DataLoader reads the same order
            for x, y in data.train.batches(cfg.batch_size, order, seed=cfg.seed + epoch):
                if cfg.shift:
                    x = random_shift(x, cfg.shift, g)  # (B, C, H, W), (B,)
                labels = y  # where the data is: checking them there costs no device sync
                x, y = to_device(x, dev), to_device(y, dev)
                logits = _forward(model, x)
                if loss_fn:
                    loss = loss_fn(logits, y, x)
                else:
                    out = outputs_of(logits)
                    if classify:
                        check_labels(labels, out, data.name)
                    loss = task(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                mask_grads_(model)
                opt.step()
                apply_masks_(model)
                sched.step()
                step += 1
                if step_hook is not None:
                    step_hook(model, step, total)
                loss_sum += loss.item() * len(y)
                bar.update(task_id, advance=1, loss=loss.item())
            val = evaluate(model, data, "val", metric=val_metric, reference=reference)
            entry: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / n, "val_accuracy": val}
            if val_metric.name != "top1":  # "val_accuracy" holds that metric, named here
                entry["metric"] = val_metric.name
            history.append(entry)
            bar.update(task_id, val=format_value(val_metric.name, val))
            if cfg.keep_best and sign * val > best_score:
                best_score, best_state = sign * val, copy.deepcopy(model.state_dict())
    if cfg.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def finetune(
    model: nn.Module, data: DataSplits, cfg: TrainConfig | None = None, **kwargs: object
) -> list[dict[str, float]]:
    """:func:`fit` with fine-tuning defaults (3 epochs at lr 1e-4) unless ``cfg`` is given;
    every other argument as for :func:`fit`."""
    return fit(model, data, cfg or TrainConfig(**FINETUNE_DEFAULTS), **kwargs)
