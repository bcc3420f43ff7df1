"""``es.nas(data, device=...)``: from a device's budget to a searched network running in C.

    result = es.nas(es.load_data("mnist"), device="stm32f446", out="runs/nas")
    result.model          # the chosen sub-network: fine-tuned, int8 (Int8PTQ)
    result.front          # accuracy vs latency Pareto front of the evaluated sub-networks

Steps (MCUNet's TinyNAS + OFA's train-once supernet), each persisted in the run directory
``out`` so that a rerun of the same call resumes where the last one stopped:

1. **Budget check**: the smallest sub-network of the space is planned first; when even it
   does not fit, :class:`~edgeslim.nas.cost.BudgetError` says what it needs.
2. **Supernet** (``supernet.pt``): trained once with the sandwich rule
   (:mod:`edgeslim.nas.train`), checkpointed every epoch.
3. **Search space** (``space.json``): the ``space_top`` best (width, resolution) cells by
   TinyNAS's mean-MACs heuristic over ``space_samples`` sub-networks per cell
   (:mod:`edgeslim.nas.space_opt`).
4. **Evolution** (``search/trials.jsonl``, the search package's run store) in those cells
   together: accuracy from the supernet with BatchNorm re-calibrated, constraints from the
   planner (:mod:`edgeslim.nas.evolve`); the Pareto front (accuracy vs latency) by
   :func:`edgeslim.search.engine.pareto`.
5. **Finalists**: the supernet's estimate is noisy (``val_samples`` images), so the
   sub-networks whose estimate is within ``tie_tolerance`` of the best (default: one
   binomial standard error of the best estimate) count as tied, and among them the one with
   the most MACs comes first (TinyNAS's heuristic: the tie goes to the sub-network that uses
   more of the budget), then the rest by estimate
   (:func:`edgeslim.nas.evolve.rank_finalists`). The first ``finalists`` of that order are
   exported to C (:func:`edgeslim.export.c.export_c`) and their real SRAM / flash / latency
   checked against the budget; the first that fits is chosen. With ``tune_finalists`` > 1
   the order first takes the best of each (width, resolution) cell
   (:func:`edgeslim.nas.evolve.spread_over_cells`: the estimate is biased between cells),
   the first ``tune_finalists`` that fit are each fine-tuned as step 6 does
   (``final/tuned/``) and the one most accurate on the validation images is chosen.
6. **Deployment** (``final/``): the chosen sub-network fine-tuned (``finetune_epochs``,
   the hard labels and the soft targets of the largest sub-network at its resolution,
   weighed by ``finetune_alpha``; ``final/float.pt``), quantized (``Int8PTQ``), exported to C
   (``c/``: compiled and bit-exact with the reference interpreter) and to ``model.tflite``,
   which is run in TFLite Micro: its outputs must equal the compiled C's bit for bit. What
   was checked and measured is kept in ``final/deploy.json``: a rerun on a finished run
   directory neither quantizes nor exports again (``result.model`` is then quantized from
   ``final/float.pt`` when first read).
"""

from __future__ import annotations

import copy
import json
import pickle  # only for its error type: torch.load(weights_only=True) reads
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgeslim.core.data.datasets import DataSplits, Split
from edgeslim.core.errors import ConfigError, ExportError, RunDirError
from edgeslim.core.fileio import atomic_path, atomic_write_text
from edgeslim.nas.cost import BudgetError, SubnetCost, measure_export
from edgeslim.nas.evolve import estimate_se, evolve, rank_finalists, spread_over_cells
from edgeslim.nas.extract import extract, recalibrate_bn
from edgeslim.nas.space_opt import SpaceChoice, optimize_space
from edgeslim.nas.supernet import SubnetConfig, Supernet, SupernetSpec, resize
from edgeslim.nas.train import SandwichTraining, train_supernet
from edgeslim.search.budget import Budget

__all__ = ["NasResult", "finetune_subnet", "nas", "resize_data", "sample_indices"]


