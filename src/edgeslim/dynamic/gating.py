"""Input-dependent channel gating: a small gate per block picks the channels to compute.

Xitong Gao, Yiren Zhao, Łukasz Dudziak, Robert Mullins, Cheng-zhong Xu. "Dynamic Channel
Pruning: Feature Boosting and Suppression", ICLR 2019. https://arxiv.org/abs/1810.05331

Weizhe Hua, Yuan Zhou, Christopher De Sa, Zhiru Zhang, G. Edward Suh. "Channel Gating
Neural Networks", NeurIPS 2019. https://arxiv.org/abs/1805.12549

As in FBS, each gated unit has a saliency predictor ``s = relu(W · avgpool(x) + b)`` from its
own input ``x``; the ``k = ceil(density * C)`` most salient channels are kept (k-winners-take-
all) and scaled by their saliency, the others are zero. Training adds an L1 penalty on the
saliencies (:func:`gate_loss`), and fine-tunes with the fixed density as the sparsity target.

Inference skips the gated-off channels for real: each sample's selected rows of the weight
are gathered (``index_select``) and only those output channels are convolved; the zeros are
never computed. Two kinds of unit are gated:

- a convolution (``nn.Conv2d``, or a ``Sequential(Conv2d, [BatchNorm2d], [activation])``):
  its output channels;
- an inverted-residual block (``.block`` = [1x1 expand], 3x3 depthwise, 1x1 project, and
  ``.use_residual``, as in the zoo's MobileNetV2): its hidden channels, skipped through all
  three convolutions (rows of the expand and depthwise weights, columns of the project).

While ``torch.export`` / ONNX tracing, or in training mode, the dense masked computation is
used (the same values; the gathered path is data-dependent).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options

__all__ = [
    "ChannelGating",
    "GatedConv",
    "GatedInvertedResidual",
    "gate_channels_",
    "gate_loss",
    "gated_units",
    "set_density",
    "train_gates",
]


class ChannelGating(Options):
    """Which units to gate and how many of their channels each input computes."""

    layers: list[str] | None = Field(
        None, description="module names to gate (default: every inverted-residual block)"
    )
    density: float = Field(0.5, gt=0, le=1, description="fraction of channels computed")
    l1: float = Field(1e-4, ge=0, description="L1 penalty on the saliencies (gate_loss)")


def _is_exporting() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _fold_bn(bn: nn.BatchNorm2d | None, channels: int, bias: torch.Tensor | None):
    """``(scale, shift)`` so that ``bn(conv + bias) = conv * scale + shift`` (eval mode)."""
    b = bias if bias is not None else torch.zeros(channels)
    if bn is None:
        return torch.ones(channels), b
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias + (b - bn.running_mean) * scale


class _Gate(nn.Module):
    """FBS saliency predictor and k-winners-take-all."""

    def __init__(self, cin: int, cout: int, density: float) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.ones_(self.fc.bias)
        self.density = density  # the configured fraction (set_density(model) restores it)
        self.k = max(1, math.ceil(density * cout))
        self.last: torch.Tensor | None = None  # saliencies of the last forward (for gate_loss)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(saliency (B, C), top-k indices (B, k))``."""
        s = F.relu(self.fc(x.mean(dim=(2, 3))))  # (B, C)
        self.last = s
        return s, s.topk(self.k, dim=1).indices

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """Saliency with all but the top k zeroed: ``(B, C, 1, 1)``."""
        s, idx = self(x)
        keep = torch.zeros_like(s).scatter(1, idx, 1.0)
        return (s * keep)[:, :, None, None]


def _split_unit(unit: nn.Module, name: str) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, nn.Module]:
    if isinstance(unit, nn.Conv2d):
        return unit, None, nn.Identity()
    parts = list(unit) if isinstance(unit, nn.Sequential) else []
    if not parts or not isinstance(parts[0], nn.Conv2d) or len(parts) > 3:
        raise ConfigError(
            f"ChannelGating.layers: {name!r} ({type(unit).__name__}) is not a Conv2d, a "
            "Sequential(Conv2d, [BatchNorm2d], [activation]) or an inverted-residual block"
        )
    conv, rest = parts[0], parts[1:]
    bn = rest.pop(0) if rest and isinstance(rest[0], nn.BatchNorm2d) else None
    act = rest[0] if rest else nn.Identity()
    if rest and isinstance(act, (nn.Conv2d, nn.BatchNorm2d)):
        raise ConfigError(f"ChannelGating.layers: {name!r} has more than one conv")
    return conv, bn, act


