"""Training the supernet once: the sandwich rule with in-place distillation, resumable.

BigNAS / slimmable networks (Yu et al. 2019, "Universally Slimmable Networks and Improved
Training Techniques", https://arxiv.org/abs/1903.05134; Yu et al. 2020, "BigNAS",
https://arxiv.org/abs/2003.11142), as Once-for-All's progressive shrinking is replaced by
in later work: every step trains

- the **largest** sub-network on the labels (at the largest resolution),
- the **smallest** one and ``random`` uniformly sampled ones on the largest's soft
  predictions (**in-place distillation**: ``T^2 KL`` at temperature ``temperature``, the
  teacher's logits detached), each at its own resolution,

with the gradients of all of them summed into one optimizer step (Adam, cosine decay).

Deterministic for a seed: the batch order comes from a generator seeded by (seed, epoch),
the sampled sub-networks from one seeded by (seed, step). With ``checkpoint`` the whole
state (weights, BatchNorm statistics, optimizer, history) is written atomically after
every epoch; calling again with the same file resumes after the last finished epoch and
ends with the same weights, bit for bit, as an uninterrupted run in one process.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from rich.progress import TextColumn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import CheckpointError, ConfigError, RunDirError
from edgeslim.core.fileio import atomic_path
from edgeslim.core.kd import soft_target_loss
from edgeslim.core.options import Options
from edgeslim.core.progress import enabled, progress_bar
from edgeslim.nas.supernet import SubnetConfig, Supernet

__all__ = ["SandwichTraining", "sandwich_configs", "train_supernet"]


class SandwichTraining(Options):
    """Hyperparameters of :func:`train_supernet`."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(6, ge=0, description="passes over the training split")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (Adam, cosine decay)")
    batch_size: int = Field(64, ge=1)
    random: int = Field(2, ge=0, description="random sub-networks per step")
    temperature: float = Field(1.0, gt=0, description="in-place distillation temperature")
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0


def sandwich_configs(supernet: Supernet, step: int, cfg: SandwichTraining) -> list[SubnetConfig]:
    """The sub-networks of ``step``: largest, smallest, then ``cfg.random`` random ones."""
    spec = supernet.spec
    rng = random.Random(cfg.seed * 1_000_003 + step)
    return [spec.largest(), spec.smallest()] + [spec.sample(rng) for _ in range(cfg.random)]


def _lr(cfg: SandwichTraining, step: int, total: int) -> float:
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def train_supernet(
    supernet: Supernet,
    data: DataSplits,
    cfg: SandwichTraining | None = None,
    *,
    checkpoint: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool | None = None,
) -> list[dict[str, float]]:
    """Train ``supernet`` in place on ``data.train`` (see the module docstring).

    ``checkpoint``: a file the state is saved to after every epoch and resumed from (a file
    of another training -- different settings or supernet -- is a :class:`RunDirError`).
    ``stop_after`` ends after that many epochs of *this call* (an interruption, for tests).
    Returns one dict per epoch: loss of the largest, seconds.
    """
    cfg = cfg or SandwichTraining()
    if not isinstance(data, DataSplits):
        raise ConfigError(f"data must be a DataSplits (es.load_data), got {type(data).__name__}")
    shape = tuple(data.train.x.shape[1:])
    if len(shape) != 3 or shape[0] != supernet.spec.in_channels:
        raise ConfigError(
            f"train_supernet: inputs of shape {shape}; the supernet takes "
            f"({supernet.spec.in_channels}, H, W) images"
        )
    opt = torch.optim.Adam(supernet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    start_epoch = 0
    meta = {"settings": cfg.model_dump(), "spec": supernet.spec.to_dict(), "n": len(data.train)}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        try:
            saved = torch.load(path, weights_only=True)  # tensors and plain data only
            same = saved["meta"] == meta
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read the supernet checkpoint ({exc})") from exc
        if not same:
            raise RunDirError(
                f"{path} is the checkpoint of another supernet training (settings, space or "
                "data differ); use another run directory or delete it"
            )
        supernet.load_state_dict(saved["state"])
        opt.load_state_dict(saved["optimizer"])
        history = list(saved["history"])
        start_epoch = len(history)
    n = len(data.train)
    steps = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps
    columns = TextColumn("loss {task.fields[loss]:.4f}")
    done_here = 0
    with progress_bar(columns, disable=not enabled(progress)) as bar:
        task = bar.add_task(
            "supernet", total=total, completed=start_epoch * steps, loss=float("nan")
        )
        for epoch in range(start_epoch, cfg.epochs):
            if stop_after is not None and done_here >= stop_after:
                break
            bar.update(task, description=f"supernet epoch {epoch + 1}/{cfg.epochs}")
            started = time.perf_counter()
            supernet.train()
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
            loss_sum = 0.0
            for b in range(steps):
                step = epoch * steps + b
                for group in opt.param_groups:
                    group["lr"] = _lr(cfg, step, total)
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x, y = data.train.x[idx], data.train.y[idx]
                opt.zero_grad(set_to_none=True)
                teacher = None
                for i, sub in enumerate(sandwich_configs(supernet, step, cfg)):
                    logits = supernet(x, sub)
                    if i == 0:
                        loss = F.cross_entropy(logits, y)
                        teacher = logits.detach()
                        loss_sum += loss.item() * len(y)
                    else:
                        loss = soft_target_loss(logits, teacher, cfg.temperature)
                    loss.backward()
                opt.step()
                bar.update(task, advance=1, loss=loss_sum / ((b + 1) * cfg.batch_size))
            history.append(
                {"epoch": epoch + 1, "loss": loss_sum / n, "seconds": time.perf_counter() - started}
            )
            done_here += 1
            if path is not None:
                _save(path, supernet, opt, history, meta)
    supernet.eval()
    return history


def _save(path: Path, supernet: Supernet, opt: torch.optim.Optimizer, history, meta) -> None:
    state: dict[str, Any] = {
        "meta": meta,
        "state": supernet.state_dict(),
        "optimizer": opt.state_dict(),
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