@dataclass
class NasResult:
    """What :func:`nas` found and deployed."""

    config: SubnetConfig | None
    budget: Budget
    device: str
    accuracy: float | None = None  # test accuracy of the quantized model
    float_accuracy: float | None = None  # after fine-tuning, before quantization
    estimated_accuracy: float | None = None  # from the supernet (validation subset)
    measured: dict[str, Any] = field(default_factory=dict)  # from the C export
    predicted: dict[str, Any] = field(default_factory=dict)  # from the planner
    space: SpaceChoice | None = None
    front: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    finalists: list[dict[str, Any]] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)  # how the finalists were ranked
    files: dict[str, str] = field(default_factory=dict)
    out: Path | None = None
    supernet: Supernet | None = None
    _model: nn.Module | None = field(default=None, repr=False)
    _make_model: Callable[[], nn.Module] | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module | None:
        """The chosen sub-network, fine-tuned and quantized (``Int8PTQ``); None without
        deployment. On a resumed run it is quantized again from the saved float weights when
        first read (deterministic: the same calibration images)."""
        if self._model is None and self._make_model is not None:
            self._model = self._make_model()
        return self._model

    @model.setter
    def model(self, value: nn.Module | None) -> None:
        self._model = value

    def summary(self) -> str:
        if self.config is None:
            return "no sub-network chosen"
        m = self.measured or self.predicted
        nan = float("nan")

        def num(v: float | None) -> float:
            return nan if v is None else v

        return (
            f"{self.config.key()} on {self.device}: test accuracy {num(self.accuracy):.4f} "
            f"(int8; float {num(self.float_accuracy):.4f}, supernet estimate "
            f"{num(self.estimated_accuracy):.4f}); SRAM {m.get('sram_kb', nan):.1f} KB, flash "
            f"{m.get('flash_kb', nan):.1f} KB, latency {m.get('latency_ms', nan):.2f} ms "
            f"(budget {self.budget.limits()})"
        )


def resize_data(data: DataSplits, resolution: int) -> DataSplits:
    """``data`` with every image resized (bilinear) to ``resolution`` x ``resolution``."""

    def one(s: Any) -> Split:
        return Split(resize(s.x, resolution), s.y)

    return DataSplits(
        data.name, one(data.train), one(data.val), one(data.test), data.num_classes, data.metric
    )


def _budget(device: str, sram_kb, flash_kb, latency_ms) -> Budget:
    from edgeslim.profiling.devices import load_device

    dev = load_device(device)
    return Budget(
        target=dev.name,
        max_sram_kb=sram_kb if sram_kb is not None else dev.sram_bytes / 1024,
        max_flash_kb=flash_kb if flash_kb is not None else dev.flash_bytes / 1024,
        max_latency_ms=latency_ms,
    )


