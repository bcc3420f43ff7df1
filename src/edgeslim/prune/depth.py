"""Depth pruning: remove whole residual blocks, which their skip connection makes removable.

Andreas Veit, Michael Wilber, Serge Belongie. "Residual Networks Behave Like Ensembles of
Relatively Shallow Networks", NeurIPS 2016. https://arxiv.org/abs/1605.06431 (deleting one
residual block barely hurts: the rest of the net still sees the skip path)
Tien-Ju Yang et al. "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications", ECCV 2018. https://arxiv.org/abs/1804.03230 (choose by measured latency, not
MACs)

A residual block computes ``y = x + f(x)`` (or ``relu(x + f(x))``). Removing it leaves its
skip path, ``x`` (or ``relu(x)``): the model keeps every shape and simply runs fewer ops. For
small nets run at batch 1 in PyTorch eager, whose time is mostly per-op overhead, that is the
speedup that narrowing channels cannot give.

Three steps, as for channels:

1. **find** (:func:`residual_blocks`): modules whose traced graph (``torch.fx``) ends in an add
   of the module's own input and something else, optionally followed by a ReLU. Anything
   ``torch.fx`` cannot trace is simply not a candidate.
2. **choose** (:func:`choose_blocks`): greedily, the block whose removal changes the model's
   output least (relative squared error on calibration inputs) per unit of cost saved -- MACs,
   or the latency measured in the target runtime (``cost="latency"``, ``runtime="torch"`` or
   ``"onnxruntime"``, batch 1), re-measured after every removal -- until ``blocks`` are gone or
   the MACs are down to ``macs`` of the dense model's.
3. **surgery** (:func:`bypass_`): the block is replaced by :class:`Bypass`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.fx
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.device import model_device
from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.fxpatterns import activation, is_add
from edgeslim.core.hooks import eval_mode
from edgeslim.core.masks import iter_masks
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.core.selection import matches
from edgeslim.profiling.latency import measure_latency_ms
from edgeslim.profiling.runtimes import ort_latency_ms, ort_session
from edgeslim.prune.budget import count_macs
from edgeslim.prune.registry import REGISTRY, STRUCTURAL_TAKES


class DepthPrune(Options):
    """Remove whole residual blocks (x + f(x) -> x), least output damage per cost first.

    Give exactly one target: ``blocks`` (how many to remove), ``macs`` (fraction of the MACs
    to keep; an error if removing every removable block does not get there) or ``names`` (the
    blocks, by module name). ``cost`` is what a removal is credited with when ranking:
    ``macs``, or ``latency`` measured in ``runtime`` at batch 1 (NetAdapt-style).
    """

    model_config = ConfigDict(extra="forbid")

    blocks: int | None = Field(None, ge=1)
    macs: float | None = Field(None, gt=0, lt=1, description="fraction of MACs to keep")
    names: list[str] | None = None
    cost: Literal["macs", "latency"] = "macs"
    runtime: Literal["torch", "onnxruntime"] = "torch"
    ignore: list[str] = Field(default_factory=list, description="blocks (names/globs) kept")
    samples: int = Field(256, ge=1, description="calibration inputs for the output damage")
    repeats: int = Field(50, ge=1, description="timed runs per latency measurement")

    @model_validator(mode="after")
    def _one_target(self) -> DepthPrune:
        self.require_one_of("blocks", "macs", "names")
        if self.names is not None and not self.names:
            raise ValueError("'names' is empty: name at least one block")
        return self


# --------------------------------------------------------------------------------------
# 1. find
# --------------------------------------------------------------------------------------


class Bypass(nn.Module):
    """What a removed residual block leaves: its skip path, ``x`` or ``relu(x)``."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if self.relu else x

    def extra_repr(self) -> str:
        return "relu" if self.relu else "identity"


def _through_identity(node: Any, module: nn.Module) -> Any:
    """Follow ``nn.Identity`` calls back to what they pass on."""
    while (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and isinstance(module.get_submodule(str(node.target)), nn.Identity)
    ):
        node = node.args[0]
    return node


def skip_kind(module: nn.Module) -> Bypass | None:
    """The :class:`Bypass` that ``module`` reduces to when its branch is removed, or None.

    ``module`` must be ``x + f(x)`` or ``relu(x + f(x))`` for its single input ``x``.
    """
    if isinstance(module, Bypass | nn.Identity) or not list(module.children()):
        return None
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # anything fx cannot trace is no candidate
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    if len(inputs) != 1 or not isinstance(out, torch.fx.Node):
        return None
    relu = activation(out, dict(module.named_modules(remove_duplicate=False))) == "relu"
    if relu:
        out = out.args[0]
    if not isinstance(out, torch.fx.Node) or not is_add(out, methods=True) or len(out.args) != 2:
        return None
    if any(_through_identity(a, module) is inputs[0] for a in out.args):
        return Bypass(relu)
    return None


def residual_blocks(model: nn.Module, ignore: list[str] | None = None) -> dict[str, Bypass]:
    """Removable residual blocks by name (outermost first), with what each reduces to."""
    found: dict[str, Bypass] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{b}.") for b in found):
            continue
        if matches(name, ignore or ()):
            continue
        bypass = skip_kind(module)
        if bypass is not None:
            found[name] = bypass
    return found


# --------------------------------------------------------------------------------------
# 3. surgery
# --------------------------------------------------------------------------------------


