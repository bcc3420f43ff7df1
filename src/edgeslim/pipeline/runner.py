"""Pipeline: run a recipe stage by stage, measure every stage, checkpoint, resume.

Run directory layout (``out``)::

    recipe.yaml          the validated recipe, defaults filled in
    stage-0/             the baseline (trained dense model), then stage-1/, stage-2/, ...
      state.safetensors  exact state (weights + pruning masks): what a resume loads
      weights.<fmt>.safetensors  the deployable weights, dense or sparse, whichever is smaller
                         (a stage kind with an ``artifact`` writer saves its own file instead,
                         e.g. a ``.slim`` container); metrics record its format and size
      model.pt2          the whole model, reloadable without its class (``load_model``)
      meta.json          the stage's metrics row, the recipe-prefix hash, the state's sha256
    metrics.jsonl        one row per finished stage (rebuilt from the meta.json files)
    report.md, plots/    the run report

The model runs on the recipe's ``device`` (``--device`` overrides it): it is loaded on the CPU,
a resume's finished state is loaded into it there, then it moves to the device for every
stage's work, evaluation and profiling; the files of a stage are written from the CPU (the
model moves there to be written and back). A stage directory is written under a temporary
name and renamed when complete, so after an interruption every ``stage-N/`` is whole.
Re-running the same recipe into the same directory resumes after the last finished stage;
stage seeds depend only on the recipe seed and the stage index, so the final weights are
bitwise identical to an uninterrupted run on the same device.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from edgeslim.core.data.datasets import DataSplits, load_data
from edgeslim.core.data.transforms import apply_transform
from edgeslim.core.device import model_device, to_device
from edgeslim.core.device_check import check_device
from edgeslim.core.errors import CheckpointError, RunDirError
from edgeslim.core.fileio import save_tensors
from edgeslim.core.metrics import display, format_value, get_metric
from edgeslim.core.models.hf import is_hf_model, restore_buffers_, save_hf
from edgeslim.core.models.io import load_model, save_model
from edgeslim.core.models.storage import FORMATS, deployable_state, payload_bytes, save_weights
from edgeslim.core.progress import console
from edgeslim.core.train import evaluate, finetune, fit
from edgeslim.pipeline.recipe import DataConfig, Recipe, Stage
from edgeslim.pipeline.stages.base import STAGE_KINDS
from edgeslim.profiling import profile

STATE_FILE, META_FILE, METRICS_FILE = "state.safetensors", "meta.json", "metrics.jsonl"


@dataclass
class StageContext:
    """What a stage runner may use besides the model."""

    data: DataSplits
    example: torch.Tensor  # on the model's device
    recipe: Recipe
    index: int
    seed: int
    progress: bool | None = None
    teacher: nn.Module | None = None  # the model before the stage, when finetune distils

    def calibration(self) -> Any:
        """The recipe's calibration set (``data.calib`` examples) for calibrated stages."""
        return self.data.calib(self.recipe.data.calib)


@dataclass
class RunResult:
    """The outcome of :func:`run_recipe`: the final model and one metrics row per stage."""

    out: Path
    model: nn.Module
    rows: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


def stage_seed(recipe_seed: int, index: int) -> int:
    """The seed of stage ``index``: a function of the recipe seed and the index only."""
    return recipe_seed * 1000 + index


