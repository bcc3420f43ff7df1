"""A once-for-all supernet of MobileNetV2-style inverted residuals, and sub-networks cut out.

Once-for-All (Cai et al. 2020, "Once-for-All: Train One Network and Specialize it for
Efficient Deployment", https://arxiv.org/abs/1908.09791): one set of weights holds every
sub-network of an elastic space; a sub-network uses

- **depth**: the first ``d`` blocks of each stage (elastic depth);
- **expansion ratio** per block: the first ``cin x e`` hidden channels of the 1x1 expand conv;
- **kernel size** per block (3 / 5 / 7): the centre ``k x k`` crop of the 7x7 depthwise kernel
  (OFA also learns a small kernel transform per crop size; here the crop is used as is);
- **width multiplier** (TinyNAS, Lin et al. 2020, https://arxiv.org/abs/2007.10319): the
  first ``round(c x w)`` channels of every stage;
- **resolution**: the input is resized (bilinear) to ``r x r``.

**Fused blocks** (``fused_stages``; MCUNetV2, Lin et al. 2021, https://arxiv.org/abs/2110.15352,
and EfficientNetV2's Fused-MBConv, Tan & Le 2021, https://arxiv.org/abs/2104.00298): the first
``fused_stages`` stages use a *fused* inverted residual instead -- one full ``k x k`` conv from
the input to the expanded width, then the 1x1 linear projection, no depthwise conv -- elastic
in the same way (expansion ``fused_expands``, centre crop of the kernel ``fused_kernels``,
width, depth). On a microcontroller a dense conv does several times the MACs of a depthwise
one per instruction, so early, high-resolution stages may buy more accuracy per device-ms.

The space is :class:`SupernetSpec`, a point in it :class:`SubnetConfig`. The supernet runs any
point (``supernet(x, cfg)``); :func:`edgeslim.nas.extract.extract` cuts one out as an
*ordinary* ``nn.Module``
(plain ``Conv2d`` / ``BatchNorm2d`` / ``ReLU6`` / ``AdaptiveAvgPool2d`` / ``Linear``, weights
sliced out, ``input_shape`` set like the zoo's models), which every other edgeslim verb
accepts: ``prune_``, ``quantize_``, ``export_c``.

Layout (1 x r x r input): stem 3x3 conv (stride ``stem_stride``), the stages, a 1x1 head
conv, global average pooling, a linear classifier. Every conv is followed by BatchNorm and
ReLU6 except the blocks' 1x1 projections (linear bottlenecks); a block adds its input when
its stride is 1 and its input and output widths agree.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import ConfigError

__all__ = ["DynFusedBlock", "SubnetConfig", "Supernet", "SupernetSpec", "resize", "scaled"]


def scaled(channels: int, width: float) -> int:
    """Channels of a stage at width multiplier ``width`` (at least 4)."""
    return max(4, round(channels * width))


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """``x`` (N, C, H, W) resized to ``resolution`` x ``resolution`` (bilinear), or as is."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class SubnetConfig:
    """One sub-network: resolution, width multiplier, blocks per stage and, per block (all
    ``max_depth`` of each stage; the ones past ``depths`` are unused), expansion and kernel."""

    resolution: int
    width: float
    depths: tuple[int, ...]
    expands: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "width": self.width,
            "depths": list(self.depths),
            "expands": [list(e) for e in self.expands],
            "kernels": [list(k) for k in self.kernels],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SubnetConfig:
        try:
            return cls(
                int(d["resolution"]),
                float(d["width"]),
                tuple(int(v) for v in d["depths"]),
                tuple(tuple(int(v) for v in e) for e in d["expands"]),
                tuple(tuple(int(v) for v in k) for k in d["kernels"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a sub-network config: {d!r} ({exc})") from exc

    def key(self) -> str:
        """A short text naming the active blocks: equal keys, equal sub-networks."""
        blocks = "|".join(
            ",".join(f"e{self.expands[s][i]}k{self.kernels[s][i]}" for i in range(d))
            for s, d in enumerate(self.depths)
        )
        return f"r{self.resolution}-w{self.width:g}-{blocks}"


@dataclass(frozen=True)
class SupernetSpec:
    """The elastic space: fixed layout (channels, maximum depth and stride per stage) and
    the choices per dimension. The defaults fit MNIST-like 1x28x28 inputs, resized to
    20..32 pixels."""

    in_channels: int = 1
    num_classes: int = 10
    stem: int = 16
    stem_stride: int = 2
    # (output channels, maximum depth, stride of the first block) per stage
    stages: tuple[tuple[int, int, int], ...] = ((16, 2, 1), (24, 3, 2), (40, 3, 2), (64, 2, 1))
    head: int = 128
    expands: tuple[int, ...] = (3, 4, 6)
    kernels: tuple[int, ...] = (3, 5, 7)
    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    resolutions: tuple[int, ...] = (20, 24, 28, 32)
    min_depth: int = 1
    # the first ``fused_stages`` stages use fused blocks (kxk conv + 1x1 projection)
    fused_stages: int = 0
    fused_expands: tuple[int, ...] = (1, 2, 3)
    fused_kernels: tuple[int, ...] = (3, 5)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.stages or any(len(s) != 3 or min(s) < 1 for s in self.stages):
            raise ConfigError(
                f"SupernetSpec.stages: (channels, depth, stride) >= 1 each: {self.stages}"
            )
        choices = ("expands", "kernels", "widths", "resolutions", "fused_expands", "fused_kernels")
        for name in choices:
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)):
                raise ConfigError(f"SupernetSpec.{name} must be increasing, distinct: {values}")
        if any(k % 2 == 0 for k in self.kernels + self.fused_kernels):
            raise ConfigError(
                f"SupernetSpec.kernels / fused_kernels must be odd: {self.kernels}, "
                f"{self.fused_kernels}"
            )
        if not 0 <= self.fused_stages <= len(self.stages):
            raise ConfigError(
                f"SupernetSpec.fused_stages {self.fused_stages} not in 0..{len(self.stages)}"
            )
        if not 1 <= self.min_depth <= min(d for _, d, _ in self.stages):
            raise ConfigError(f"SupernetSpec.min_depth {self.min_depth} out of range")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        if not self.fused_stages:  # as before fused blocks existed: old runs still resume
            for k in ("fused_stages", "fused_expands", "fused_kernels"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SupernetSpec:
        d = dict(d)
        d["stages"] = tuple(tuple(s) for s in d["stages"])
        for k in ("expands", "kernels", "widths", "resolutions", "fused_expands", "fused_kernels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def fused(self, stage: int) -> bool:
        """Whether stage ``stage`` is made of fused blocks."""
        return stage < self.fused_stages

    def expand_choices(self, stage: int) -> tuple[int, ...]:
        """The expansion ratios of stage ``stage``'s blocks."""
        return self.fused_expands if self.fused(stage) else self.expands

    def kernel_choices(self, stage: int) -> tuple[int, ...]:
        """The kernel sizes of stage ``stage``'s blocks."""
        return self.fused_kernels if self.fused(stage) else self.kernels

    # -- points of the space
    def _fill(self, depths, pick_e, pick_k, resolution: int, width: float) -> SubnetConfig:
        exps, kers = [], []
        for s, (_, dmax, _) in enumerate(self.stages):
            e0, k0 = self.expand_choices(s)[0], self.kernel_choices(s)[0]
            exps.append(tuple(pick_e(s, i) if i < depths[s] else e0 for i in range(dmax)))
            kers.append(tuple(pick_k(s, i) if i < depths[s] else k0 for i in range(dmax)))
        return SubnetConfig(resolution, width, tuple(depths), tuple(exps), tuple(kers))

    def canonical(self, cfg: SubnetConfig) -> SubnetConfig:
        """``cfg`` with its unused blocks set to the smallest choices (equal sub-networks,
        equal configs); raises ConfigError when it is not in the space."""
        self.check(cfg)
        return self._fill(
            cfg.depths,
            lambda s, i: cfg.expands[s][i],
            lambda s, i: cfg.kernels[s][i],
            cfg.resolution,
            cfg.width,
        )

    def check(self, cfg: SubnetConfig) -> None:
        """ConfigError naming the first value of ``cfg`` outside the space."""
        where = f"sub-network (depths {cfg.depths})"
        if cfg.resolution not in self.resolutions:
            raise ConfigError(f"{where}: resolution {cfg.resolution} not in {self.resolutions}")
        if cfg.width not in self.widths:
            raise ConfigError(f"{where}: width {cfg.width} not in {self.widths}")
        if len(cfg.depths) != len(self.stages):
            raise ConfigError(f"{where}: {len(cfg.depths)} depths for {len(self.stages)} stages")
        for s, (_, dmax, _) in enumerate(self.stages):
            if not self.min_depth <= cfg.depths[s] <= dmax:
                raise ConfigError(
                    f"{where}: stage {s} depth {cfg.depths[s]} not in {self.min_depth}..{dmax}"
                )
            if len(cfg.expands[s]) != dmax or len(cfg.kernels[s]) != dmax:
                raise ConfigError(f"{where}: stage {s} needs {dmax} expands and kernels")
            for i in range(cfg.depths[s]):
                if cfg.expands[s][i] not in self.expand_choices(s):
                    raise ConfigError(f"{where}: stage {s} block {i} expand {cfg.expands[s][i]}")
                if cfg.kernels[s][i] not in self.kernel_choices(s):
                    raise ConfigError(f"{where}: stage {s} block {i} kernel {cfg.kernels[s][i]}")

    def largest(self, resolution: int | None = None, width: float | None = None) -> SubnetConfig:
        """Every dimension at its maximum (resolution and width as given)."""
        return self._fill(
            [d for _, d, _ in self.stages],
            lambda s, i: self.expand_choices(s)[-1],
            lambda s, i: self.kernel_choices(s)[-1],
            resolution or self.resolutions[-1],
            width or self.widths[-1],
        )

    def smallest(self, resolution: int | None = None, width: float | None = None) -> SubnetConfig:
        """Every dimension at its minimum (resolution and width as given)."""
        return self._fill(
            [self.min_depth] * len(self.stages),
            lambda s, i: self.expand_choices(s)[0],
            lambda s, i: self.kernel_choices(s)[0],
            resolution or self.resolutions[0],
            width or self.widths[0],
        )

    def sample(
        self, rng: random.Random, resolution: int | None = None, width: float | None = None
    ) -> SubnetConfig:
        """A uniformly random point (resolution / width fixed when given)."""
        depths = [rng.randint(self.min_depth, d) for _, d, _ in self.stages]
        return self._fill(
            depths,
            lambda s, i: rng.choice(self.expand_choices(s)),
            lambda s, i: rng.choice(self.kernel_choices(s)),
            resolution if resolution is not None else rng.choice(self.resolutions),
            width if width is not None else rng.choice(self.widths),
        )

    def mutate(self, cfg: SubnetConfig, rng: random.Random, p: float = 0.2) -> SubnetConfig:
        """Each depth, expansion and kernel re-drawn with probability ``p`` (resolution and
        width kept: they are the search space's, chosen before the search)."""
        depths = [
            rng.randint(self.min_depth, dmax) if rng.random() < p else cfg.depths[s]
            for s, (_, dmax, _) in enumerate(self.stages)
        ]

        def gene(attr: str, choices):
            def pick(s: int, i: int) -> int:
                if i >= cfg.depths[s] or rng.random() < p:  # a new block, or mutated
                    return rng.choice(choices(s))
                return getattr(cfg, attr)[s][i]

            return pick

        return self._fill(
            depths,
            gene("expands", self.expand_choices),
            gene("kernels", self.kernel_choices),
            cfg.resolution,
            cfg.width,
        )

    def crossover(self, a: SubnetConfig, b: SubnetConfig, rng: random.Random) -> SubnetConfig:
        """Each depth, expansion and kernel taken from ``a`` or ``b`` at random (uniform
        crossover); resolution and width from ``a``."""
        depths = [x if rng.random() < 0.5 else y for x, y in zip(a.depths, b.depths, strict=True)]
        take = [[rng.random() < 0.5 for _ in range(d)] for _, d, _ in self.stages]
        return self._fill(
            depths,
            lambda s, i: (a if take[s][i] else b).expands[s][i],
            lambda s, i: (a if take[s][i] else b).kernels[s][i],
            a.resolution,
            a.width,
        )

    # -- what a sub-network is made of
    def layers(self, cfg: SubnetConfig) -> list[dict[str, int]]:
        """Every conv / linear of the sub-network: ``cin, cout, k, groups, hw_in, stride``."""
        r = cfg.resolution
        out = []
        stem = scaled(self.stem, cfg.width)
        out.append(
            {
                "cin": self.in_channels,
                "cout": stem,
                "k": 3,
                "groups": 1,
                "hw": r,
                "stride": self.stem_stride,
            }
        )
        hw = _down(r, self.stem_stride)
        cin = stem
        for s, (c, _, stride) in enumerate(self.stages):
            cout = scaled(c, cfg.width)
            for i in range(cfg.depths[s]):
                st = stride if i == 0 else 1
                hidden = cin * cfg.expands[s][i]
                k = cfg.kernels[s][i]
                if self.fused(s):  # k x k conv to the hidden width, then the projection
                    out.append(
                        {"cin": cin, "cout": hidden, "k": k, "groups": 1, "hw": hw, "stride": st}
                    )
                    hw = _down(hw, st)
                    out.append(
                        {"cin": hidden, "cout": cout, "k": 1, "groups": 1, "hw": hw, "stride": 1}
                    )
                    cin = cout
                    continue
                out.append({"cin": cin, "cout": hidden, "k": 1, "groups": 1, "hw": hw, "stride": 1})
                out.append(
                    {
                        "cin": hidden,
                        "cout": hidden,
                        "k": k,
                        "groups": hidden,
                        "hw": hw,
                        "stride": st,
                    }
                )
                hw = _down(hw, st)
                out.append(
                    {"cin": hidden, "cout": cout, "k": 1, "groups": 1, "hw": hw, "stride": 1}
                )
                cin = cout
        head = scaled(self.head, cfg.width)
        out.append({"cin": cin, "cout": head, "k": 1, "groups": 1, "hw": hw, "stride": 1})
        out.append(
            {"cin": head, "cout": self.num_classes, "k": 1, "groups": 1, "hw": 1, "stride": 1}
        )
        return out

    def macs(self, cfg: SubnetConfig) -> int:
        """Multiply-accumulates of one inference (convs and the classifier)."""
        total = 0
        for la in self.layers(cfg):
            hw = _down(la["hw"], la["stride"])
            total += hw * hw * la["cout"] * (la["cin"] // la["groups"]) * la["k"] ** 2
        return total

    def params(self, cfg: SubnetConfig) -> int:
        """Weights + biases after BatchNorm folding (what the int8 graph stores)."""
        return sum(
            la["cout"] * (la["cin"] // la["groups"]) * la["k"] ** 2 + la["cout"]
            for la in self.layers(cfg)
        )


def _down(hw: int, stride: int) -> int:
    return (hw - 1) // stride + 1  # "same" padding (k // 2) and odd k


# ----------------------------------------------------------------------------- dynamic layers


class DynConv(nn.Module):
    """A conv whose active output channels, input channels and centre kernel crop vary."""

    def __init__(self, cin: int, cout: int, k: int, depthwise: bool = False) -> None:
        super().__init__()
        self.depthwise = depthwise
        shape = (cout, 1 if depthwise else cin, k, k)
        self.weight = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def active(self, cin: int, cout: int, k: int) -> torch.Tensor:
        kmax = self.weight.shape[-1]
        lo = (kmax - k) // 2
        w = self.weight[:cout, : (1 if self.depthwise else cin), lo : lo + k, lo : lo + k]
        return w.contiguous()

    def forward(self, x: torch.Tensor, cout: int, k: int, stride: int) -> torch.Tensor:
        cin = x.shape[1]
        if self.depthwise:
            cout = cin
        w = self.active(cin, cout, k)
        return F.conv2d(x, w, None, stride, k // 2, 1, cin if self.depthwise else 1)


class DynBN(nn.BatchNorm2d):
    """BatchNorm over the first ``C`` channels (the input's): slices of one set of stats."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        c = x.shape[1]
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class DynBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, kmax: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.stride = stride
        self.expand = DynConv(cin, hidden, 1)
        self.bn1 = DynBN(hidden)
        self.dw = DynConv(hidden, hidden, kmax, depthwise=True)
        self.bn2 = DynBN(hidden)
        self.project = DynConv(hidden, cout, 1)
        self.bn3 = DynBN(cout)

    def forward(self, x: torch.Tensor, cout: int, e: int, k: int) -> torch.Tensor:
        cin = x.shape[1]
        y = F.relu6(self.bn1(self.expand(x, cin * e, 1, 1)))
        y = F.relu6(self.bn2(self.dw(y, 0, k, self.stride)))
        y = self.bn3(self.project(y, cout, 1, 1))
        return x + y if self.stride == 1 and cin == cout else y


class DynFusedBlock(nn.Module):
    """A fused inverted residual: k x k conv to ``cin x e`` channels, then the 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kmax: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.stride = stride
        self.conv = DynConv(cin, hidden, kmax)
        self.bn1 = DynBN(hidden)
        self.project = DynConv(hidden, cout, 1)
        self.bn2 = DynBN(cout)

    def forward(self, x: torch.Tensor, cout: int, e: int, k: int) -> torch.Tensor:
        cin = x.shape[1]
        y = F.relu6(self.bn1(self.conv(x, cin * e, k, self.stride)))
        y = self.bn2(self.project(y, cout, 1, 1))
        return x + y if self.stride == 1 and cin == cout else y


class Supernet(nn.Module):
    """The supernet of ``spec``: ``supernet(x, cfg)`` runs sub-network ``cfg`` (default:
    the largest) on ``x`` resized to ``cfg.resolution``."""

    def __init__(self, spec: SupernetSpec | None = None) -> None:
        super().__init__()
        spec = spec or SupernetSpec()
        self.spec = spec
        self.stem = DynConv(spec.in_channels, spec.stem, 3)
        self.stem_bn = DynBN(spec.stem)
        stages = []
        cin = spec.stem
        for s, (c, depth, stride) in enumerate(spec.stages):
            block = DynFusedBlock if spec.fused(s) else DynBlock
            emax, kmax = spec.expand_choices(s)[-1], spec.kernel_choices(s)[-1]
            blocks = [
                block(cin if i == 0 else c, c, stride if i == 0 else 1, emax, kmax)
                for i in range(depth)
            ]
            stages.append(nn.ModuleList(blocks))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.head = DynConv(cin, spec.head, 1)
        self.head_bn = DynBN(spec.head)
        self.classifier = nn.Linear(spec.head, spec.num_classes)

    def forward(self, x: torch.Tensor, cfg: SubnetConfig | None = None) -> torch.Tensor:
        spec = self.spec
        cfg = cfg or spec.largest()
        x = resize(x, cfg.resolution)
        if self.training:  # NHWC: PyTorch's depthwise kernels train ~3x faster on CPU
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu6(self.stem_bn(self.stem(x, scaled(spec.stem, cfg.width), 3, spec.stem_stride)))
        for s, (c, _, _) in enumerate(spec.stages):
            cout = scaled(c, cfg.width)
            for i in range(cfg.depths[s]):
                x = self.stages[s][i](x, cout, cfg.expands[s][i], cfg.kernels[s][i])
        head = scaled(spec.head, cfg.width)
        x = F.relu6(self.head_bn(self.head(x, head, 1, 1)))
        x = x.mean((2, 3))
        return F.linear(x, self.classifier.weight[:, :head], self.classifier.bias)
