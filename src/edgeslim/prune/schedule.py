"""Iterative pruning: prune -> fine-tune cycles toward a target (Han et al. 2015, sec. 3.3).

Each of ``steps`` cycles prunes to ``cfg.scaled(k / steps)`` -- a share of the final target
-- and fine-tunes with the masks held fixed. Pruning a bit at a time and letting the
surviving weights recover keeps more accuracy than pruning all at once.
"""

from __future__ import annotations

from pydantic import BaseModel
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.masks import iter_masks
from edgeslim.core.selection import FilterFn
from edgeslim.core.train import TrainConfig, evaluate, finetune


def model_sparsity(model) -> float:
    """Fraction of zeros over all masked weights (0 when nothing is pruned)."""
    total = zeros = 0
    for _, _, _, keep in iter_masks(model):
        total += keep.numel()
        zeros += int((~keep).sum())
    return zeros / total if total else 0.0


def prune_iteratively_(
    model,
    cfg: BaseModel,
    data: DataSplits,
    steps: int = 3,
    finetune_cfg: TrainConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    teacher: nn.Module | None = None,
    progress: bool | None = None,
    **prune_kwargs: object,
) -> list[dict[str, float]]:
    """Run ``steps`` prune -> fine-tune cycles in place; one log row per cycle.

    ``cfg`` must offer ``scaled(fraction)`` (e.g. :class:`MagnitudePrune`, :class:`OBDPrune`).
    Each cycle's fine-tuning uses seed ``finetune_cfg.seed + k`` so the run is reproducible;
    with a ``teacher`` (e.g. the model before pruning) fine-tuning distils from it
    (``finetune_cfg.distill``, see :mod:`edgeslim.core.kd`).
    ``prune_kwargs`` go to :func:`prune_`; methods that take ``data`` (OBD) get ``data``.
    """
    from edgeslim.prune import accepted, prune_  # the verb dispatches on the config type

    prune_kwargs = {**accepted(cfg, data=data), **prune_kwargs}  # e.g. OBD's Hessian data
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ft = finetune_cfg or TrainConfig(epochs=3, lr=1e-4)
    log: list[dict[str, float]] = []
    for k in range(1, steps + 1):
        prune_(model, cfg.scaled(k / steps), filter_fn=filter_fn, **prune_kwargs)
        before = evaluate(model, data, "val")
        if ft.epochs > 0:
            finetune(model, data, ft, teacher=teacher, seed=ft.seed + k, progress=progress)
        log.append(
            {
                "step": k,
                "sparsity": model_sparsity(model),
                "val_before_finetune": before,
                "val_after_finetune": evaluate(model, data, "val"),
            }
        )
    return log