class GatedConv(nn.Module):
    """A conv (+ BN + activation) whose output channels are gated by its input."""

    def __init__(self, unit: nn.Module, density: float, name: str) -> None:
        super().__init__()
        conv, bn, act = _split_unit(unit, name)
        if conv.groups != 1:
            raise ConfigError(f"ChannelGating.layers: {name!r} is a grouped conv; gate its block")
        self.conv, self.bn, self.act = conv, bn, act
        self.gate = _Gate(conv.in_channels, conv.out_channels, density)
        self.computed = 0  # output channels computed in the last forward (per sample, summed)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return self.act(y) * self.gate.masked(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or _is_exporting():
            return self._dense(x)
        s, idx = self.gate(x)
        c = self.conv
        scale, shift = _fold_bn(self.bn, c.out_channels, c.bias)
        outs = []
        for i in range(x.shape[0]):  # each sample has its own channels
            sel = idx[i]
            y = F.conv2d(x[i : i + 1], c.weight.index_select(0, sel), None, c.stride, c.padding,
                         c.dilation)  # fmt: skip
            y = (
                self.act(y * scale[sel, None, None] + shift[sel, None, None])
                * s[i, sel, None, None]
            )
            full = y.new_zeros((1, c.out_channels, *y.shape[2:]))
            full[:, sel] = y
            outs.append(full)
        self.computed = int(idx.numel())
        return torch.cat(outs)


class GatedInvertedResidual(nn.Module):
    """An inverted-residual block whose hidden channels are gated by the block's input."""

    def __init__(self, block: nn.Module, density: float, name: str) -> None:
        super().__init__()
        layers = list(getattr(block, "block", []))
        units = [_split_unit(u, name) for u in layers] if layers else []
        if len(units) not in (2, 3) or units[-2][0].groups != units[-2][0].in_channels:
            raise ConfigError(
                f"ChannelGating.layers: {name!r} ({type(block).__name__}) is not an inverted-"
                "residual block (.block = [1x1 expand], depthwise 3x3, 1x1 project)"
            )
        self.expand = units[0] if len(units) == 3 else None
        self.dw, self.project = units[-2], units[-1]
        self.use_residual = bool(getattr(block, "use_residual", False))
        self.block = block  # keeps the original parameter names and the dense path
        hidden = self.dw[0].in_channels
        cin = self.expand[0].in_channels if self.expand else hidden
        self.gate = _Gate(cin, hidden, density)
        self.computed = 0

    def train(self, mode: bool = True) -> GatedInvertedResidual:
        self._folded = None  # weights may change: fold BN again at the next inference
        return super().train(mode)

    def _fold(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per unit, the conv weight with BN folded in, and the bias (eval mode)."""
        if getattr(self, "_folded", None) is None:
            out = []
            for conv, bn, _act in [u for u in (self.expand, self.dw, self.project) if u]:
                scale, shift = _fold_bn(bn, conv.out_channels, conv.bias)
                out.append((conv.weight * scale[:, None, None, None], shift))
            self._folded = [tuple(t.detach() for t in pair) for pair in out]
        return self._folded

    @staticmethod
    def _run_unit(unit, folded, x, rows=None, cols=None, groups=1):
        conv, _bn, act = unit
        w, b = folded
        if rows is not None:
            w, b = w.index_select(0, rows), b.index_select(0, rows)
        if cols is not None:
            w = w.index_select(1, cols)
        return act(F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or _is_exporting():
            h = x
            for unit in [self.expand, self.dw] if self.expand else [self.dw]:
                conv, bn, act = unit
                h = act(bn(conv(h)) if bn is not None else conv(h))
            h = h * self.gate.masked(x)
            conv, bn, act = self.project
            y = act(bn(conv(h)) if bn is not None else conv(h))
            return x + y if self.use_residual else y
        s, idx = self.gate(x)
        folded = self._fold()
        f_dw, f_proj = folded[-2], folded[-1]
        outs = []
        for i in range(x.shape[0]):
            sel, xi = idx[i], x[i : i + 1]
            if self.expand is not None:
                h = self._run_unit(self.expand, folded[0], xi, rows=sel)
            else:
                h = xi.index_select(1, sel)
            h = self._run_unit(self.dw, f_dw, h, rows=sel, groups=sel.numel())
            h = h * s[i, sel, None, None]
            y = self._run_unit(self.project, f_proj, h, cols=sel)
            outs.append(xi + y if self.use_residual else y)
        self.computed = int(idx.numel())
        return torch.cat(outs)


def _is_inverted_residual(m: nn.Module) -> bool:
    return isinstance(getattr(m, "block", None), nn.Sequential) and hasattr(m, "use_residual")


def _importance(model: nn.Module, producers: dict[str, nn.Module], calib: torch.Tensor):
    """Mean |activation| per channel of each producer's output on ``calib``."""
    from edgeslim.core.hooks import run_calibration

    sums: dict[str, torch.Tensor] = {}

    def see(name, _module, _inputs, output):
        sums[name] = sums.get(name, 0) + output.abs().mean(dim=(0, 2, 3))

    run_calibration(model, calib, producers, see)
    return sums


def gate_channels_(
    model: nn.Module, cfg: ChannelGating, *, calib: torch.Tensor | None = None
) -> dict[str, dict[str, int]]:
    """Replace the units ``cfg`` names with gated ones, in place; returns one row per unit.

    Fresh gates predict a saliency near 1 for every channel. With ``calib`` (inputs), each
    gate's bias starts at ``1 + 0.1 x`` the channel's normalised mean |activation| on them,
    so the gates first keep the statically most active channels. Train afterwards
    (:func:`train_gates`, or the ``gating`` recipe stage).
    """
    modules = dict(model.named_modules())
    names = cfg.layers
    if names is None:
        names = [n for n, m in modules.items() if n and _is_inverted_residual(m)]
        if not names:
            raise ConfigError(
                f"ChannelGating: {type(model).__name__} has no inverted-residual blocks; "
                "name the convolutions to gate in 'layers'"
            )
    for name in names:
        if name not in modules or not name:
            known = [n for n in modules if n][:25]
            raise ConfigError(f"ChannelGating.layers: no module {name!r}; modules include {known}")
    producers = {
        n: modules[n].block[-2] if _is_inverted_residual(modules[n]) else modules[n] for n in names
    }
    importance = _importance(model, producers, calib) if calib is not None else {}
    log = {}
    for name in names:
        unit = modules[name]
        if _is_inverted_residual(unit):
            gated: nn.Module = GatedInvertedResidual(unit, cfg.density, name)
        else:
            gated = GatedConv(unit, cfg.density, name)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, gated)
        if name in importance:
            imp = importance[name]
            with torch.no_grad():
                gated.gate.fc.bias.copy_(1 + 0.1 * imp / imp.max().clamp_min(1e-12))
        log[name] = {"channels": gated.gate.fc.out_features, "kept": gated.gate.k}
    return log