def bypass_(model: nn.Module, name: str, bypass: Bypass | None = None) -> None:
    """Replace block ``name`` of ``model`` by its skip path (in place)."""
    if bypass is None:
        found = residual_blocks(model)
        if name not in found:
            raise ConfigError(
                f"{name!r} is not a removable residual block of {type(model).__name__}; "
                f"removable: {list(found) or 'none'}"
            )
        bypass = found[name]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, bypass)


def replay_depth_(model: nn.Module, names: list[str]) -> None:
    """Remove the blocks :func:`depth_prune_` removed again (e.g. on pipeline resume)."""
    for name in names:
        bypass_(model, name)


# --------------------------------------------------------------------------------------
# 2. choose
# --------------------------------------------------------------------------------------


def output_damage(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    """||model(x) - reference||^2 / ||reference||^2."""
    with eval_mode(model), torch.no_grad():
        out = model(x).float()
    return float((out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-12))


def measured_ms(model: nn.Module, x1: torch.Tensor, runtime: str, repeats: int) -> float:
    """Median batch-1 latency of ``model`` in ``runtime`` (ONNX Runtime: exported, 1 thread)."""
    if runtime == "torch":
        return measure_latency_ms(model, x1, repeats=repeats)
    session = ort_session(copy.deepcopy(model), x1)
    return ort_latency_ms(session, x1, repeats=repeats)


def choose_blocks(model: nn.Module, x: torch.Tensor, cfg: DepthPrune) -> list[str]:
    """Block names to remove, in order (see the module docstring, step 2)."""
    work = copy.deepcopy(model)
    candidates = residual_blocks(work, cfg.ignore)
    if cfg.names is not None:
        unknown = [n for n in cfg.names if n not in candidates]
        if unknown:
            raise ConfigError(
                f"{unknown} are not removable residual blocks of {type(model).__name__}; "
                f"removable: {list(candidates) or 'none'}"
            )
        return list(cfg.names)
    with eval_mode(work), torch.no_grad():
        reference = work(x).float()
    dense_macs = count_macs(work, x)

    def cost(m: nn.Module) -> float:
        if cfg.cost == "macs":
            return float(count_macs(m, x))
        return measured_ms(m, x[:1], cfg.runtime, cfg.repeats)

    chosen: list[str] = []
    while candidates:
        if cfg.blocks is not None and len(chosen) >= cfg.blocks:
            break
        if cfg.macs is not None and count_macs(work, x) <= cfg.macs * dense_macs:
            break
        now = cost(work)
        best, best_value = None, float("inf")
        for name, bypass in candidates.items():
            trial = copy.deepcopy(work)
            bypass_(trial, name, bypass)
            saved = max(now - cost(trial), 1e-9)
            value = output_damage(trial, x, reference) / saved
            if value < best_value:
                best, best_value = name, value
        assert best is not None
        bypass_(work, best, candidates.pop(best))
        chosen.append(best)
    if cfg.blocks is not None and len(chosen) < cfg.blocks:
        raise ConfigError(
            f"{type(model).__name__} has {len(chosen)} removable residual block(s) "
            f"({', '.join(chosen) or 'none'}), fewer than blocks={cfg.blocks}"
        )
    if cfg.macs is not None and count_macs(work, x) > cfg.macs * dense_macs:
        reached = count_macs(work, x) / dense_macs
        raise ConfigError(
            f"removing every removable residual block of {type(model).__name__} keeps "
            f"{reached:.2f} of the MACs, not {cfg.macs}: lower the target's ambition or cut "
            "channels too (ChannelPrune)"
        )
    return chosen


# --------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------


def depth_prune_(model: nn.Module, cfg: DepthPrune, ctx: Context) -> dict[str, float]:
    """Remove residual blocks of ``model`` in place; returns ``{block name: 1.0}`` per removal.

    The output damage is measured on ``calib`` (inputs, or ``(x, y)``), else ``samples`` of
    ``data``'s calibration set, else ``example``. Blocks for which ``filter_fn(module, name)``
    is False are kept.
    """
    filter_fn, example, data, calib = ctx.filter_fn, ctx.example, ctx.data, ctx.calib
    if any(True for _ in iter_masks(model)):
        raise ConfigError(
            "the model carries unstructured pruning masks; call edgeslim.prune.remove_masks_ "
            "before depth pruning"
        )
    x = calib[0] if isinstance(calib, tuple) else calib
    if x is None and data is not None:
        x = data.calib(min(cfg.samples, len(data.train)))
    if x is None:
        x = example
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
        raise ShapeError(
            "DepthPrune needs inputs to measure output damage: pass example=, calib= or data="
        )
    if filter_fn is not None:
        kept = [n for n, m in model.named_modules() if n and not filter_fn(m, n)]
        cfg = cfg.model_copy(update={"ignore": [*cfg.ignore, *kept]})
    names = choose_blocks(model, x[: cfg.samples].to(model_device(model)), cfg)
    replay_depth_(model, names)
    return dict.fromkeys(names, 1.0)


def replay_blocks_(model: nn.Module, cfg: DepthPrune, log: dict, example: Any) -> nn.Module:
    """Remove the residual blocks a ``DepthPrune`` log names again."""
    replay_depth_(model, list(log))
    return model


REGISTRY.register("depth", DepthPrune, depth_prune_, takes=STRUCTURAL_TAKES, replay=replay_blocks_)
