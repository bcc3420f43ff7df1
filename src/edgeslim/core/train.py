"""Training, fine-tuning and evaluation loops used by every stage.

Deterministic on CPU for a given seed: the shuffling order comes from a generator seeded
by ``seed`` and the epoch, and ``torch.manual_seed(seed)`` is set before training (dropout).
Pruning masks (see :mod:`edgeslim.prune.masks`) are kept: gradients of pruned weights are
zeroed before each step and the masks re-applied after it, so pruned weights stay exactly 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from rich.progress import TextColumn
from torch import nn

from edgeslim.core.data.datasets import DataSplits, Split
from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.kd import KD, distillation
from edgeslim.core.masks import apply_masks_, mask_grads_
from edgeslim.core.options import Options
from edgeslim.core.progress import enabled, progress_bar

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
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
    try:
        with torch.inference_mode():
            model(x[:1])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ShapeError(
            f"{type(model).__name__} cannot run on inputs of shape {tuple(x.shape[1:])} "
            f"(with a batch dimension in front): {first}"
        ) from exc
    finally:
        model.train(was_training)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero fill."""
    b, _, h, w = x.shape  # (B, C, H, W)
    s = max_shift
    padded = F.pad(x, (s, s, s, s))  # (B, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * s + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]  # (B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def evaluate(
    model: nn.Module,
    data: DataSplits | Split,
    split: Literal["train", "val", "test"] = "test",
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on a split (the test split by default)."""
    part = getattr(data, split) if isinstance(data, DataSplits) else data
    _check_input(model, part.x)
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(part), batch_size):
            logits = model(part.x[i : i + batch_size])  # (B, classes)
            correct += int((logits.argmax(1) == part.y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(part))


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
    **overrides: object,
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``data.train``; returns one dict per epoch.

    ``cfg`` fields may be overridden by keyword (``fit(model, data, epochs=5)``).
    ``loss_fn(logits, y, x)`` replaces cross-entropy. With a ``teacher`` the loss is
    knowledge distillation as ``cfg.distill`` says (``KD()`` when unset; see
    :mod:`edgeslim.core.kd`), with ``loss_fn`` as its hard-label term.
    ``step_hook(model, step, total_steps)`` runs after every optimizer step (e.g. to prune
    on a schedule during training, see :class:`edgeslim.prune.AGPSchedule`).
    With ``keep_best`` the weights of the epoch with the best validation accuracy are
    restored at the end (ties keep the earlier epoch).
    """
    cfg = (cfg or TrainConfig()).model_copy(update=overrides)
    cfg = TrainConfig.model_validate(cfg.model_dump())  # validate the overrides too
    if cfg.distill is None and teacher is None:
        return _train(model, data, cfg, loss_fn, step_hook, progress)
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

    with distillation(model, teacher, cfg.distill or KD(), data.train.x[:2], loss_fn) as (
        trainee,
        kd_loss,
    ):
        return _train(trainee, data, cfg, kd_loss, hook, progress)


def _train(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    loss_fn: LossFn | None,
    step_hook: StepHook | None,
    progress: bool | None,
) -> list[dict[str, float]]:
    """The training loop of :func:`fit` (``cfg`` already validated)."""
    _check_input(model, data.train.x)
    torch.manual_seed(cfg.seed)
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
    best_acc, best_state = -1.0, None
    step = 0
    columns = TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]}")
    with progress_bar(columns, disable=not enabled(progress)) as bar:
        task = bar.add_task("train", total=cfg.epochs * steps_per_epoch, loss=float("nan"), val="–")
        for epoch in range(cfg.epochs):
            bar.update(task, description=f"epoch {epoch + 1}/{cfg.epochs}")
            model.train()
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
            loss_sum = 0.0
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x, y = data.train.x[idx], data.train.y[idx]  # (B, C, H, W), (B,)
                if cfg.shift:
                    x = random_shift(x, cfg.shift, g)
                logits = model(x)
                loss = loss_fn(logits, y, x) if loss_fn else F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                mask_grads_(model)
                opt.step()
                apply_masks_(model)
                sched.step()
                step += 1
                if step_hook is not None:
                    step_hook(model, step, total)
                loss_sum += loss.item() * len(idx)
                bar.update(task, advance=1, loss=loss.item())
            val_acc = evaluate(model, data, "val")
            history.append({"epoch": epoch + 1, "loss": loss_sum / n, "val_accuracy": val_acc})
            bar.update(task, val=f"{100 * val_acc:.2f}%")
            if cfg.keep_best and val_acc > best_acc:
                best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
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
