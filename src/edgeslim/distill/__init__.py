"""Knowledge distillation (:mod:`.kd`): Hinton's soft targets and FitNets hints.

distill(student, teacher, data, KD(temperature=20, alpha=0.9))
finetune(model, data, TrainConfig(epochs=3, distill=KD()), teacher=before)
"""

from __future__ import annotations

from .._callable import make_callable
from .kd import KD, Distilling, distill, distillation, output_match_loss, soft_target_loss

make_callable(__name__, distill)  # edgeslim.distill(...) even when it is this package

__all__ = ["KD", "Distilling", "distill", "distillation", "output_match_loss", "soft_target_loss"]
