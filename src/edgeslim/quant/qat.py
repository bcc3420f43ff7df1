"""Quantization-aware training: fine-tune through fake quantization (STE), or learn the steps (LSQ).

- QAT: Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference" (https://arxiv.org/abs/1712.05877): the forward pass
  rounds weights and activations as int8 inference will, the backward pass treats rounding as
  the identity (straight-through estimator). BatchNorm is folded first (frozen statistics),
  weight scales follow ``max |w_c| / 127`` as the weights move.
- LSQ: Esser et al. 2019, "Learned Step Size Quantization" (https://arxiv.org/abs/1902.08153):
  the step sizes (scales) of weights and activations are parameters too, trained with the
  gradient of :func:`edgeslim.quant.fake.lsq_quant`; they start from the calibrated values.

Both start from post-training quantization (:mod:`.ptq`: same layers, same observers), train
with :func:`edgeslim.core.train.fit` in ``"fake"`` mode and end in ``"exact"`` mode, so the result
is the same kind of model PTQ gives (``layer_qparams``, ONNX QDQ export).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.registry import Context
from edgeslim.quant.modules import ActQuant, quant_layers, set_mode
from edgeslim.quant.ptq import Int8PTQ, int8_ptq_
from edgeslim.quant.registry import REGISTRY


class QAT(Int8PTQ):
    """Int8 PTQ, then ``epochs`` of fine-tuning through fake quantization (STE).

    Takes every :class:`Int8PTQ` field (calibration, bit widths, first/last handling) plus
    the fine-tuning schedule; a pipeline stage's ``finetune`` overrides it.
    """

    epochs: int = Field(3, ge=0)

    trains: ClassVar[bool] = True  # a stage's finetune is its training schedule
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"


class LSQ(QAT):
    """:class:`QAT` whose weight and activation scales are learned (Esser et al. 2019).

    Trained with SGD + momentum as in the paper: Adam's per-parameter normalisation moves a
    step size of ~1e-3 by ``lr`` per step, i.e. sign flips within an epoch.
    """

    lr: float = Field(1e-2, gt=0)
    optimizer: Literal["adam", "sgd"] = "sgd"


def _train_config(cfg: QAT, train: Any):
    from edgeslim.core.train import TrainConfig

    if train is not None:
        return train
    return TrainConfig(
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, optimizer=cfg.optimizer
    )


def qat_(model: nn.Module, cfg: QAT, ctx: Context) -> nn.Module:
    """PTQ-initialise ``model``, fine-tune it with fake quantization, return it in exact mode.

    ``data`` (a :class:`~edgeslim.core.data.datasets.DataSplits`) is required; ``calib`` defaults
    to ``data.calib(cfg.calib_size)``; ``train`` (a ``TrainConfig``) overrides the schedule;
    with a ``teacher`` (e.g. the float model) the fine-tuning distils from it.
    ``quant_info["history"]`` holds the per-epoch training log.
    """
    data, calib = ctx.data, ctx.calib
    from edgeslim.core.train import fit

    if data is None:
        raise ConfigError(
            f"{type(cfg).__name__} trains: pass data=DataSplits (e.g. load_data('mnist'))"
        )
    if calib is None:
        calib = data.calib(min(cfg.calib_size, len(data.train)))
    ptq = Int8PTQ.shared_with(cfg)
    qmodel = int8_ptq_(model, ptq, Context(calib=calib, filter_fn=ctx.filter_fn))
    if isinstance(cfg, LSQ):
        enable_lsq(qmodel)
    set_mode(qmodel, "fake")
    tcfg = _train_config(cfg, ctx.train).model_copy(update={"seed": ctx.seed})
    history = (
        fit(qmodel, data, tcfg, teacher=ctx.teacher, progress=ctx.progress) if tcfg.epochs else []
    )
    for layer in quant_layers(qmodel).values():
        layer.refresh_weight_scale()
    with torch.no_grad():  # a learned step size must stay positive for the integer kernels
        for m in qmodel.modules():
            if getattr(m, "lsq", False):
                for p in (getattr(m, "scale", None), getattr(m, "weight_scale", None)):
                    if isinstance(p, nn.Parameter):
                        p.clamp_(min=1e-8)
    set_mode(qmodel, cfg.simulate)
    qmodel.quant_info["history"] = history
    return qmodel


def enable_lsq(model: nn.Module) -> int:
    """Turn every weight scale and every calibrated activation scale into a parameter.

    Returns how many scales became learnable. Quantizers that share another's qparams
    (``source``) and dynamic ones are left alone.
    """
    count = 0
    for layer in quant_layers(model).values():
        layer.enable_lsq()
        count += 1
    for m in model.modules():
        if isinstance(m, ActQuant) and m.source is None and not m.dynamic:
            m.enable_lsq()
            count += 1
    return count


_TAKES = ("calib", "filter_fn", "data", "train", "teacher", "progress", "seed")
REGISTRY.register("qat", QAT, qat_, takes=_TAKES)
REGISTRY.register("lsq", LSQ, qat_, takes=_TAKES)