def nas(
    data: DataSplits,
    device: str = "stm32f446",
    *,
    out: str | Path | None = None,
    spec: SupernetSpec | None = None,
    max_sram_kb: float | None = None,
    max_flash_kb: float | None = None,
    max_latency_ms: float | None = None,
    training: SandwichTraining | None = None,
    space_samples: int = 24,
    space_top: int = 2,
    population: int = 24,
    generations: int = 8,
    parents: int = 4,
    mutation: float = 0.2,
    bn_samples: int = 500,
    val_samples: int = 500,
    finalists: int = 3,
    tune_finalists: int = 1,
    tie_tolerance: float | None = None,
    finetune_epochs: int = 3,
    finetune_lr: float = 1e-3,
    finetune_alpha: float = 0.7,
    finetune_teacher: nn.Module | None = None,
    workers: int | None = 0,
    ray: str | None = None,
    seed: int = 0,
    export: bool = True,
    progress: bool | None = None,
    supernet_checkpoint: str | Path | None = None,
) -> NasResult:
    """Search a sub-network for ``device`` and deploy it (see the module docstring).

    ``data``: images ``(C, H, W)`` (resized to each sub-network's resolution). The budget
    is the device's SRAM and flash unless ``max_sram_kb`` / ``max_flash_kb`` say less;
    ``max_latency_ms`` adds a device-model latency limit. ``spec``: the supernet's space
    (default :class:`SupernetSpec` with the data's channels and classes). ``out``: the run
    directory (temporary when None); rerunning the same call on it resumes, a different
    call is a :class:`~edgeslim.core.errors.RunDirError`. ``supernet_checkpoint``: where
    the supernet is trained / resumed (default ``out/supernet.pt``); give one file to
    several runs (other devices, other budgets) to train the supernet once for all of them.
    ``workers`` / ``ray``: where the accuracy jobs run (see
    :func:`edgeslim.search.executor.make_executor`; ``0``: in this process).
    ``space_samples`` sub-networks are costed per (width, resolution) cell and the evolution
    (``population`` x ``generations``) searches the ``space_top`` best cells together.
    ``tie_tolerance``: estimates within it of the best count as tied, and the tie goes to
    the most MACs (``None``: one binomial standard error of the best estimate on the
    ``val_samples`` images; ``0``: the most accurate estimate first).
    ``tune_finalists``: how many of the finalists that fit are fine-tuned (``finetune_*``)
    and compared on all of ``data.val`` (float accuracy; the best is deployed, its weights
    reused); 1: the first that fits, as ranked by the supernet's estimate. At most
    ``finalists``; only with ``export`` and ``finetune_epochs`` > 0.
    ``finetune_alpha``: the winner's fine-tuning loss is ``alpha`` x the soft targets of the
    largest sub-network (:class:`~edgeslim.core.kd.KD`, temperature 4) + ``1 - alpha`` x
    cross-entropy on the labels (``0``: labels only, no teacher). ``finetune_teacher``: a
    trained model of ``data``'s images as they are, whose soft targets replace the largest
    sub-network's (e.g. a bigger dense net); the winner sees the same images resized to its
    resolution.
    """
    import tempfile

    from edgeslim.search.executor import make_executor
    from edgeslim.search.store import RunStore

    started = time.monotonic()
    if not isinstance(data, DataSplits) or data.streams:
        raise ConfigError("nas: data must be an in-memory DataSplits of images (es.load_data)")
    shape = tuple(data.train.x.shape[1:])
    if len(shape) != 3:
        raise ConfigError(f"nas: inputs of shape {shape}; expected images (C, H, W)")
    if spec is None:
        spec = SupernetSpec(in_channels=shape[0], num_classes=int(data.num_classes or 10))
    if spec.in_channels != shape[0]:
        raise ConfigError(f"nas: spec takes {spec.in_channels} channels, data has {shape[0]}")
    for name, v in (("population", population), ("generations", generations), ("parents", parents),
                    ("finalists", finalists), ("space_samples", space_samples),
                    ("space_top", space_top)):  # fmt: skip
        if v < 1:
            raise ConfigError(f"nas: {name} must be >= 1, got {v}")
    if not 1 <= tune_finalists <= finalists:
        raise ConfigError(
            f"nas: tune_finalists must be in 1..finalists ({finalists}), got {tune_finalists}"
        )
    if tie_tolerance is not None and not 0 <= tie_tolerance < 1:
        raise ConfigError(f"nas: tie_tolerance must be in [0, 1), got {tie_tolerance}")
    if not 0 <= finetune_alpha <= 1:
        raise ConfigError(f"nas: finetune_alpha must be in [0, 1], got {finetune_alpha}")
    teacher_shape = getattr(finetune_teacher, "input_shape", None)
    if teacher_shape is not None and tuple(teacher_shape) != shape:
        raise ConfigError(
            f"nas: finetune_teacher takes inputs of shape {tuple(teacher_shape)}; the data's "
            f"images are {shape}"
        )
    training = training or SandwichTraining(seed=seed)
    budget = _budget(device, max_sram_kb, max_flash_kb, max_latency_ms)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="edgeslim-nas-"))
    settings = {
        "spec": spec.to_dict(),
        "budget": budget.model_dump(),
        "training": training.model_dump(),
        "data": [data.name, len(data.train), len(data.val), len(data.test)],
        "search": {
            "space_samples": space_samples,
            "space_top": space_top,
            "population": population,
            "generations": generations,
            "parents": parents,
            "mutation": mutation,
            "bn_samples": bn_samples,
            "val_samples": val_samples,
            "finalists": finalists,
            "finalist_order": "ties-to-most-macs",
            "tie_tolerance": tie_tolerance,
            "finetune_epochs": finetune_epochs,
            "finetune_lr": finetune_lr,
            "finetune_alpha": finetune_alpha,
            "seed": seed,
        },
    }
    if finetune_teacher is not None:  # only then: runs without one keep their settings
        settings["search"]["finetune_teacher"] = _fingerprint(finetune_teacher)
    if tune_finalists > 1:  # likewise
        settings["search"]["tune_finalists"] = tune_finalists
    store = RunStore(out / "search", settings)
    timings: dict[str, float] = {}

    # 1. the budget against the smallest sub-network (an untrained supernet has the shapes)
    torch.manual_seed(seed)
    supernet = Supernet(spec)
    costs = SubnetCost(supernet, budget.target)
    calibration = store.calibration()
    if calibration is None:
        calibration = {"code_bytes": costs.calibrate()}
        store.save_calibration(calibration)
    costs.code_bytes = calibration["code_bytes"]
    if not budget.feasible(costs.predict(spec.smallest())):
        raise BudgetError(
            f"nothing in the search space fits {budget.target} {budget.limits()}: the smallest "
            f"sub-network ({spec.smallest().key()}) needs {costs.smallest_needs(budget)}"
        )

    # 2. the supernet, trained once (resumes from its checkpoint)
    history = train_supernet(
        supernet,
        data,
        training,
        checkpoint=supernet_checkpoint or out / "supernet.pt",
        progress=progress,
    )
    timings["supernet_train_s"] = sum(h["seconds"] for h in history)
    costs = SubnetCost(supernet, budget.target, code_bytes=calibration["code_bytes"])

    # 3. the search space
    t0 = time.monotonic()
    space_file = out / "space.json"
    if space_file.exists():
        space = SpaceChoice.from_dict(json.loads(space_file.read_text(encoding="utf-8")))
    else:
        space = optimize_space(
            spec,
            lambda c: costs.cost(c, budget),
            budget,
            samples=space_samples,
            seed=seed,
            top=space_top,
        )
        atomic_write_text(space_file, json.dumps(space.to_dict(), indent=1))
    if not any(r["fit"] for r in space.rows):
        space = SpaceChoice(spec.widths[0], spec.resolutions[0], space.rows)
    timings["space_s"] = time.monotonic() - t0

    # 4. evolution inside the chosen cell
    t0 = time.monotonic()
    bn_idx, calib_idx = sample_indices(len(data.train), bn_samples, seed)
    nv = min(val_samples, len(data.val))
    state = {
        "spec": spec.to_dict(),
        "weights": {k: v.detach().clone() for k, v in supernet.state_dict().items()},
        "bn_x": data.train.x[bn_idx],
        "val": (data.val.x[:nv], data.val.y[:nv]),
    }
    executor = make_executor(workers, ray)
    from edgeslim.core.progress import enabled, progress_bar

    try:
        with progress_bar(disable=not enabled(progress)) as bar:
            task = bar.add_task("evolution", total=generations)
            evo = evolve(
                spec,
                lambda c: costs.cost(c, budget),
                budget,
                state,
                cells=space.cells,
                population=population,
                generations=generations,
                parents=parents,
                mutation=mutation,
                seed=seed,
                executor=executor,
                store=store,
                progress=lambda done, total, best: bar.update(task, completed=done),
            )
    finally:
        executor.close()
    timings["search_s"] = time.monotonic() - t0
    from edgeslim.search.engine import pareto

    front = pareto(evo.records, "latency_ms")
    feasible = evo.feasible()
    best_estimate = max((r["accuracy"] for r in feasible), default=0.0)
    tolerance = estimate_se(best_estimate, nv) if tie_tolerance is None else tie_tolerance
    ranked = rank_finalists(feasible, tolerance)
    if not ranked:
        raise BudgetError(
            f"no sub-network of the cells (width, resolution) {space.cells} fits "
            f"{budget.target} {budget.limits()}; the smallest needs {costs.smallest_needs(budget)}"
        )
    result = NasResult(
        None, budget, budget.target, space=space, front=front, trials=evo.records,
        out=out, supernet=supernet, timings=timings,
        selection={"best_estimate": best_estimate, "tolerance": tolerance, "val_images": nv,
                   "tied": sum(r["accuracy"] >= best_estimate - tolerance for r in ranked),
                   "most_accurate": evo.best()["key"]},
    )  # fmt: skip

    # 5-6. the finalists exported; the most accurate that fits (or, tuned, on validation) deployed
    t0 = time.monotonic()
    final_file = out / "final.json"
    done_finals = json.loads(final_file.read_text()) if final_file.exists() else {}
    tuning = tune_finalists > 1 and export and finetune_epochs > 0
    fitting = []
    for rec in (spread_over_cells(ranked) if tune_finalists > 1 else ranked)[:finalists]:
        key = rec["key"]
        if key not in done_finals:
            cfg = SubnetConfig.from_dict(rec["candidate"])
            sub = extract(supernet, cfg)
            recalibrate_bn(sub, resize(state["bn_x"], cfg.resolution))
            calib = resize(data.train.x[calib_idx], cfg.resolution)
            measured = _export_measure(sub, calib, costs.device, budget.target, None)
            done_finals[key] = {"measured": measured, "fits": budget.feasible(measured)}
            atomic_write_text(final_file, json.dumps(done_finals, indent=1))
        fin = {**rec, **done_finals[key]}
        result.finalists.append(fin)
        if fin["fits"]:
            fitting.append(fin)
    chosen = fitting[0] if fitting else None
    if tuning and len(fitting) > 1:
        tune = dict(epochs=finetune_epochs, lr=finetune_lr, alpha=finetune_alpha, seed=seed,
                    teacher=finetune_teacher, progress=progress)  # fmt: skip
        chosen = _tune_finalists(fitting[:tune_finalists], supernet, data, state, out, tune)
        result.selection["tuned"] = [
            {"key": f["key"], "val_accuracy": f["tuned_val"]} for f in fitting[:tune_finalists]
        ]
    timings["finalists_s"] = time.monotonic() - t0
    if chosen is None:
        raise BudgetError(
            f"the {finalists} most accurate sub-networks fit {budget.target} as planned but not "
            f"as exported: {[f['measured'] for f in result.finalists]}; raise finalists="
        )
    cfg = SubnetConfig.from_dict(chosen["candidate"])
    result.config = cfg
    result.estimated_accuracy = chosen["accuracy"]
    result.predicted = chosen["cost"]
    if export:
        t0 = time.monotonic()
        _deploy(result, supernet, data, cfg, state, calib_idx, finetune_epochs, finetune_lr,
                finetune_alpha, seed, out, progress, finetune_teacher)  # fmt: skip
        timings["deploy_s"] = time.monotonic() - t0
    timings["total_s"] = time.monotonic() - started
    timings_file = out / "timings.json"
    if timings_file.exists():  # a resumed run: the times of the run that did the work
        first = json.loads(timings_file.read_text(encoding="utf-8"))
        result.timings = {**first, "resumed_s": timings["total_s"]}
    elif result.accuracy is not None or not export:
        atomic_write_text(timings_file, json.dumps(timings, indent=1))
    _write_report(result)
    return result