def gated_units(model: nn.Module) -> dict[str, nn.Module]:
    """The gated units of ``model`` by name."""
    return {
        n: m for n, m in model.named_modules() if isinstance(m, (GatedConv, GatedInvertedResidual))
    }


def set_density(model: nn.Module, density: float | None = None) -> None:
    """Make every gate keep ``ceil(density * C)`` channels (``None``: each gate's configured
    density again). At inference this trades accuracy for compute without retraining: the
    gating stage sweeps it for the accuracy-compute curve."""
    if density is not None and not 0 < density <= 1:
        raise ConfigError(f"set_density: density must be in (0, 1], got {density}")
    for unit in gated_units(model).values():
        gate = unit.gate
        target = getattr(gate, "density", gate.k / gate.fc.out_features)
        gate.k = max(1, math.ceil((target if density is None else density) * gate.fc.out_features))


def gate_loss(model: nn.Module) -> torch.Tensor:
    """Mean absolute saliency over every gate of the last forward pass (FBS' L1 term)."""
    terms = [
        m.gate.last.abs().mean() for m in gated_units(model).values() if m.gate.last is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def train_gates(
    model: nn.Module,
    data,
    cfg=None,
    *,
    l1: float = 1e-4,
    teacher: nn.Module | None = None,
    progress: bool | None = None,
    anneal: float = 0.0,
) -> list[dict[str, float]]:
    """Fine-tune a gated ``model`` (gates and weights): cross-entropy + ``l1`` x
    :func:`gate_loss`, distilled from ``teacher`` when given (``cfg.distill`` or ``KD()``).
    ``cfg`` is a :class:`~edgeslim.core.train.TrainConfig` (fine-tuning defaults).

    ``anneal`` (a fraction of the training steps, 0: off): a density schedule; every gate
    starts keeping all its channels and its density falls to the configured one along
    AGP's cubic curve (Zhu & Gupta 2017) over the first ``anneal`` of the steps, so the
    network adapts step by step. With a schedule the last epoch's weights are kept (the
    validation of earlier epochs ran at a higher density)."""
    from edgeslim.core.train import FINETUNE_DEFAULTS, TrainConfig, fit

    if not gated_units(model):
        raise ConfigError("train_gates: the model has no gated units (gate_channels_ first)")
    if not 0 <= anneal <= 1:
        raise ConfigError(f"train_gates: anneal must be a fraction in [0, 1], got {anneal}")
    cfg = cfg or TrainConfig(**FINETUNE_DEFAULTS)
    gates = [unit.gate for unit in gated_units(model).values()]
    targets = [getattr(g, "density", g.k / g.fc.out_features) for g in gates]

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y) + l1 * gate_loss(model)

    def schedule(_model: nn.Module, step: int, total: int) -> None:
        left = 1 - min(1.0, step / max(1.0, anneal * total))  # 1 -> 0
        for gate, target in zip(gates, targets, strict=True):
            density = target + (1 - target) * left**3
            gate.k = max(1, math.ceil(density * gate.fc.out_features))

    if anneal > 0:
        cfg = cfg.model_copy(update={"keep_best": False})
        schedule(model, 0, 1)
    try:
        return fit(
            model, data, cfg, teacher=teacher, loss_fn=loss_fn, progress=progress,
            step_hook=schedule if anneal > 0 else None,
        )  # fmt: skip
    finally:
        set_density(model)
