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

from edgeslim.core.models.hf import is_hf_model, save_hf
from edgeslim.core.registry import Context
from edgeslim.pipeline.stages.base import StageKind, register_stage
from edgeslim.pipeline.stages.method import MethodStage, calibration, parse_method, verb_context
from edgeslim.quant import REGISTRY, quantize, quantize_
from edgeslim.quant.modules import fake_quant_training, quant_layers, set_mode
from edgeslim.quant.pack import save_packed
from edgeslim.quant.ptq import Int8PTQ, prepare
from edgeslim.quant.qat import LSQ, enable_lsq
from edgeslim.quant.ternary import lowbit_

ARTIFACT = "weights.int.safetensors"
_ONE_SHOT = {"gptq", "rtn", "smoothquant"}  # layer by layer on language models, in place


def parse(body: Any, where: str) -> MethodStage:
    return parse_method(body, where, REGISTRY, "quantization method")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def _trains(stage: Any) -> bool:
    return stage.config.config.trains


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    cfg = stage.config.config
    context = verb_context(REGISTRY, cfg, ctx, ("data", "teacher", "progress", "seed"))
    if cfg.trains and stage.finetune is not None:  # the stage's finetune is its schedule
        context.update(
            REGISTRY.accepted(cfg, train=stage.finetune.model_copy(update={"seed": ctx.seed}))
        )
    if cfg.in_place():  # one-shot LLM methods, ternary ...: no copy of a big model
        quantize_(model, cfg, calib=calibration(cfg, ctx), **context)
        return model, _jsonable(dict(getattr(model, "quant_info", {})))
    qmodel = quantize(model, cfg, calib=calibration(cfg, ctx), **context)
    return qmodel, _jsonable(dict(getattr(qmodel, "quant_info", {})))


def rebuild(model, stage, log, example) -> Any:
    """The structure ``run`` creates, without calibration or training (to resume into)."""
    cfg = stage.config.config
    if stage.config.method in _ONE_SHOT:  # their buffers are restored with the state
        return model
    if stage.config.method in ("bwn", "twn", "ttq"):
        return lowbit_(model, cfg.model_copy(update={"epochs": 0}), Context())
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


def artifact(model, stage, directory: Path, example) -> tuple[str, Path, dict[str, Any]]:
    if is_hf_model(model):
        return "hf", save_hf(model, Path(directory) / "hf"), {}
    path = Path(directory) / ARTIFACT
    save_packed(model, path)
    return "int", path, {}


register_stage(
    StageKind(
        "quantize",
        parse,
        run,
        artifact,
        rebuild=rebuild,
        trains=_trains,
        tuning=fake_quant_training,
    )
)
