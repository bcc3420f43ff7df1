"""Binary and ternary weights, trained through ``fit`` with straight-through gradients.

- BWN: Rastegari et al. 2016, "XNOR-Net: ImageNet Classification Using Binary Convolutional
  Neural Networks" (https://arxiv.org/abs/1603.05279), binary-weight networks:
  ``W ~ alpha_c * sign(W)`` with ``alpha_c = mean |W_c|`` per output channel.
- TWN: Li, Zhang, Liu 2016, "Ternary Weight Networks" (https://arxiv.org/abs/1605.04711):
  threshold ``delta = 0.7 * mean |W|`` per layer, ``W ~ alpha * sign(W) * [|W| > delta]`` with
  ``alpha`` = mean |W| over the kept weights.
- TTQ: Zhu, Han, Mao, Dally 2017, "Trained Ternary Quantization"
  (https://arxiv.org/abs/1612.01064): ``W ~ W_p`` above ``t * max |W|``, ``-W_n`` below
  ``-t * max |W|``, else 0, with the two scales ``W_p``, ``W_n`` learned per layer; the latent
  weights get the gradient scaled by ``W_p`` / 1 / ``W_n`` in the three regions.

The float "latent" weights are kept and trained; the forward pass uses their binary /
ternary projection (gradient by STE, zero outside ``|w| <= 1`` for BWN as XNOR-Net clips).
First and last layers stay float by default (as all three papers do); the handler reports
which layers were left float. :func:`codes` gives the integer codes (-1/+1 or -1/0/+1) and
scales that the packed artifact stores: 1 bit (BWN) or 2 bits (TWN, TTQ) per weight.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.quant.fold import _replace_module
from edgeslim.quant.ptq import QUANTIZABLE, Int8PTQ, _select
from edgeslim.quant.registry import REGISTRY

Scheme = Literal["bwn", "twn", "ttq"]


class _LowBitConfig(Options):
    model_config = ConfigDict(extra="forbid")

    skip_first: bool = True
    skip_last: bool = True
    exclude: list[str] = Field(default_factory=list)
    epochs: int = Field(10, ge=0, description="training epochs through the projection")

    trains: ClassVar[bool] = True  # a stage's finetune is its training schedule
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)


class BWN(_LowBitConfig):
    """Binary weights ``alpha_c * sign(W)`` (XNOR-Net's BWN), 1 bit per weight."""


class TWN(_LowBitConfig):
    """Ternary weights with threshold ``threshold * mean |W|`` (0.7 in the paper), 2 bits."""

    threshold: float = Field(0.7, gt=0, lt=2)


class TTQ(_LowBitConfig):
    """Trained ternary quantization: learned positive / negative scales, 2 bits per weight."""

    threshold: float = Field(0.05, gt=0, lt=1, description="t: threshold = t * max |W|")


# ---------------------------------------------------------------------------- projections


def binarize(w: torch.Tensor) -> torch.Tensor:
    """``alpha_c * sign(w)`` per output channel, STE gradient clipped to ``|w| <= 1``."""
    alpha = w.detach().abs().reshape(w.shape[0], -1).mean(1)  # (C,)
    alpha = alpha.reshape(-1, *([1] * (w.dim() - 1)))
    sign = torch.where(w >= 0, 1.0, -1.0)
    proj = alpha * sign
    ste = (w - w.detach()) * (w.detach().abs() <= 1).to(w.dtype)
    return proj.detach() + ste


def ternarize(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """TWN: ``alpha * sign(w)`` where ``|w| > threshold * mean |w|``, else 0; STE gradient."""
    delta = threshold * w.detach().abs().mean()
    keep = (w.detach().abs() > delta).to(w.dtype)
    alpha = (w.detach().abs() * keep).sum() / keep.sum().clamp(min=1)
    proj = alpha * torch.sign(w.detach()) * keep
    return proj + (w - w.detach())


def ttq_project(
    w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, threshold: float
) -> torch.Tensor:
    """TTQ: ``wp`` / 0 / ``-wn`` by region; gradients to ``wp``, ``wn`` and scaled to ``w``."""
    delta = threshold * w.detach().abs().max()
    pos = (w.detach() > delta).to(w.dtype)
    neg = (w.detach() < -delta).to(w.dtype)
    zero = 1 - pos - neg
    proj = wp * pos - wn * neg
    scale = wp.detach() * pos + wn.detach() * neg + zero
    return proj + (w - w.detach()) * scale


# ---------------------------------------------------------------------------- layers


class _LowBit:
    """Shared by :class:`LowBitConv2d` and :class:`LowBitLinear`."""

    weight: nn.Parameter
    scheme: str
    threshold: float

    def _init_lowbit(self, scheme: Scheme, threshold: float) -> None:
        self.scheme = scheme
        self.threshold = threshold
        if scheme == "ttq":
            w = self.weight.detach()
            delta = threshold * w.abs().max()
            pos, neg = w[w > delta], w[w < -delta]
            self.wp = nn.Parameter(pos.mean().reshape(1) if pos.numel() else torch.ones(1))
            self.wn = nn.Parameter(-neg.mean().reshape(1) if neg.numel() else torch.ones(1))

    def projected_weight(self) -> torch.Tensor:
        if self.scheme == "bwn":
            return binarize(self.weight)
        if self.scheme == "twn":
            return ternarize(self.weight, self.threshold)
        return ttq_project(self.weight, self.wp, self.wn, self.threshold)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scales)``: int8 codes in {-1, 1} / {-1, 0, 1} and what each code means.

        BWN: ``scales`` (C,) per output channel (value = code * scale[c]); TWN: (1,) alpha;
        TTQ: (2,) = (W_p, W_n), value = W_p for +1 and -W_n for -1.
        """
        with torch.no_grad():
            w = self.projected_weight()
            codes = torch.sign(w).to(torch.int8)
            if self.scheme == "bwn":
                scales = w.abs().reshape(w.shape[0], -1).amax(1)
            elif self.scheme == "twn":
                scales = w.abs().max().reshape(1)
            else:
                scales = torch.cat([self.wp.detach(), self.wn.detach()])
        return codes, scales.float()

    @property
    def code_bits(self) -> int:
        return 1 if self.scheme == "bwn" else 2


class LowBitConv2d(_LowBit, nn.Conv2d):
    """A conv whose forward uses the binary / ternary projection of its weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            self.projected_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class LowBitLinear(_LowBit, nn.Linear):
    """A linear layer whose forward uses the binary / ternary projection of its weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.projected_weight(), self.bias)


def _convert(old: nn.Module, scheme: Scheme, threshold: float) -> nn.Module:
    if isinstance(old, nn.Conv2d):
        new = LowBitConv2d(
            old.in_channels,
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            old.groups,
            old.bias is not None,
            old.padding_mode,
        )
    else:
        new = LowBitLinear(old.in_features, old.out_features, old.bias is not None)
    new.load_state_dict(old.state_dict())
    new._init_lowbit(scheme, threshold)
    return new


def lowbit_layers(model: nn.Module) -> dict[str, _LowBit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LowBit)}


# ---------------------------------------------------------------------------- the verb


def lowbit_(model: nn.Module, cfg: BWN | TWN | TTQ, ctx: Context) -> nn.Module:
    """Make ``model``'s conv / linear weights binary or ternary, then train ``cfg.epochs``.

    Returns ``model`` (changed in place) with ``quant_info`` (layers, float layers and why,
    training history). ``data`` is needed when there are epochs to train.
    """
    data = ctx.data
    from edgeslim.core.train import TrainConfig, fit

    scheme: Scheme = {BWN: "bwn", TWN: "twn", TTQ: "ttq"}[type(cfg)]
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, QUANTIZABLE) and n]
    sel = Int8PTQ(skip_first=cfg.skip_first, skip_last=cfg.skip_last, exclude=cfg.exclude)
    chosen, skipped = _select(names, modules, sel, ctx.filter_fn)
    if not chosen:
        raise ConfigError(f"no layer left to make {scheme.upper()} (float: {skipped})")
    threshold = getattr(cfg, "threshold", 0.0)
    for name in chosen:
        _replace_module(model, name, _convert(modules[name], scheme, threshold))
    tcfg = ctx.train or TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    history = []
    if tcfg.epochs:
        if data is None:
            raise ConfigError(
                f"{scheme.upper()} trains {tcfg.epochs} epoch(s): pass data=DataSplits"
            )
        tcfg = tcfg.model_copy(update={"seed": ctx.seed})
        history = fit(model, data, tcfg, teacher=ctx.teacher, progress=ctx.progress)
    model.eval()
    model.quant_info = {
        "scheme": scheme,
        "quantized": chosen,
        "float_layers": skipped,
        "layer_bits": {n: (1 if scheme == "bwn" else 2) for n in chosen},
        "history": history,
    }
    return model


_TAKES = ("filter_fn", "data", "train", "teacher", "progress", "seed")
REGISTRY.register("bwn", BWN, lowbit_, takes=_TAKES)
REGISTRY.register("twn", TWN, lowbit_, takes=_TAKES)
REGISTRY.register("ttq", TTQ, lowbit_, takes=_TAKES)