def sample_indices(n: int, bn_samples: int = 500, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The training images :func:`nas` re-calibrates BatchNorm on (``bn_samples``) and
    calibrates the int8 quantization on (128), as indices into ``data.train``."""
    g = torch.Generator().manual_seed(seed)
    bn_idx = torch.randperm(n, generator=g)[: min(bn_samples, n)]
    return bn_idx, torch.randperm(n, generator=g)[: min(128, n)]


def finetune_subnet(
    supernet: Supernet,
    cfg: SubnetConfig,
    data: DataSplits,
    bn_x: Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    alpha: float = 0.7,
    seed: int = 0,
    teacher: nn.Module | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """The sub-network ``cfg`` of ``supernet`` fine-tuned as :func:`nas` deploys it.

    BatchNorm re-calibrated on ``bn_x`` (images as in ``data``, resized to the sub-network's
    resolution), then ``epochs`` of Adam (``lr``, batch 64, ``seed``: the data order) on
    ``alpha`` x the soft targets (:class:`~edgeslim.core.kd.KD`) of ``teacher`` (which sees
    the images as they are; default: the largest sub-network at the same resolution) +
    ``1 - alpha`` x the labels (``alpha`` 0: labels only). Returns the float sub-network.
    """
    from edgeslim.core.kd import KD
    from edgeslim.core.train import TrainConfig, fit

    r = cfg.resolution
    rdata = resize_data(data, r)
    bn_x = resize(bn_x, r)
    sub = recalibrate_bn(extract(supernet, cfg), bn_x)
    if epochs > 0 and alpha > 0:
        tc = TrainConfig(epochs=epochs, lr=lr, batch_size=64, seed=seed, distill=KD(alpha=alpha))
        if teacher is not None:  # it sees the images as they are, the sub-network resized
            student = _ResizedInput(sub, r, tuple(data.train.x.shape[1:]))
            fit(student, data, tc, teacher=teacher.eval(), progress=progress)
        else:
            largest = recalibrate_bn(extract(supernet, supernet.spec.largest(resolution=r)), bn_x)
            fit(sub, rdata, tc, teacher=largest, progress=progress)
    elif epochs > 0:  # labels only
        fit(sub, rdata, TrainConfig(epochs=epochs, lr=lr, batch_size=64, seed=seed),
            progress=progress)  # fmt: skip
    return sub


def _tune_finalists(
    contenders: list[dict[str, Any]],
    supernet: Supernet,
    data: DataSplits,
    state: dict[str, Any],
    out: Path,
    tune: dict[str, Any],
) -> dict[str, Any]:
    """Each contender fine-tuned (:func:`finetune_subnet` with ``tune``: as the deployment
    does) and scored on all validation images; the most accurate (the first on a tie) is
    returned and its weights become ``final/float.pt``. Weights and scores are kept in
    ``final/tuned/`` (a rerun does not fine-tune again)."""
    import hashlib
    import shutil

    from edgeslim.core.train import evaluate

    tuned = out / "final" / "tuned"
    tuned.mkdir(parents=True, exist_ok=True)
    for fin in contenders:
        cfg = SubnetConfig.from_dict(fin["candidate"])
        name = hashlib.sha256(fin["key"].encode()).hexdigest()[:16]
        weights, score = tuned / f"{name}.pt", tuned / f"{name}.json"
        if weights.exists() and score.exists():
            fin["tuned_val"] = json.loads(score.read_text(encoding="utf-8"))["val_accuracy"]
        else:
            sub = finetune_subnet(supernet, cfg, data, state["bn_x"], **tune).eval()
            fin["tuned_val"] = evaluate(sub, resize_data(data, cfg.resolution), "val")
            with atomic_path(weights) as tmp:
                torch.save(sub.state_dict(), tmp)
            record = {"key": fin["key"], "val_accuracy": fin["tuned_val"]}
            atomic_write_text(score, json.dumps(record, indent=1))
        fin["tuned_weights"] = str(weights)
    best = max(contenders, key=lambda f: f["tuned_val"])  # max keeps the first of equals
    final = out / "final" / "float.pt"
    if not final.exists():
        with atomic_path(final) as tmp:
            shutil.copyfile(best["tuned_weights"], tmp)
    return best


def _export_measure(model: nn.Module, calib, device, name: str, where: Path | None) -> dict:
    import tempfile

    from edgeslim.export.c import export_c

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = export_c(model, where or Path(tmp) / "c", None, calib=calib, arm=False)
        return measure_export(done, device)


def _fingerprint(model: nn.Module) -> str:
    """The class and a hash of the weights of ``model`` (a run directory's identity)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(model).__name__}:{h.hexdigest()[:16]}"


class _ResizedInput(nn.Module):
    """``model`` run on its inputs resized to ``resolution`` (to train a sub-network on the
    data as it is, beside a teacher that needs the original images: a round trip through
    the sub-network's resolution can cost such a teacher much of its accuracy)."""

    def __init__(self, model: nn.Module, resolution: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.resolution = resolution
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize(x, self.resolution))


def _deploy(
    result, supernet, data, cfg, state, calib_idx, epochs, lr, alpha, seed, out, progress,
    teacher_model=None,
):  # fmt: skip
    """Fine-tune (labels and the largest's soft targets at the same resolution, weighed by
    ``alpha``), quantize, export, check."""
    from edgeslim.core.train import evaluate
    from edgeslim.quant import Int8PTQ, quantize

    r = cfg.resolution
    rdata = resize_data(data, r)
    weights = out / "final" / "float.pt"
    if weights.exists():
        sub = recalibrate_bn(extract(supernet, cfg), resize(state["bn_x"], r))
        try:
            sub.load_state_dict(torch.load(weights, weights_only=True))
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as exc:
            raise RunDirError(
                f"{weights} does not hold the fine-tuned weights of the chosen sub-network "
                f"({cfg.key()}): {str(exc).splitlines()[0]}; delete it to fine-tune again"
            ) from None
    else:
        sub = finetune_subnet(supernet, cfg, data, state["bn_x"], epochs=epochs, lr=lr,
                              alpha=alpha, seed=seed, teacher=teacher_model,
                              progress=progress)  # fmt: skip
        with atomic_path(weights) as tmp:
            torch.save(sub.state_dict(), tmp)
    sub.eval()
    calib = rdata.train.x[calib_idx]

    def quantized() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = quantize(copy.deepcopy(sub), Int8PTQ(calibration="mse"), calib=calib)
        qmodel.input_shape = sub.input_shape
        qmodel.num_classes = sub.num_classes
        return qmodel

    c_dir, tflite, record = out / "c", out / "model.tflite", out / "final" / "deploy.json"
    done = json.loads(record.read_text(encoding="utf-8")) if record.exists() else None
    if done is not None and done.get("config") == cfg.to_dict() and c_dir.is_dir():
        result._make_model = quantized  # finished before: nothing quantized or exported now
    else:
        qmodel = quantized()
        verified, measured = export_checked(qmodel, calib, result.device, c_dir, tflite)
        done = {
            "config": cfg.to_dict(),
            "float_accuracy": evaluate(sub, rdata, "test"),
            "accuracy": evaluate(qmodel, rdata, "test"),
            "verified": verified,
            "measured": measured,
        }
        atomic_write_text(record, json.dumps(done, indent=1))
        result.model = qmodel
    result.float_accuracy, result.accuracy = done["float_accuracy"], done["accuracy"]
    result.verified, result.measured = done["verified"], done["measured"]
    result.files = {"c": str(c_dir), "float": str(weights)}
    if tflite.exists():
        result.files["tflite"] = str(tflite)


def export_checked(
    model: nn.Module,
    calib: torch.Tensor,
    device: str,
    c_dir: Path,
    tflite: Path,
    *,
    arm: bool | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """``model`` exported to C for ``device`` (compiled, bit-exact with the reference
    interpreter) and to ``tflite`` run in TFLite Micro, whose outputs must equal the
    compiled C's bit for bit (:class:`ExportError` otherwise). ``arm``: as for
    :func:`~edgeslim.export.c.export_c` (``None``: built and run on QEMU for a Cortex-M
    where the toolchain is installed). Returns what was checked and the measured cost."""
    from edgeslim.export.c import export_c, hostbuild
    from edgeslim.export.int8.check import build_and_check_graph
    from edgeslim.export.tflite import export_tflite, run_tflm, tflm_available
    from edgeslim.export.tflite_format import serialize
    from edgeslim.profiling.devices import load_device

    dev = load_device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, q = build_and_check_graph(model, calib, None, True, 0.25)
        done = export_c(model, c_dir, device, calib=calib, graph=graph, arm=arm)
    verified = list(done.verified)
    measured = measure_export(done, dev)
    if tflm_available():
        export_tflite(model, tflite, calib=calib, graph=graph, runtime="tflm")
        verified.append("TFLite Micro bit-exact with the reference interpreter")
        if hostbuild.compiler() is not None:
            sources = {p.name: p.read_text() for p in done.files}
            with hostbuild.Build(sources) as build:
                got_c = build.run(q, graph[graph.output].size)
            got_tflm = run_tflm(graph, serialize(graph), q)
            got_tflm = got_tflm.reshape(got_c.shape)
            if not np.array_equal(got_c, got_tflm):
                bad = int(np.sum(got_c != got_tflm))
                raise ExportError(
                    f"the compiled C and TFLite Micro differ in {bad} output values; see {c_dir}"
                )
            verified.append(f"compiled C == TFLite Micro bit for bit on {len(q)} inputs")
    return verified, measured


def _md(text: str) -> str:
    """``text`` in a Markdown table cell (its ``|`` escaped)."""
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: text columns left-aligned, the others right-aligned."""
    text = {"sub-network", "fits"}
    align = ["---" if h in text else "---:" for h in header]
    return ["| " + " | ".join(r) + " |" for r in [header, align, *rows]]


def _write_report(result: NasResult) -> None:
    """``report.md`` and ``result.json`` in the run directory."""
    if result.out is None:
        return
    b = result.budget
    lines = [f"# Neural architecture search for {result.device}", "", f"Budget: {b.limits()}", ""]
    lines += [result.summary(), ""]
    if result.space is not None:
        lines += [
            "## Search space (TinyNAS: mean MACs of the fitting samples; searched cells marked)",
            "",
            result.space.markdown(),
            "",
        ]
    lines += ["## Pareto front (accuracy from the supernet vs device-model latency)", ""]
    lines += _table(
        ["#", "sub-network", "est. accuracy", "MACs", "SRAM KB (plain / patch)", "flash KB",
         "latency ms"],
        [[str(r["number"]), _md(r["key"]), f"{r['accuracy']:.4f}", f"{r['cost']['macs']:,}",
          f"{r['cost']['sram_plain_kb']:.1f} / {r['cost']['sram_patch_kb']:.1f}",
          f"{r['cost']['flash_kb']:.1f}", f"{r['cost']['latency_ms']:.2f}"]
         for r in result.front],
    )  # fmt: skip
    if result.finalists:
        sel = result.selection
        lines += ["", "## Finalists (exported to C: measured)", ""]
        if sel:
            lines += [
                f"Order: the {sel['tied']} sub-networks estimated within "
                f"{sel['tolerance']:.4f} of the best estimate ({sel['best_estimate']:.4f}, "
                f"{sel['val_images']} validation images) by MACs, most first; then the rest "
                f"by estimate. The most accurate estimate: {_md(sel['most_accurate'])}.",
                "",
            ]
        lines += _table(
            ["sub-network", "est. accuracy", "SRAM KB", "flash KB", "latency ms", "fits"],
            [[_md(f["key"]), f"{f['accuracy']:.4f}", f"{f['measured']['sram_kb']:.1f}",
              f"{f['measured']['flash_kb']:.1f}", f"{f['measured']['latency_ms']:.2f}",
              "yes" if f["fits"] else "NO"]
             for f in result.finalists],
        )  # fmt: skip
    if result.selection.get("tuned"):
        lines += ["", "Fine-tuned and compared on the validation images (float accuracy): "
                  + "; ".join(f"{_md(t['key'])} {t['val_accuracy']:.4f}"
                              for t in result.selection["tuned"])]  # fmt: skip
    if result.verified:
        lines += ["", "Checked: " + "; ".join(result.verified)]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())]
    atomic_write_text(result.out / "report.md", "\n".join(lines) + "\n")
    data = {
        "config": result.config.to_dict() if result.config else None,
        "accuracy": result.accuracy,
        "float_accuracy": result.float_accuracy,
        "estimated_accuracy": result.estimated_accuracy,
        "measured": result.measured,
        "predicted": result.predicted,
        "budget": b.limits(),
        "device": result.device,
        "space": result.space.to_dict() if result.space else None,
        "front": [{k: r[k] for k in ("number", "key", "accuracy", "cost")} for r in result.front],
        "finalists": result.finalists,
        "selection": result.selection,
        "verified": result.verified,
        "timings": result.timings,
        "files": result.files,
    }
    atomic_write_text(result.out / "result.json", json.dumps(data, indent=1, default=str))
