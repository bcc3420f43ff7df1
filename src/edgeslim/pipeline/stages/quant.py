"""The ``quantize`` pipeline stage: ``{method: NAME, ...method's own keys}``.

Methods: ``int8_ptq``, ``qat``, ``lsq``, ``mixed_precision``, ``dynamic_fixed_point``,
``bwn``, ``twn``, ``ttq``, and the one-shot methods for language models ``gptq``, ``rtn``,
``smoothquant`` (see :data:`edgeslim.quant.METHODS`). Calibration data is
``data.calib(calib_size)`` from the training split, or for the one-shot methods
(``needs_calib``) the recipe's calibration set. A stage ``finetune`` is the training
schedule of the methods that train (QAT, LSQ, BWN, TWN, TTQ); for the others it fine-tunes
the quantized model through fake quantization afterwards.

The stage's artifact is ``weights.int.safetensors``: integer weights packed at their bit
width (:mod:`.pack`), so ``size_bytes`` is what the quantized weights really take. A
transformers model is saved as ``hf/`` (packed codes, reloadable with ``load_model("hf:DIR")``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.pipeline.stages.base import StageKind, register_stage

ARTIFACT = "weights.int.safetensors"
_TRAINING = {"qat", "lsq", "bwn", "twn", "ttq"}
_ONE_SHOT = {"gptq", "rtn", "smoothquant"}  # layer by layer on language models, in place


class QuantizeStage(BaseModel):
    """A validated quantize stage: the method's name and its config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    config: BaseModel

    def to_recipe(self) -> dict[str, Any]:
        return {"method": self.method, **self.config.model_dump()}


def parse(body: Any, where: str) -> QuantizeStage:
    from edgeslim.quant import METHODS

    if not isinstance(body, dict) or "method" not in body:
        raise ConfigError(f"{where}: must be a mapping with a 'method' key, got {body!r}")
    method = body["method"]
    if method not in METHODS:
        raise ConfigError(
            f"{where}.method: unknown quantization method {method!r}; known: {sorted(METHODS)}"
        )
    rest = {k: v for k, v in body.items() if k != "method"}
    return QuantizeStage(method=method, config=validate(METHODS[method], rest, where))


def _calib(cfg: BaseModel, ctx) -> Any:
    n = getattr(cfg, "calib_size", None)
    return None if n is None else ctx.data.calib(min(n, len(ctx.data.train)), seed=ctx.seed)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.core.train import fit
    from edgeslim.quant import accepted, quantize_
    from edgeslim.quant.modules import set_mode

    cfg: QuantizeStage = stage.config
    train = None
    if stage.finetune is not None:
        train = stage.finetune.model_copy(update={"seed": ctx.seed})
    context = accepted(
        cfg.config,
        data=ctx.data,
        train=train if cfg.method in _TRAINING else None,
        teacher=ctx.teacher,
        progress=ctx.progress,
        seed=ctx.seed,
    )
    if getattr(cfg.config, "needs_calib", False):  # one-shot, layer by layer (GPTQ ...)
        calib = ctx.calibration()
    else:
        calib = _calib(cfg.config, ctx)
    qmodel = quantize_(model, cfg.config, calib=calib, **context)
    log = dict(getattr(qmodel, "quant_info", {}))
    if train is not None and cfg.method not in _TRAINING and train.epochs:
        set_mode(qmodel, "fake")
        log["finetune"] = fit(qmodel, ctx.data, train, teacher=ctx.teacher, progress=ctx.progress)
        set_mode(qmodel, getattr(cfg.config, "simulate", "exact"))
    return qmodel, _jsonable(log)


def rebuild(model, stage, log, example) -> Any:
    """The structure ``run`` creates, without calibration or training (to resume into)."""
    from edgeslim.quant.modules import quant_layers, set_mode
    from edgeslim.quant.ptq import Int8PTQ, prepare
    from edgeslim.quant.qat import LSQ, enable_lsq
    from edgeslim.quant.ternary import lowbit_

    cfg = stage.config.config
    if stage.config.method in _ONE_SHOT:  # their buffers are restored with the state
        return model
    if stage.config.method in ("bwn", "twn", "ttq"):
        return lowbit_(model, cfg.model_copy(update={"epochs": 0}))
    if stage.config.method == "dynamic_fixed_point":
        ptq = Int8PTQ(weight_bits=cfg.bits, activation_bits=cfg.bits, graph="fx")
    elif stage.config.method == "mixed_precision":
        ptq = Int8PTQ(
            calibration=cfg.calibration, weight_calibration=cfg.weight_calibration, graph=cfg.graph
        )
    else:
        ptq = Int8PTQ.model_validate(cfg.model_dump(include=set(Int8PTQ.model_fields)))
    for key in ("skip_first", "skip_last", "exclude"):
        ptq = ptq.model_copy(update={key: getattr(cfg, key)})
    qmodel, _ = prepare(model, ptq)
    if isinstance(cfg, LSQ):
        enable_lsq(qmodel)
    if stage.config.method == "dynamic_fixed_point":
        for layer in quant_layers(qmodel).values():
            layer.scale_locked = True
    set_mode(qmodel, "exact")
    return qmodel


def artifact(model, stage, directory: Path) -> tuple[str, Path]:
    from edgeslim.core.models.hf import is_hf_model, save_hf
    from edgeslim.quant.pack import save_packed

    if is_hf_model(model):
        return "hf", save_hf(model, Path(directory) / "hf")
    path = Path(directory) / ARTIFACT
    save_packed(model, path)
    return "int", path


register_stage(StageKind("quantize", parse, run, artifact, rebuild=rebuild))