def run_recipe(
    recipe: Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    restart: bool = False,
    progress: bool | None = None,
    device: str | None = None,
) -> RunResult:
    """Run (or resume) ``recipe`` into the run directory ``out``; see the module docstring.

    ``restart=True`` discards finished stages in ``out`` instead of resuming from them.
    ``device`` (e.g. ``"cuda:0"``) replaces the recipe's ``device``; a device this machine
    does not have is a :class:`ConfigError`.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe, device=device)
    elif device is not None:
        recipe = recipe.model_copy(update={"device": device})
    target = check_device(recipe.device, "device")
    recipe = recipe.model_copy(update={"device": str(target)})
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {out}: {exc}") from exc
    stages: list[Stage | None] = [None, *recipe.stages]  # index 0 is the baseline
    done = _finished_stages(out, recipe, len(stages), restart)
    _write_text(out / "recipe.yaml", recipe.to_yaml())

    model, data = recipe_inputs(recipe)
    example = data.example(1)  # on the CPU: the stage files are written from there
    result = RunResult(out=out, model=model)
    if done >= 0:  # rebuilt and loaded on the CPU, where the state file's tensors are
        if _needs_reference(data):  # the baseline, as stage 0 saved it
            data = with_reference(data, _stage_zero(model, out))
        model = _restore_shapes(model, stages, out, done, example)
        _load_stage_state(model, out / f"stage-{done}")
        result.resumed_from = done
        console.print(f"[bold]resuming[/] {out} after stage {done} ({_label(stages[done])})")
    model.to(target)
    work_example = to_device(example, target)

    for index in range(done + 1, len(stages)):
        stage = stages[index]
        console.print(f"[bold]stage {index}/{len(stages) - 1}[/] {_label(stage)}")
        seed = stage_seed(recipe.seed, index)
        ctx = StageContext(data, work_example, recipe, index, seed, progress)
        if stage is not None and stage.finetune is not None and stage.finetune.distill is not None:
            ctx.teacher = copy.deepcopy(model).eval()
        start = time.perf_counter()
        if stage is None:
            train_baseline(model, data, recipe, progress=progress)
            if _needs_reference(data):  # later stages are compared with the baseline
                data = with_reference(data, model)
            log: dict[str, Any] = {}
        else:
            kind = STAGE_KINDS[stage.kind]
            model, log = kind.run(model, stage, ctx)
            model.to(target)  # modules a technique built on the CPU join the rest
            if stage.finetune is not None and not kind.trains(stage):
                log.update(_finetune(model, stage, kind, ctx))
        seconds = time.perf_counter() - start
        _write_stage(out, index, stage, model, data, example, recipe, seconds, log)
        _write_metrics(out, index)
    result.model = model
    result.rows = _read_rows(out, len(stages) - 1)
    from edgeslim.report import render_report

    render_report(out)
    return result


def _finetune(model: nn.Module, stage: Stage, kind: Any, ctx: StageContext) -> dict[str, Any]:
    """The stage's ``finetune`` block, run by the pipeline for every stage kind that does not
    train itself: with the teacher (the model before the stage) when it distils, inside the
    kind's ``tuning`` context (e.g. fake quantization); validation accuracy before and after."""
    ft = stage.finetune.model_copy(update={"seed": ctx.seed})
    if ft.epochs == 0:
        return {}
    log: dict[str, Any] = {"val_before_finetune": _evaluate(model, ctx.data, "val")}
    with kind.tuning(model) if kind.tuning is not None else contextlib.nullcontext():
        log["finetune"] = finetune(model, ctx.data, ft, teacher=ctx.teacher, progress=ctx.progress)
    log["val_after_finetune"] = _evaluate(model, ctx.data, "val")
    return log


def recipe_inputs(recipe: Recipe) -> tuple[nn.Module, Any]:
    """The recipe's model (seeded) and data (its transform applied): what stage 0 starts from."""
    torch.manual_seed(recipe.seed)
    model = load_model(recipe.model)
    return model, _load_data(recipe, model)


def train_baseline(
    model: nn.Module, data: Any, recipe: Recipe, *, progress: bool | None = None
) -> nn.Module:
    """Stage 0: train ``model`` in place as the recipe's ``train`` block says (if any)."""
    if recipe.train is not None:
        fit(model, data, recipe.train, seed=stage_seed(recipe.seed, 0), progress=progress)
    return model


def _load_data(recipe: Recipe, model: nn.Module) -> Any:
    """The recipe's data: ``DataSplits``, or for ``text:`` sources a :class:`TextTask`
    bound to the model's tokenizer (its metric references are taken from ``model`` now)."""
    cfg = recipe.data
    if cfg.is_text:
        from edgeslim.core.data.text import TextTask, load_text

        corpus = load_text(cfg.source.removeprefix("text:"))
        return TextTask(corpus, model, seq_len=cfg.seq_len or 128, max_eval=cfg.max_eval)
    return load_recipe_data(cfg)


def load_recipe_data(cfg: DataConfig) -> DataSplits:
    """A recipe's ``data`` block (not text) loaded: source, image options, workers, metric,
    transform and ``max_train`` applied."""
    data = load_data(cfg.source, **cfg.load_options())
    return apply_transform(data, cfg.transform).limit(cfg.max_train)


