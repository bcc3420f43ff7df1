"""Knowledge distillation: Hinton's soft targets, and FitNets hints with 1x1 adapters.

Geoffrey Hinton, Oriol Vinyals, Jeff Dean. "Distilling the Knowledge in a Neural Network",
NIPS 2014 Deep Learning Workshop. https://arxiv.org/abs/1503.02531

Adriana Romero, Nicolas Ballas, Samira Ebrahimi Kahou, Antoine Chassang, Carlo Gatta, Yoshua
Bengio. "FitNets: Hints for Thin Deep Nets", ICLR 2015. https://arxiv.org/abs/1412.6550

The student's loss on a batch ``x`` with labels ``y``::

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))          soft targets
         + (1 - alpha) * CE(s, y)                                        hard labels
         + hint_weight * sum_hints MSE(adapter(student_feature), teacher_feature)

with ``s``, ``t`` the student's and the teacher's logits on the same (augmented) ``x``. The
T^2 factor keeps the soft-target gradients at the same scale whatever T (Hinton et al.,
sec. 2). For models whose output is an embedding rather than logits, ``soft: cosine`` or
``soft: mse`` matches the output vectors instead (T unused).

A hint pairs a student layer with a teacher layer; a trainable adapter maps the student's
feature to the teacher's width (a 1x1 convolution for (B, C, H, W) features, a linear layer
for (B, ..., C)), as FitNets' regressor does. Unlike FitNets' two-stage schedule, hints and
soft targets are trained jointly; the adapters are discarded afterwards.

Distillation is an option of every training loop: ``TrainConfig.distill`` (a :class:`KD`)
plus ``teacher=`` in :func:`edgeslim.fit` / :func:`edgeslim.finetune`; in a recipe, the
model before a stage teaches that stage's fine-tuning. :func:`distill` is the standalone
verb.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from edgeslim.core.device import model_device, to_device
from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.hooks import eval_mode, forward_hooks
from edgeslim.core.options import Options

if TYPE_CHECKING:
    pass

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class KD(Options):
    """Distillation settings (Hinton et al. 2015; hints from FitNets, Romero et al. 2015).

    ``alpha`` weighs the soft-target term, ``1 - alpha`` the hard-label loss. ``hints`` maps
    student layer names to teacher layer names whose features the student should match
    through a 1x1 adapter, weighted by ``hint_weight``.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the soft targets")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft-target term")
    soft: Literal["kl", "cosine", "mse"] = Field(
        "kl", description="kl: Hinton's soft targets; cosine/mse: match output vectors"
    )
    hints: dict[str, str] = Field(
        default_factory=dict, description="student layer -> teacher layer (FitNets hints)"
    )
    hint_weight: float = Field(1.0, ge=0, description="weight of the summed hint losses")


# --------------------------------------------------------------------------------------
# the loss terms
# --------------------------------------------------------------------------------------


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton et al. eq. 2)."""
    t = temperature
    s_log = F.log_softmax(student_logits / t, dim=-1)  # (B, classes)
    t_log = F.log_softmax(teacher_logits / t, dim=-1)  # (B, classes)
    return F.kl_div(s_log, t_log, reduction="batchmean", log_target=True) * t * t


def output_match_loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, kind: Literal["cosine", "mse"]
) -> torch.Tensor:
    """1 - mean cosine similarity, or mean squared error, between output vectors."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(student_out, teacher_out, dim=-1).mean()
    return F.mse_loss(student_out, teacher_out)


def _adapter(student_shape: torch.Size, teacher_shape: torch.Size, where: str) -> nn.Module:
    """FitNets' regressor: student channels -> teacher channels (1x1 conv, or linear)."""
    if len(student_shape) != len(teacher_shape):
        raise ShapeError(
            f"hint {where}: student feature {tuple(student_shape[1:])} and teacher feature "
            f"{tuple(teacher_shape[1:])} have different ranks; pair layers of the same kind"
        )
    if len(student_shape) == 4:  # (B, C, H, W)
        if student_shape[2:] != teacher_shape[2:]:
            raise ShapeError(
                f"hint {where}: spatial sizes differ (student {tuple(student_shape[2:])}, "
                f"teacher {tuple(teacher_shape[2:])}); pick layers at the same resolution"
            )
        return nn.Conv2d(student_shape[1], teacher_shape[1], 1)
    if student_shape[1:-1] != teacher_shape[1:-1]:
        raise ShapeError(
            f"hint {where}: features {tuple(student_shape[1:])} and "
            f"{tuple(teacher_shape[1:])} differ in more than the last (channel) dimension"
        )
    return nn.Linear(student_shape[-1], teacher_shape[-1])


