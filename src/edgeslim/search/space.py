"""The search space: what may change, per coupled channel group and per layer.

A candidate is a plain dict ``{knob: value}`` with one knob per thing that may change:

- ``keep:GROUP`` -- the fraction of a coupled channel group's channels kept (the groups of
  :mod:`edgeslim.prune.groups`: a conv, its BatchNorm, every conv feeding the same residual
  add ... are one knob, named by the group's first layer); an attention group (a
  transformer's q/k/v outputs) loses whole heads, so its menu holds multiples of one head;
- ``sparsity:LAYER`` -- unstructured sparsity (a float) or an N:M pattern (``"2:4"``);
- ``bits:LAYER`` -- weight bit width, 2 to 8 (activations stay 8-bit: no runtime here runs
  narrower activations);
- ``rank:LAYER`` -- the fraction of a Linear layer's full rank kept by a low-rank
  factorization (1.0: not factored);
- ``precision:model`` -- ``"float"`` or ``"int8"``: the whole model run in float or as int8
  (on ONNX Runtime: the QDQ graph, every Conv / Linear int8), one switch searched together
  with the channels (technique ``"precision"``; where per-layer ``bits`` are searched, they
  replace it).

The keep menu of a group of ``C`` channels is fine-grained and hardware-aware (the widths a
runtime vectorises well, and every uniform pruning point): the widths of the ``keep``
levels, every multiple of ``channel_step`` channels, and ``round(C * k)`` for ``k`` on a
``uniform_step`` grid (the width a uniform pruner with ratio ``1 - k`` leaves), all from the
lowest ``keep`` level up to ``C``.

:class:`SearchSpace` is the user's declaration (menus, allowed techniques, ``exclude``,
fixed values); :meth:`SearchSpace.bind` derives the knobs from the model -- which layer
supports what -- and the target (which techniques change its cost), giving a
:class:`BoundSpace` that samples, validates, encodes and decodes candidates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options
from edgeslim.core.selection import matches

Technique = Literal["channel", "sparsity", "nm", "bits", "lowrank", "precision"]
TECHNIQUES: tuple[str, ...] = ("channel", "sparsity", "nm", "bits", "lowrank")
KNOB_OF = {"channel": "keep", "sparsity": "sparsity", "nm": "sparsity", "bits": "bits"}
KNOB_OF["lowrank"] = "rank"
KNOB_OF["precision"] = "precision"
PRECISIONS = ("float", "int8")
PRECISION_KNOB = "precision:model"
Value = float | int | str


class SearchSpace(Options):
    """What the search may change (see the module docstring).

    ``techniques`` allowed (the target may support fewer: those it does not are dropped,
    and naming one it cannot run is an error at :meth:`bind`); per-technique menus;
    ``exclude`` (layer globs left untouched by every technique); ``fixed`` (knob name or
    glob, e.g. ``"keep:stem.*"`` -> value: those knobs are not searched).
    """

    model_config = ConfigDict(extra="forbid")

    techniques: list[Technique] | None = Field(
        None, description="allowed techniques (default: every one the target supports)"
    )
    keep: list[float] = Field(default_factory=lambda: [1.0, 0.75, 0.5, 0.375, 0.25])
    sparsity: list[float] = Field(default_factory=lambda: [0.0, 0.5, 0.75, 0.9])
    nm: list[str] = Field(default_factory=lambda: ["2:4"])
    bits: list[int] = Field(default_factory=lambda: [8, 6, 4, 3, 2])
    rank: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25])
    exclude: list[str] = Field(default_factory=list, description="layer globs never changed")
    fixed: dict[str, Value] = Field(default_factory=dict, description="knob (glob) -> value")
    min_channels: int = Field(4, ge=1, description="groups narrower than this are not knobs")
    channel_step: int = Field(
        4, ge=0, description="keep menus hold every multiple of this many channels (0: off)"
    )
    uniform_step: float = Field(
        0.05, ge=0, lt=1, description="keep menus hold round(C * k), k on this grid (0: off)"
    )

    @field_validator("keep", "rank")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < x <= 1 for x in v):
            raise ValueError(f"every fraction must be in (0, 1], got {v}")
        return sorted(set(v), reverse=True)

    @field_validator("sparsity")
    @classmethod
    def _sparsities(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= x < 1 for x in v):
            raise ValueError(f"every sparsity must be in [0, 1), got {v}")
        return sorted(set(v))

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if not v or any(not 2 <= b <= 8 for b in v):
            raise ValueError(f"weight bits must be in 2..8, got {v}")
        return sorted(set(v), reverse=True)

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: list[str]) -> list[str]:
        for p in v:
            n, _, m = p.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ValueError(f"N:M pattern {p!r} must read 'N:M' with 0 < N < M")
        return v

    @model_validator(mode="after")
    def _some_technique(self) -> SearchSpace:
        if self.techniques is not None and not self.techniques:
            raise ValueError("techniques is empty: allow at least one, or leave it unset")
        return self

    def bind(
        self,
        model: nn.Module,
        example: Any,
        supported: tuple[str, ...] | list[str] = TECHNIQUES,
        optional: tuple[str, ...] | list[str] = (),
    ) -> BoundSpace:
        """The knobs of ``model`` (traced on ``example``) for a target that runs ``supported``
        (the default techniques) and ``optional`` (searched only when named in
        ``techniques``)."""
        runs = [*supported, *optional]
        allowed = list(self.techniques or supported)
        refused = [t for t in allowed if t not in runs]
        if self.techniques is not None and refused:
            raise ConfigError(
                f"SearchSpace.techniques: {refused} change nothing the target measures or "
                f"cannot run there; this target supports {runs}"
            )
        allowed = [t for t in allowed if t in runs]
        knobs: dict[str, list[Value]] = {}
        info: dict[str, dict[str, Any]] = {}
        if "channel" in allowed:
            for name, channels, layers, heads in channel_groups(model, example, self.exclude):
                if heads:  # attention: whole heads, so the menu counts heads
                    menu = keep_menu(heads, self.keep, 1, self.uniform_step)
                    if len(menu) < 2:
                        continue
                elif channels < self.min_channels:
                    continue
                else:
                    menu = keep_menu(channels, self.keep, self.channel_step, self.uniform_step)
                knobs[f"keep:{name}"] = menu
                info[f"keep:{name}"] = {"channels": channels, "layers": layers, "heads": heads}
        layers = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and not matches(n, self.exclude)
        }
        for name, layer in layers.items():
            menu: list[Value] = []
            if "sparsity" in allowed:
                menu += self.sparsity
            if "nm" in allowed and _nm_ok(layer):
                menu += [p for p in self.nm if layer.weight.shape[1] % int(p.split(":")[1]) == 0]
            if len(menu) > 1 or (menu and menu[0] != 0.0):
                knobs[f"sparsity:{name}"] = [0.0, *[v for v in menu if v != 0.0]]
            if "bits" in allowed:
                knobs[f"bits:{name}"] = list(self.bits)
            if "lowrank" in allowed and isinstance(layer, nn.Linear):
                full = min(layer.in_features, layer.out_features)
                useful = [
                    r
                    for r in self.rank
                    if r == 1.0
                    or max(1, round(full * r)) * (layer.in_features + layer.out_features)
                    < layer.in_features * layer.out_features
                ]
                if len(useful) > 1:
                    knobs[f"rank:{name}"] = useful
        if "precision" in allowed and "bits" not in allowed and layers:
            knobs[PRECISION_KNOB] = list(PRECISIONS)
        for key, value in self.fixed.items():
            hit = [k for k in knobs if matches(k, (key,))]
            if not hit:
                raise ConfigError(
                    f"SearchSpace.fixed[{key!r}] matches no knob of {type(model).__name__}; "
                    f"knobs look like {sorted(knobs)[:4]}"
                )
            for k in hit:
                if value not in knobs[k] and not _valid(k, value):
                    raise ConfigError(
                        f"SearchSpace.fixed[{key!r}] = {value!r} is not valid for {k}"
                    )
                knobs[k] = [value]
        if not knobs:
            raise ConfigError(
                f"the search space of {type(model).__name__} is empty: techniques {allowed}, "
                f"exclude {self.exclude}; nothing the target measures can change"
            )
        return BoundSpace(knobs, info, tuple(allowed))


def _keep_value(channels: int, keep: float) -> float:
    """``keep`` rounded to a whole number of channels (so that equal plans compare equal)."""
    return round(max(1, round(channels * keep)) / channels, 6)


def keep_menu(channels: int, levels: list[float], step: int = 0, grid: float = 0.0) -> list[float]:
    """The keep fractions of a group of ``channels`` (highest first): the ``levels``, every
    multiple of ``step`` channels and ``round(channels * k)`` for ``k`` on a ``grid`` (the
    width a uniform pruner of ratio ``1 - k`` leaves), none outside the levels' range."""
    widths = {max(1, round(channels * k)) for k in levels}
    floor, ceiling = min(widths), max(widths)
    if step > 0:
        widths |= set(range(step, channels + 1, step))
    if grid > 0:
        k = grid
        while k < 1 + 1e-9:
            widths.add(max(1, round(channels * k)))
            k += grid
    return sorted({round(w / channels, 6) for w in widths if floor <= w <= ceiling}, reverse=True)