def _needs_reference(data: Any) -> bool:
    return isinstance(data, DataSplits) and get_metric(data.metric).reference


def with_reference(data: DataSplits, model: nn.Module) -> DataSplits:
    """``data`` scored against a frozen copy of ``model`` (the baseline, for ``cosine``)."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return data.with_metric(None, reference)


def _stage_zero(model: nn.Module, out: Path) -> nn.Module:
    """A copy of the freshly loaded ``model`` with the baseline's saved state."""
    baseline = copy.deepcopy(model)
    _load_stage_state(baseline, out / "stage-0")
    return baseline


def _evaluate(model: nn.Module, data: Any, split: str) -> float:
    """The data's metric: its own (``data.evaluate``) for text tasks, else
    :func:`~edgeslim.core.train.evaluate` with the data's ``metric`` (top-1 by default)."""
    own = getattr(data, "evaluate", None)
    return own(model, split) if own is not None else evaluate(model, data, split)


def _metric_name(data: Any) -> str:
    return getattr(data, "metric", None) or "top1"


def _higher_is_better(data: Any) -> bool:
    if isinstance(data, DataSplits):
        return get_metric(data.metric).higher_is_better
    return display(_metric_name(data))[1]  # a text task's own metric


def _unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (an LM head sharing the embedding) copied apart."""
    seen: set[int] = set()
    state = {}
    for key, value in model.state_dict().items():
        ptr = value.untyped_storage().data_ptr()
        state[key] = value.detach().clone() if ptr in seen else value.detach().contiguous()
        seen.add(ptr)
    return state


# --------------------------------------------------------------------------------------
# finished stages and resume
# --------------------------------------------------------------------------------------


def _label(stage: Stage | None) -> str:
    return "baseline" if stage is None else stage.label


def _finished_stages(out: Path, recipe: Recipe, n: int, restart: bool) -> int:
    """Index of the last consecutive finished stage whose recipe prefix matches (-1: none)."""
    done = -1
    for index in range(n):
        sdir = out / f"stage-{index}"
        if not sdir.exists():
            break
        meta = _read_meta(sdir)
        if meta.get("prefix_hash") != recipe.prefix_hash(index):
            if not restart:
                raise RunDirError(
                    f"{sdir} was made by a different recipe (stage {index} or an earlier one "
                    f"differs); use another --out, or restart to discard it"
                )
            break
        if restart:
            break
        done = index
    if restart:  # discard every stage directory of the old run
        for sdir in out.glob("stage-*"):
            shutil.rmtree(sdir)
        (out / METRICS_FILE).unlink(missing_ok=True)
        return -1
    return done


def _read_meta(sdir: Path) -> dict[str, Any]:
    try:
        return json.loads((sdir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"stage checkpoint {sdir} is corrupt: {META_FILE}: {exc}") from exc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _restore_shapes(
    model: nn.Module, stages: list[Stage | None], out: Path, done: int, example: torch.Tensor
) -> nn.Module:
    """Redo the structural changes of finished stages 1..done, in order; return the model."""

    for index in range(1, done + 1):
        kind = STAGE_KINDS[stages[index].kind]
        if kind.rebuild is not None:
            log = _read_meta(out / f"stage-{index}")["row"].get("log", {})
            model = kind.rebuild(model, stages[index], log, example)
    return model


def _load_stage_state(model: nn.Module, sdir: Path) -> None:
    meta = _read_meta(sdir)
    state_path = sdir / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"stage checkpoint {sdir} is corrupt: {STATE_FILE} is missing")
    if _sha256(state_path) != meta.get("state_sha256"):
        raise CheckpointError(
            f"stage checkpoint {state_path} is corrupt: its sha256 does not match {META_FILE}; "
            f"delete {sdir} to recompute that stage"
        )
    try:
        state = load_file(str(state_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"stage checkpoint {state_path} is corrupt: {exc}") from exc
    restore_buffers_(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{state_path} does not fit the recipe's model: {first}") from exc


# --------------------------------------------------------------------------------------
# writing a stage
# --------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_stage(
    out: Path,
    index: int,
    stage: Stage | None,
    model: nn.Module,
    data: DataSplits,
    example: torch.Tensor,
    recipe: Recipe,
    seconds: float,
    log: dict[str, Any],
) -> None:
    """Evaluate, profile and save stage ``index`` into ``out/stage-index`` atomically.

    Evaluation and profiling run where the model is; the files are written from the CPU
    (``example`` is a CPU tensor) and the model goes back to its device afterwards.
    """
    model.eval()
    prof = profile(model, example)  # latency on the model's device
    tmp = out / f".stage-{index}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with _on_cpu(model):
        save_tensors(_unshared_state(model), tmp / STATE_FILE)
        fmt, artifact, extra = _write_artifact(model, stage, tmp, example)
        if not is_hf_model(model):  # a transformers model's artifact is its reloadable dir
            save_model(model, tmp / "model.pt2", example)
    log = {**log, **extra}
    size = artifact.stat().st_size
    accuracy = _evaluate(model, data, "test")  # after the writers, as they may freeze state
    val_accuracy = _evaluate(model, data, "val")
    row = {
        "stage": "baseline" if stage is None else stage.kind,
        "index": index,
        "name": f"stage-{index} {_label(stage)}",
        "metric": _metric_name(data),
        "higher_is_better": _higher_is_better(data),
        "accuracy": accuracy,
        "val_accuracy": val_accuracy,
        "params": prof.params,
        "nonzero_params": prof.nonzero_params,
        "macs": prof.macs,
        "effective_macs": prof.effective_macs,
        "size_bytes": size,
        "format": fmt,
        "file": artifact.name,
        "latency_ms": prof.latency_ms,
        "peak_activation_bytes": prof.peak_activation_bytes,
        "bytes": prof.bytes,
        "layers": {
            layer.name: {
                "type": layer.type,
                "params": layer.params,
                "nonzero_params": layer.nonzero_params,
            }
            for layer in prof.layers
            if layer.params
        },
        "notes": prof.notes,
        "seconds": round(seconds, 3),
        "log": log,
    }
    meta = {
        "row": row,
        "prefix_hash": recipe.prefix_hash(index),
        "state_sha256": _sha256(tmp / STATE_FILE),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    final = out / f"stage-{index}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    shown = format_value(row["metric"], row["accuracy"])
    console.print(
        f"  {row['metric']} {shown}  nonzero {row['nonzero_params']:,}/{row['params']:,}  "
        f"{fmt} file {size:,} B  ({seconds:.1f} s)"
    )


@contextlib.contextmanager
def _on_cpu(model: nn.Module):
    """Move ``model`` to the CPU for the block (exporters and writers need CPU tensors), then
    back to the device it was on. A no-op for a model on the CPU."""
    device = model_device(model)
    if device.type == "cpu":
        yield model
        return
    model.to("cpu")
    try:
        yield model
    finally:
        model.to(device)


def _write_artifact(
    model: nn.Module, stage: Stage | None, directory: Path, example: torch.Tensor
) -> tuple[str, Path, dict[str, Any]]:
    """Write the stage's deployable file; return its format, path and what it adds to the log.

    A stage kind with an ``artifact`` writer decides (a ``.slim`` file, an int8 model ...);
    otherwise the weights go to safetensors in the smaller of the dense and sparse formats.
    """

    kind = STAGE_KINDS[stage.kind] if stage is not None else None
    if kind is not None and kind.artifact is not None:
        return kind.artifact(model, stage, directory, example)
    if is_hf_model(model):  # config + weights (packed / sparse / dense), reloadable as hf:DIR
        return "hf", save_hf(model, directory / "hf"), {}
    deploy = deployable_state(model)
    fmt = min(FORMATS, key=lambda f: (payload_bytes(deploy, f), f != "dense"))
    path = directory / f"weights.{fmt}.safetensors"
    save_weights(deploy, path, fmt)
    return fmt, path, {}


def _read_rows(out: Path, last: int) -> list[dict[str, Any]]:
    return [_read_meta(out / f"stage-{i}")["row"] for i in range(last + 1)]


def _write_metrics(out: Path, last: int) -> None:
    """Rebuild metrics.jsonl from the stage directories 0..last (atomically)."""
    lines = [json.dumps(row) for row in _read_rows(out, last)]
    _write_text(out / METRICS_FILE, "\n".join(lines) + "\n")
