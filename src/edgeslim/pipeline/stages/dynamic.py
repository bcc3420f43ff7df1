"""Dynamic-inference stages: ``exits``, ``gating``, ``cache`` and ``multitask``.

    - exits: {after: [conv1, conv2], hidden: 128, pool: 6,
              train: {epochs: 15}, calibrate: {max_loss: 0.003}}
    - gating: {density: 0.5, anneal: 0.5}         # gates every inverted-residual block
      finetune: {epochs: 5, lr: 0.001, distill: {alpha: 0.5}}
    - cache: {frames: synthetic:test, n_frames: 300, thresholds: [0.01, 0.02, 0.05]}
    - multitask: {after: fc1, tasks: {digit: label, parity: parity}}
      finetune: {epochs: 5, lr: 0.001}

Each logs a ``tradeoff`` entry (accuracy against average MACs: the exits' threshold sweep,
the gates' density sweep, the cache's threshold sweep, the shared trunk against one network
per task) that the run report plots. ``exits``, ``gating`` and
``multitask`` change the model's structure; a resumed run rebuilds it from the stage's
config (:func:`rebuild_exits` ...), then loads the saved state (thresholds included).
``cache`` leaves the model as it is and measures a frame stream.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.dynamic.calibration import ExitCalibration
from edgeslim.dynamic.exits import Exits, ExitTraining
from edgeslim.pipeline.stages.base import StageKind, register_stage


class ExitsStage(Exits):
    """``Exits`` plus how to train and calibrate them."""

    model_config = ConfigDict(extra="forbid")

    train: ExitTraining = Field(default_factory=ExitTraining)
    calibrate: ExitCalibration = Field(default_factory=lambda: ExitCalibration(max_loss=0.003))

    def to_recipe(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class GatingStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[str] | None = None
    density: float = Field(0.5, gt=0, le=1)
    l1: float = Field(1e-4, ge=0)
    anneal: float = Field(0.0, ge=0, le=1, description="density schedule (train_gates)")
    sweep: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
        description="densities of the accuracy-compute curve (set_density at inference)",
    )

    def to_recipe(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class CacheStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frames: str = Field("synthetic:test", description="synthetic[:SPLIT] or frames:PATH")
    n_frames: int = Field(300, ge=2, description="synthetic: number of frames")
    block: int = Field(4, ge=1)
    search: int = Field(2, ge=0, le=8)
    thresholds: list[float] = Field(default_factory=lambda: [0.0, 0.02, 0.05, 0.1], min_length=1)
    tile: int = Field(2, ge=1)
    until: str | None = None

    def to_recipe(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class MultitaskStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: str
    tasks: dict[str, str] = Field(..., min_length=1)

    def to_recipe(self) -> dict[str, Any]:
        return self.model_dump()


def _parser(model_type: type[BaseModel]):
    def parse(body: Any, where: str) -> BaseModel:
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: must be a mapping, got {body!r}")
        return validate(model_type, body, where)

    return parse


# -- exits -----------------------------------------------------------------------------


def run_exits(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.dynamic import add_exits_, calibrate_exits, count_macs, train_exits
    from edgeslim.dynamic.plot import tradeoff

    cfg: ExitsStage = stage.config
    em = add_exits_(model, Exits(**cfg.model_dump(include=set(Exits.model_fields))),
                    example=ctx.example)  # fmt: skip
    train = cfg.train.model_copy(update={"seed": ctx.seed})
    history = train_exits(em, ctx.data, train, progress=ctx.progress)
    cal = calibrate_exits(em, ctx.data, cfg.calibrate)
    test = ctx.data.test
    avg = count_macs(em, test.x) / len(test)
    em.eval()
    log = {
        "thresholds": cal["thresholds"],
        "val": {k: cal[k] for k in ("accuracy", "macs", "shares", "static_accuracy")},
        "static_macs": cal["static_macs"],
        "test_avg_macs": avg,
        "test_exit_shares": _shares(em.last_exit, em.num_exits),
        "train_history": history,
        "tradeoff": tradeoff(
            cal["curve"],
            {"macs": cal["static_macs"], "accuracy": cal["static_accuracy"]},
            cal,
            x_label="average MACs per input (validation)",
        ),
    }
    return em, log


def _shares(taken, n: int) -> list[float]:
    import torch

    return (torch.bincount(taken, minlength=n).double() / max(1, len(taken))).tolist()


def rebuild_exits(model, stage, log, example) -> Any:
    from edgeslim.dynamic import add_exits_

    cfg = stage.config
    return add_exits_(model, Exits(**cfg.model_dump(include=set(Exits.model_fields))),
                      example=example)  # fmt: skip


# -- gating ----------------------------------------------------------------------------


def run_gating(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    import copy

    from edgeslim.core.train import FINETUNE_DEFAULTS, TrainConfig, evaluate
    from edgeslim.dynamic import (
        ChannelGating,
        count_macs,
        gate_channels_,
        set_density,
        train_gates,
    )
    from edgeslim.dynamic.plot import tradeoff

    cfg: GatingStage = stage.config
    static_macs = count_macs(model, ctx.example[:1])
    teacher = ctx.teacher or copy.deepcopy(model).eval()
    static_acc = evaluate(teacher, ctx.data, "val")
    units = gate_channels_(model, ChannelGating(**cfg.model_dump(exclude={"anneal", "sweep"})))
    ft = stage.finetune or TrainConfig(**FINETUNE_DEFAULTS)
    history = train_gates(model, ctx.data, ft.model_copy(update={"seed": ctx.seed}), l1=cfg.l1,
                          teacher=teacher if ft.distill is not None else None,
                          progress=ctx.progress, anneal=cfg.anneal)  # fmt: skip
    model.eval()
    n = min(200, len(ctx.data.test))
    avg = count_macs(model, ctx.data.test.x[:n]) / n
    chosen = {"macs": _val_macs(model, ctx.data), "accuracy": evaluate(model, ctx.data, "val")}
    points = []
    for density in sorted(set(cfg.sweep)):  # the same gates, more or fewer channels kept
        set_density(model, density)
        points.append({"density": density, "macs": _val_macs(model, ctx.data),
                       "accuracy": evaluate(model, ctx.data, "val")})  # fmt: skip
    set_density(model)
    return model, {
        "units": units,
        "static_macs": static_macs,
        "test_avg_macs": avg,
        "val_accuracy": chosen["accuracy"],
        "sweep": points,
        "train_history": history,
        "tradeoff": tradeoff(
            [*points, chosen],
            {"macs": static_macs, "accuracy": static_acc},
            chosen,
            x_label="average MACs per input (validation)",
        ),
    }


def _val_macs(model, data, n: int = 100) -> float:
    from edgeslim.dynamic import count_macs

    x = data.val.x[:n]
    return count_macs(model, x) / len(x)


def rebuild_gating(model, stage, log, example) -> Any:
    from edgeslim.dynamic import ChannelGating, gate_channels_

    gate_channels_(model, ChannelGating(**stage.config.model_dump(exclude={"anneal", "sweep"})))
    return model


# -- cache -----------------------------------------------------------------------------


def run_cache(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.core.data.video import load_frames
    from edgeslim.dynamic.cache import FrameCache, stream_stats
    from edgeslim.dynamic.plot import tradeoff

    cfg: CacheStage = stage.config
    video = load_frames(cfg.frames, n_frames=cfg.n_frames, seed=ctx.seed)
    model.eval()
    rows = []
    for t in cfg.thresholds:
        fc = FrameCache(block=cfg.block, search=cfg.search, threshold=t, tile=cfg.tile,
                        until=cfg.until)  # fmt: skip
        rows.append({"threshold": t, **stream_stats(model, video, fc)})
    static = {"macs": rows[0]["static_macs"], "accuracy": rows[0]["static_accuracy"]}
    log = {
        "frames": cfg.frames,
        "n_frames": len(video),
        "sweep": rows,
        "tradeoff": tradeoff(rows, static, x_label="average MACs per frame"),
    }
    return model, log


# -- multitask -------------------------------------------------------------------------


def run_multitask(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.core.train import FINETUNE_DEFAULTS, TrainConfig, evaluate
    from edgeslim.dynamic import count_macs
    from edgeslim.dynamic.multitask import Heads, add_heads, task_accuracy, train_heads
    from edgeslim.dynamic.plot import tradeoff

    cfg: MultitaskStage = stage.config
    one_net = count_macs(model, ctx.example[:1])
    first, kind = next(iter(cfg.tasks.items()))
    baseline = evaluate(model, ctx.data, "val") if kind == "label" else None  # before sharing
    mh = add_heads(model, validate(Heads, cfg.model_dump(), "multitask"))
    ft = stage.finetune or TrainConfig(**FINETUNE_DEFAULTS)
    history = train_heads(mh, ctx.data, ft.model_copy(update={"seed": ctx.seed}),
                          progress=ctx.progress)  # fmt: skip
    mh.eval()
    shared = count_macs(mh.forward_all, ctx.example[:1])
    val = task_accuracy(mh, ctx.data.val.x, ctx.data.val.y)
    log = {
        "tasks": list(mh.tasks),
        "test_accuracy": task_accuracy(mh, ctx.data.test.x, ctx.data.test.y),
        "val_accuracy": val,
        "macs_all_tasks": shared,
        "macs_one_network": one_net,
        "train_history": history,
    }
    if baseline is not None:  # task 1's accuracy against the compute of every task's answer
        point = {"macs": shared, "accuracy": val[first]}
        log["tradeoff"] = tradeoff(
            [point],
            {"macs": len(cfg.tasks) * one_net, "accuracy": baseline},
            point,
            x_label=f"MACs for all tasks (square: {len(cfg.tasks)} separate networks)",
        )
    return mh, log


def rebuild_multitask(model, stage, log, example) -> Any:
    from edgeslim.dynamic.multitask import Heads, add_heads

    return add_heads(model, validate(Heads, stage.config.model_dump(), "multitask"))


register_stage(StageKind("exits", _parser(ExitsStage), run_exits, rebuild=rebuild_exits))
register_stage(StageKind("gating", _parser(GatingStage), run_gating, rebuild=rebuild_gating))
register_stage(StageKind("cache", _parser(CacheStage), run_cache))
register_stage(
    StageKind("multitask", _parser(MultitaskStage), run_multitask, rebuild=rebuild_multitask)
)