def _nm_ok(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


def _valid(knob: str, value: Any) -> bool:
    kind = knob.split(":", 1)[0]
    if kind in ("keep", "rank"):
        return isinstance(value, int | float) and 0 < value <= 1
    if kind == "bits":
        return isinstance(value, int) and 2 <= value <= 8
    if kind == "precision":
        return value in PRECISIONS
    if kind == "sparsity":
        if isinstance(value, str):
            n, _, m = value.partition(":")
            return n.isdigit() and m.isdigit() and 0 < int(n) < int(m)
        return isinstance(value, int | float) and 0 <= value < 1
    return False


def channel_groups(
    model: nn.Module, example: Any, exclude: list[str]
) -> list[tuple[str, int, list[str], int]]:
    """``(name, channels, layers, heads)`` of every prunable coupled channel group of
    ``model``; ``heads`` > 0 for an attention group (q/k/v outputs), which loses whole heads:
    its keep values are multiples of ``1 / heads``."""
    import copy
    import warnings

    from edgeslim.prune.groups import prepare
    from edgeslim.prune.plan import ProbeOptions

    probe = copy.deepcopy(model)
    if isinstance(example, torch.Tensor):
        example = example[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, groups = prepare(probe, example, ProbeOptions(ignore=list(exclude)))
    return [(g.name, g.channels // max(1, g.ch_groups), g.layers, g.heads) for g in groups]


@dataclass
class BoundSpace:
    """The knobs of one model for one target: ``knobs[name]`` is its menu of values."""

    knobs: dict[str, list[Value]]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    techniques: tuple[str, ...] = ()

    def sample(self, rng: random.Random) -> dict[str, Value]:
        """A uniformly random candidate (``rng`` seeded by the caller)."""
        return {k: rng.choice(menu) for k, menu in self.knobs.items()}

    def dense(self) -> dict[str, Value]:
        """The candidate that changes nothing it may avoid (the first menu entries that do)."""
        out = {}
        for k, menu in self.knobs.items():
            kind = k.split(":")[0]
            neutral = {"keep": 1.0, "rank": 1.0, "sparsity": 0.0, "bits": 8, "precision": "float"}[
                kind
            ]
            out[k] = neutral if neutral in menu else menu[0]
        return out

    def uniform(self, keep: float, precision: str | None = None) -> dict[str, Value]:
        """:meth:`dense` with every channel group at the kept fraction nearest ``keep`` (its
        menu is rounded per group): the uniform-pruning point of that level; run at
        ``precision`` where the space has that switch."""
        out = self.dense()
        for k, menu in self.knobs.items():
            if k.startswith("keep:"):
                out[k] = min(menu, key=lambda v: (abs(float(v) - keep), -float(v)))
        if precision is not None and precision in self.knobs.get(PRECISION_KNOB, []):
            out[PRECISION_KNOB] = precision
        return out

    def precisions(self) -> list[str | None]:
        """The precision switch's values (``[None]`` when the space has no switch)."""
        return list(self.knobs.get(PRECISION_KNOB, [None]))  # type: ignore[arg-type]

    def neighbours(self, candidate: dict[str, Value], knob: str) -> list[Value]:
        """The values next to ``candidate[knob]`` on its menu (one step either way)."""
        menu = self.knobs[knob]
        i = menu.index(candidate[knob])
        return [menu[j] for j in (i - 1, i + 1) if 0 <= j < len(menu)]

    def anchors(self, levels: list[float]) -> list[dict[str, Value]]:
        """The points every search tries first: :meth:`dense`, :meth:`smallest`, then
        :meth:`uniform` at each of ``levels`` (duplicates dropped, in that order)."""
        out: list[dict[str, Value]] = []
        for c in [self.dense(), self.smallest(), *(self.uniform(k) for k in levels)]:
            if c not in out:
                out.append(c)
        return out

    def smallest(self) -> dict[str, Value]:
        """The candidate that removes the most: lowest keep / rank / bits, highest sparsity."""
        out: dict[str, Value] = {}
        for k, menu in self.knobs.items():
            kind = k.split(":")[0]
            if kind == "sparsity":
                floats = [v for v in menu if isinstance(v, float)]
                out[k] = max(floats) if floats else menu[-1]
            elif kind == "precision":
                out[k] = "int8" if "int8" in menu else menu[0]
            else:
                out[k] = min(menu)
        return out

    def encode(self, candidate: dict[str, Value]) -> dict[str, Value]:
        """``candidate`` as a plain JSON-able dict, checked (see :meth:`decode`)."""
        return dict(sorted(self.decode(candidate).items()))

    def decode(self, data: dict[str, Any]) -> dict[str, Value]:
        """A candidate from a plain dict: every knob present, every value on its menu."""
        if not isinstance(data, dict):
            raise ConfigError(f"a candidate is a dict of knob -> value, got {type(data).__name__}")
        unknown = sorted(set(data) - set(self.knobs))
        if unknown:
            raise ConfigError(f"candidate: unknown knob(s) {unknown}; known: {sorted(self.knobs)}")
        missing = sorted(set(self.knobs) - set(data))
        if missing:
            raise ConfigError(f"candidate: missing knob(s) {missing}")
        for k, v in data.items():
            if v not in self.knobs[k]:
                raise ConfigError(f"candidate[{k!r}] = {v!r} is not on its menu {self.knobs[k]}")
        return {k: data[k] for k in self.knobs}

    def describe(self) -> dict[str, Any]:
        """The knobs and their menus (for the run directory's meta file)."""
        return {"techniques": list(self.techniques), "knobs": self.knobs}