# --------------------------------------------------------------------------------------
# wiring a teacher into a training loop
# --------------------------------------------------------------------------------------


class Distilling(nn.Module):
    """The student plus the hint adapters, trained together; ``forward`` is the student's.

    :func:`edgeslim.fit` trains this wrapper so that the adapters get optimised too; the
    student is changed in place and the adapters are dropped afterwards.
    """

    def __init__(self, student: nn.Module, adapters: dict[str, nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict({k.replace(".", "/"): m for k, m in adapters.items()})

    def forward(self, x: torch.Tensor) -> Any:
        return self.student(x)


def _named(model: nn.Module, names: list[str], role: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        known = [n for n in modules if n][:20]
        raise ConfigError(
            f"distill.hints: {role} has no layer {missing[0]!r}; its layers include {known}"
        )
    return {n: modules[n] for n in names}


@contextmanager
def distillation(
    student: nn.Module,
    teacher: nn.Module,
    cfg: KD,
    probe: torch.Tensor,
    hard_loss: LossFn | None = None,
) -> Iterator[tuple[Distilling, LossFn]]:
    """Yield ``(trainee, loss_fn)`` for a training loop that distils ``teacher`` into ``student``.

    ``trainee`` wraps the student and the hint adapters (train it; the student changes in
    place); ``loss_fn(logits, y, x)`` runs the frozen teacher (eval mode, no grad) on the
    same ``x`` and returns the loss in the module docstring. ``probe`` is a small input batch
    used once to size the adapters; ``hard_loss`` replaces cross-entropy for the label term.
    Hooks are removed and the teacher's training flags restored on exit.

    Student and teacher may live on different devices: the teacher gets each batch on its
    own device and its outputs (and hint features) come back to the student's; the adapters
    are made on the student's device.
    """
    if teacher is student:
        raise ConfigError("distillation needs a separate teacher model (got the student itself)")
    s_layers = _named(student, list(cfg.hints), "the student")
    t_layers = _named(teacher, list(cfg.hints.values()), "the teacher")
    s_feat: dict[str, torch.Tensor] = {}
    t_feat: dict[str, torch.Tensor] = {}

    def keep(store: dict[str, torch.Tensor]):
        def callback(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
            store[name] = output

        return callback

    with (
        eval_mode(teacher),
        forward_hooks(s_layers, keep(s_feat)),
        forward_hooks(t_layers, keep(t_feat)),
    ):
        s_dev, t_dev = model_device(student), model_device(teacher)
        with torch.no_grad(), eval_mode(student):
            student(to_device(probe, s_dev))
            teacher(to_device(probe, t_dev))
        adapters = {
            s: _adapter(s_feat[s].shape, t_feat[t].shape, f"{s} -> {t}").to(s_dev)
            for s, t in cfg.hints.items()
        }
        trainee = Distilling(student, adapters)

        def loss_fn(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_out = to_device(teacher(to_device(x, t_dev)), logits.device)
            if cfg.soft == "kl":
                soft = soft_target_loss(logits, t_out, cfg.temperature)
            else:
                soft = output_match_loss(logits, t_out, cfg.soft)
            loss = cfg.alpha * soft
            if cfg.alpha < 1:
                hard = hard_loss(logits, y, x) if hard_loss else F.cross_entropy(logits, y)
                loss = loss + (1 - cfg.alpha) * hard
            for s, t in cfg.hints.items():
                adapted = trainee.adapters[s.replace(".", "/")](s_feat[s])
                target = to_device(t_feat[t], adapted.device)
                loss = loss + cfg.hint_weight * F.mse_loss(adapted, target)
            return loss

        yield trainee, loss_fn
