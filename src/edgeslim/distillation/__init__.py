"""Knowledge distillation: train a student on a teacher's soft targets (Hinton et al. 2015).

The losses (soft targets at temperature T, FitNets hints through 1x1 adapters) live in
:mod:`edgeslim.core.kd`, since every training loop can distil (``TrainConfig(distill=KD())``);
this package is the verb::

    distill(student, teacher, data, KD(temperature=20, alpha=0.9))
    finetune(model, data, TrainConfig(epochs=3, distill=KD()), teacher=before)
"""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.kd import KD, Distilling, distillation, output_match_loss, soft_target_loss
from edgeslim.core.train import TrainConfig, fit

__all__ = ["KD", "Distilling", "distill", "distillation", "output_match_loss", "soft_target_loss"]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: DataSplits,
    cfg: KD | None = None,
    train: TrainConfig | None = None,
    *,
    progress: bool | None = None,
    device: torch.device | str | None = None,
    **overrides: object,
) -> list[dict[str, float]]:
    """Train ``student`` in place on ``data`` with ``teacher``'s knowledge; one dict per epoch.

    ``cfg`` defaults to ``KD()`` (T = 4, alpha = 0.7); ``train`` (a :class:`TrainConfig`,
    default ``TrainConfig()``) and keyword ``overrides`` set the training loop, as in
    :func:`edgeslim.fit`. The teacher is not changed. The student trains on its device
    (``device`` moves it there first), the teacher runs on its own: batches are moved whole.
    """
    train = (train or TrainConfig()).model_copy(update={"distill": cfg or KD()})
    return fit(student, data, train, teacher=teacher, progress=progress, device=device, **overrides)
