"""Budget-driven compression search vs uniform compression and hand-written recipes.

    flock /tmp/edgeslim-cpu.lock python benchmarks/search.py --quick     # ResNet-8 only
    flock /tmp/edgeslim-cpu.lock python benchmarks/search.py             # + MobileNetV2
    flock /tmp/edgeslim-cpu.lock python benchmarks/search.py --nets minilm --no-mcu \
        --no-predictor --fractions 0.35 --trials 12                       # MiniLM, one budget

**Data: shifted, cluttered MNIST** (:func:`cluttered_mnist`), generated from the bundled
5,000-image subset so that the task is not at 99%: each digit is translated by up to 4
pixels (zero fill), six 7x7 patches cut from *other* digits are pasted at random places
(clutter with digit-like strokes), and Gaussian noise (sigma 0.15) is added; every test
digit appears twice with different clutter (2,000 test images), seeded. Dense nets reach
85-90% instead of 98-99%, so a one-point difference is ~1.5 standard errors of the test
estimate.

Per net (ResNet-8; MobileNetV2-style unless ``--quick``), trained dense on that data:

- three ONNX Runtime latency budgets, 0.7x / 0.5x / 0.35x of the dense model's measured
  latency (1 thread, batch 1): ``es.search`` (the default ONNX Runtime space: fine channel
  menus + low rank + a float/int8 switch; the predictor-guided sampler; 4-epoch distilled
  finalists) vs Torch-Pruning's uniform ``MagnitudePruner`` at the largest ratio whose
  *measured* latency meets the budget vs uniform int8 (``Int8PTQ``, exported as QDQ and
  run in ONNX Runtime) vs the project's hand-written recipe (``channel_resnet8.yaml``:
  ``ChannelPrune(macs=..., allocation="sensitivity")``; MACs fraction = the latency
  fraction). Every pruned baseline, and the dense net before "uniform int8 after the
  fine-tune", is fine-tuned like the search's finalists (same 4 epochs, distilled from the
  dense model). Accuracy, measured latency, predicted latency. Whether a model fits is
  decided by one routine for all (:class:`Meter`, the search's own ``FitRule``): the least
  of all its measurements (before and after its fine-tune), re-measured interleaved with
  the dense net when it misses by less than the noise, and judged by its ratio to the dense
  net when that reads slower than ``--dense-ms`` (a loaded machine); each row says how.
- the microcontroller budgets: STM32F446 (128 KB SRAM, 512 KB flash) with and without a
  device-model latency cap of 0.5x the dense net's, SRAM and flash from the C export; beside
  the answer, every zoo net of ``--mcu-zoo`` trained on the same task, pruned with
  ``ChannelPrune`` when over the cap, fine-tuned like the finalists (:func:`mcu_zoo_row`).
- ``--nets minilm``: the real all-MiniLM-L6-v2 (``hf:minilm``, offline) + a linear head on
  **the standard-library topic task** (``benchmarks/_tasks.py``: a docstring paragraph's
  64 tokens -> one of 10 groups of standard-library modules; 2,000 train / 800 val / 2,000
  test paragraphs, split by a hash of the text), fine-tuned 3 epochs. Same budgets, search
  and baselines, except: the search space adds whole attention heads to the channel groups
  (FFN neurons, the hidden size) with low rank and the float/int8 switch; every fine-tune is
  1 distilled epoch (batch 16, lr 1e-4) and the proxy 12 steps (CPU cost on 2 cores); the
  hand-written recipes are the three MiniLM ones (``wanda_minilm``, ``sparsegpt_minilm_2of4``,
  ``gptq_minilm_int4``: one shot on the encoder, 128 calibration paragraphs, no fine-tune),
  whose sparse / weight-only int4 layers run as dense float in ONNX Runtime; no STM32 part.
- ``--same-result``: ResNet-8's capped STM32F446 search on the process pool, on a local Ray
  cluster and SIGKILLed part-way then resumed; identical choice, accuracy and trials?
- the latency predictor's accuracy per runtime (ONNX Runtime, PyTorch) on 16 held-out
  random configurations: share within +-10%, Spearman; the wall time of each search.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import edgeslim as es
from _tasks import cluttered_mnist, minilm_classifier, stdlib_topics
from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.fileio import atomic_path
from edgeslim.search import Budget, SearchSpace
from edgeslim.search.cost import RuntimeTarget, fingerprint
from edgeslim.search.engine import search
from edgeslim.search.fit import FitRule
from edgeslim.search.predictor_eval import evaluate_predictor

console = Console(width=180)
warnings.filterwarnings("ignore")


def ort_ms(model: nn.Module, x: torch.Tensor, target: RuntimeTarget) -> float:
    return target.measure_ms(copy.deepcopy(model).eval(), x)


class Meter:
    """One latency verdict for the search's answer and every baseline alike: the search's
    :class:`~edgeslim.search.fit.FitRule` (the least of all a model's measurements;
    re-measured interleaved with the dense net when it misses by less than the noise; by the
    ratio to the dense net when that reads slower than its baseline ``dense_ms``)."""

    def __init__(self, dense: nn.Module, x: torch.Tensor, target: RuntimeTarget, dense_ms: float):
        self.target, self.x, self.dense_ms = target, x, dense_ms
        self.reference = target.timer(copy.deepcopy(dense).eval(), x)

    def verdict(self, model: nn.Module, limit_ms: float, prior: list[float] | tuple = ()):
        """``model`` measured once more (after ``prior``), judged against ``limit_ms``."""
        timer = self.target.timer(copy.deepcopy(model).eval(), self.x)
        rule = FitRule(limit_ms, self.reference, self.dense_ms)
        return rule.decide([*prior, timer()], timer)


def fit_row(v) -> dict[str, Any]:
    """A row's latency columns from a verdict."""
    return {"ms": v.latency_ms, "min_ms": min(v.samples), "fits": v.fits, "how": v.how,
            "samples": v.samples}  # fmt: skip


def tp_uniform(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    """Torch-Pruning's MagnitudePruner, L2, one uniform ratio (the classifier kept)."""
    import torch_pruning as tp

    twin = copy.deepcopy(model)
    head = [m for m in twin.modules() if isinstance(m, nn.Linear)][-1]
    # attention (MiniLM): whole heads, as Torch-Pruning's transformer examples (pruning q/k/v
    # outputs by the plain ratio leaves widths that are no multiple of the head size)
    attn = [m for m in twin.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "query")]
    heads = {lin: m.num_attention_heads for m in attn for lin in (m.query, m.key, m.value)}
    extra = ({"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
              "head_pruning_ratio": ratio} if heads else {})  # fmt: skip
    pruner = tp.pruner.MagnitudePruner(
        twin, x[:1], importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[head], **extra,
    )  # fmt: skip
    pruner.step()
    for m in attn:  # the module's own bookkeeping follows the pruned widths
        m.num_attention_heads = m.query.out_features // m.attention_head_size
        m.all_head_size = m.query.out_features
    return twin


def largest_within(build, meter: Meter, limit_ms: float) -> tuple[nn.Module, float, Any]:
    """The least-pruned model (ratio on a 0.05 grid) that fits the limit as the meter judges
    it (the verdict is returned: its measurements count again after the fine-tune)."""
    for step in range(1, 19):
        ratio = step * 0.05
        model = build(ratio)
        verdict = meter.verdict(model, limit_ms)
        if verdict.fits:
            break
    return model, ratio, verdict


# per-net training settings (MiniLM: a pretrained transformer on 2 CPU cores -- BERT
# fine-tuning rates, small batches, one distilled epoch, a short proxy; see the README)
CNN = {"epochs": 8, "quick_epochs": 4, "lr": 2e-3, "ft_lr": 1e-3, "batch": 64,
       "finetune_epochs": 4, "proxy_steps": 40, "proxy_val": 500}  # fmt: skip
TEXT = {"epochs": 3, "quick_epochs": 3, "lr": 1e-4, "ft_lr": 1e-4, "batch": 16,
        "finetune_epochs": 1, "proxy_steps": 12, "proxy_val": 200}  # fmt: skip
TEXT_NETS = ("minilm",)


def settings(name: str) -> dict[str, Any]:
    return TEXT if name in TEXT_NETS else CNN


def task_data(name: str, cache: dict[str, DataSplits]) -> DataSplits:
    """The net's task: cluttered MNIST for the zoo CNNs, the standard-library topics for
    MiniLM (``benchmarks/_tasks.py``; 2,000 train and 2,000 test paragraphs, 64 tokens)."""
    kind = "text" if name in TEXT_NETS else "images"
    if kind not in cache:
        if kind == "text":
            cache[kind] = stdlib_topics(minilm_classifier()[1], 64, max_train=2000, max_test=2000)
        else:
            cache[kind] = cluttered_mnist()
    return cache[kind]


def distil(model: nn.Module, teacher: nn.Module, data: DataSplits, epochs: int,
           lr: float = 1e-3, batch: int = 64, seed: int = 0) -> nn.Module:  # fmt: skip
    """The baselines' fine-tune: ``epochs`` distilled from ``teacher`` (``seed``: the data
    order; ``benchmarks/search_seeds.py`` repeats it with other seeds)."""
    es.fit(model, data, epochs=epochs, lr=lr, batch_size=batch, teacher=teacher,
           distill=es.KD(), seed=seed, progress=False)  # fmt: skip
    return model.eval()


def cached_model(
    saved: Path | None,
    full: Callable[[], nn.Module],
    skeleton: Callable[[], nn.Module],
    data: DataSplits,
) -> tuple[nn.Module, float]:
    """``full()``'s model and its test accuracy, kept in ``saved`` as a state dict + the
    accuracy (read back with ``weights_only=True``: no pickled module is ever loaded). A
    later invocation builds ``skeleton()`` -- the same structure made cheaply, e.g. with one
    calibration input -- and loads the saved tensors into it (strict: a mismatch raises)."""
    if saved is not None and saved.exists():
        rec = torch.load(saved, weights_only=True)
        model = skeleton()
        model.load_state_dict(rec["state_dict"])
        return model.eval(), float(rec["acc"])
    model = full().eval()
    acc = es.evaluate(model, data)
    if saved is not None:
        with atomic_path(saved) as tmp:
            torch.save({"state_dict": model.state_dict(), "acc": acc}, tmp)
    return model, acc


def uniform_int8(model: nn.Module, data: DataSplits, inputs: int = 256) -> nn.Module:
    """The uniform-int8 baseline: ``Int8PTQ`` with MSE activation scales on ``inputs``
    training inputs (``benchmarks/search_seeds.py`` repeats it after each seed's fine-tune)."""
    return es.quantize(model, es.Int8PTQ(calibration="mse"), calib=data.calib(inputs))


def int8_row(model: nn.Module, data: DataSplits, saved: Path | None = None) -> dict[str, Any]:
    """Uniform int8 (graph mode, QDQ in ONNX Runtime): the model and its accuracy; its
    latency is judged per budget by the meter (the same QDQ graph as the search's int8).
    With ``saved``, the scales and weights and the accuracy are kept there (a later
    invocation reuses them: MiniLM's int8 calibration + test evaluation takes ~6 min on the
    shared 2 cores; the structure is rebuilt with 2 calibration inputs)."""
    q, acc = cached_model(
        saved, lambda: uniform_int8(model, data), lambda: uniform_int8(model, data, 2), data
    )
    return {"model": q, "acc": acc, "pred": None, "samples": []}


def int8_at(row: dict[str, Any], meter: Meter, limit: float) -> dict[str, Any]:
    """The int8 row at one budget: measured once more, all its measurements judged."""
    v = meter.verdict(row["model"], limit, row["samples"])
    row["samples"] = v.samples
    return {"acc": row["acc"], "pred": None, **fit_row(v)}


def trained_dense(name: str, data: DataSplits, args) -> nn.Module:
    """The zoo net trained dense ``args.epochs`` on the task (seeded; the weights are kept in
    ``--out``, so a later invocation reuses them)."""
    torch.manual_seed(0)
    cfg = settings(name)
    epochs = cfg["epochs"] if name in TEXT_NETS else args.epochs
    dense = minilm_classifier()[0] if name in TEXT_NETS else es.load_model(f"zoo:{name}")
    saved = Path(args.out) / f"{name}-dense-{epochs}ep.pt"
    if saved.exists():  # the same seeded training, kept from an earlier run
        dense.load_state_dict(torch.load(saved))
    else:
        es.fit(dense, data, epochs=epochs, lr=cfg["lr"], batch_size=max(32, cfg["batch"]),
               shift=0, progress=False)  # fmt: skip
        torch.save(dense.state_dict(), saved)
    return dense.eval()


MINILM_RECIPES = {  # recipes/*.yaml's methods, applied to the encoder as the recipes do
    "recipe wanda_minilm (Wanda 50% unstructured)": lambda: (es.prune_, es.Wanda(sparsity=0.5)),
    "recipe sparsegpt_minilm_2of4 (SparseGPT 2:4)": lambda: (es.prune_, es.SparseGPT(n=2, m=4)),
    "recipe gptq_minilm_int4 (GPTQ int4 g128)": lambda: (es.quantize_,
                                                         es.GPTQ(bits=4, group_size=128)),
}  # fmt: skip


def minilm_recipes(dense: nn.Module, data: DataSplits, out: Path) -> dict[str, dict]:
    """The hand-written MiniLM recipes' one-shot methods on the trained classifier's encoder
    (128 calibration paragraphs of the train split, no fine-tune, as the recipes): the model,
    its accuracy and its measurements (sparse and weight-only int4 layers run as dense float
    in ONNX Runtime, so no speed-up is expected; the rows say what was measured). Each
    compressed model and its accuracy are kept in ``out`` (a later invocation reuses them)."""
    ids = data.train.x[:: max(1, len(data.train) // 128)][:128]
    calib = [{"input_ids": ids[i : i + 1], "attention_mask": (ids[i : i + 1] != 0).long()}
             for i in range(len(ids))]  # fmt: skip
    rows = {}
    for i, (label, make) in enumerate(MINILM_RECIPES.items()):
        verb, cfg = make()

        def run(c: list[dict], verb=verb, cfg=cfg) -> nn.Module:
            model = copy.deepcopy(dense)
            verb(model.encoder, cfg, calib=c)
            return model

        # kept as a state dict; rebuilt with one calibration paragraph, then loaded
        model, acc = cached_model(out / f"minilm-recipe-{i}.sd.pt", lambda r=run: r(calib),
                                  lambda r=run: r(calib[:1]), data)  # fmt: skip
        rows[label] = {"model": model, "acc": acc, "samples": []}
    return rows


def net_part(name: str, data: DataSplits, args, rows: list, pred_rows: list, cache: Path):
    t0 = time.perf_counter()
    cfg = settings(name)
    ft_epochs = 0 if args.smoke else cfg["finetune_epochs"]
    proxy_steps = 2 if args.smoke else cfg["proxy_steps"]
    dense = trained_dense(name, data, args)
    x = data.test.x[:1]
    target = RuntimeTarget("ort", cache=cache)
    dense_ms = args.dense_ms or min(ort_ms(dense, x, target) for _ in range(3))
    meter = Meter(dense, x, target, dense_ms)
    dense_acc = es.evaluate(dense, data)
    console.print(f"{name}: dense {100 * dense_acc:.2f}% in {time.perf_counter() - t0:.0f} s, "
                  f"ORT {dense_ms:.4f} ms")  # fmt: skip
    rows.append({"net": name, "budget": "-", "method": "dense", "acc": dense_acc,
                 "ms": dense_ms, "pred": None, "wall": None})  # fmt: skip
    if not args.search_only:
        keep = name in TEXT_NETS  # slow to redo: kept in --out
        q = int8_row(dense, data, Path(args.out) / f"{name}-int8.sd.pt" if keep else None)
        tuned = copy.deepcopy(dense)
        saved = Path(args.out) / f"{name}-dense-tuned-{ft_epochs}ep.pt"
        if saved.exists():  # the same seeded fine-tune, kept from an earlier invocation
            tuned.load_state_dict(torch.load(saved))
        else:
            distil(tuned.train(), dense, data, ft_epochs, cfg["ft_lr"], cfg["batch"])
            torch.save(tuned.state_dict(), saved)
        q_tuned = int8_row(
            tuned.eval(), data, Path(args.out) / f"{name}-tuned-int8.sd.pt" if keep else None
        )
        recipes = minilm_recipes(dense, data, Path(args.out)) if name in TEXT_NETS else {}
    # the default space on ONNX Runtime: channels (fine keep menus) + low rank + a float/int8
    # switch, searched together
    spaces = {"channels + low rank + float/int8": SearchSpace()}
    if args.int8:  # the earlier, separate space: every layer int8, channels searched
        spaces["channels + int8"] = SearchSpace(techniques=["channel", "lowrank", "bits"],
                                                bits=[8])  # fmt: skip
    for frac in args.fractions:
        limit = frac * dense_ms
        label = f"{frac:.2f}x ({limit:.4f} ms)"
        for what, space in spaces.items():
            t0 = time.perf_counter()
            suffix = "" if what.startswith("channels + low rank") else "-int8"
            res = search(
                dense, data, Budget(max_latency_ms=limit, target="ort"),
                space=space, trials=args.trials, batch=4,
                seed=0, proxy_steps=proxy_steps, finetune_top=3,
                proxy_val=cfg["proxy_val"], batch_size=cfg["batch"], lr=cfg["ft_lr"],
                finetune_epochs=ft_epochs, cache=cache, workers=args.workers,
                out=Path(args.out) / f"{name}-{frac}{suffix}", progress=False,
                reference_ms=dense_ms,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            rows.append({"net": name, "budget": label, "method": f"es.search ({what})",
                         "acc": res.accuracy, "ms": res.measured.get("latency_ms"),
                         "file_ms": res.measured.get("file_latency_ms"),
                         "pred": res.predicted.get("latency_ms"), "wall": wall,
                         "feasible": res.feasible, "fits": res.feasible, "how": res.verdict,
                         "samples": (res.finalists[0].get("fit") or {}).get("samples")
                         if res.finalists else None,
                         "proxy_rho": res.proxy_spearman, "limit": limit})  # fmt: skip
            console.print(f"  {label}: search ({what}) {res.summary()} ({wall:.0f} s)")
            save(args, rows, pred_rows)
        if args.search_only:
            continue
        # every baseline judged like the search's answer: all its measurements (before and
        # after its fine-tune), re-measured against the dense net near the limit
        tp_model, ratio, v = largest_within(lambda r: tp_uniform(dense, x, r), meter, limit)
        distil(tp_model, dense, data, ft_epochs, cfg["ft_lr"], cfg["batch"])
        v = meter.verdict(tp_model, limit, v.samples)
        rows.append({"net": name, "budget": label, "method": f"Torch-Pruning uniform ({ratio:.2f})",
                     "acc": es.evaluate(tp_model, data), **fit_row(v),
                     "pred": None, "wall": None, "limit": limit})  # fmt: skip
        rows.append({"net": name, "budget": label, "method": "uniform int8 (ORT QDQ)",
                     **int8_at(q, meter, limit), "wall": None, "limit": limit})  # fmt: skip
        rows.append({"net": name, "budget": label, "method": "uniform int8 after the fine-tune",
                     **int8_at(q_tuned, meter, limit), "wall": None,
                     "limit": limit})  # fmt: skip
        for label_r, rec in recipes.items():  # MiniLM: the three one-shot recipes
            rows.append({"net": name, "budget": label, "method": label_r,
                         **int8_at(rec, meter, limit), "wall": None,
                         "limit": limit})  # fmt: skip
        if recipes:
            save(args, rows, pred_rows)
            continue
        hand = copy.deepcopy(dense)
        es.prune_(hand, es.ChannelPrune(macs=frac, allocation="sensitivity"), example=x, data=data)
        v = meter.verdict(hand, limit)
        distil(hand, dense, data, ft_epochs, cfg["ft_lr"], cfg["batch"])
        v = meter.verdict(hand, limit, v.samples)
        rows.append({"net": name, "budget": label, "method": f"recipe ChannelPrune(macs={frac})",
                     "acc": es.evaluate(hand, data), **fit_row(v), "pred": None,
                     "wall": None, "limit": limit})  # fmt: skip
        save(args, rows, pred_rows)
    # the predictor, per runtime (and int8 on ONNX Runtime)
    from edgeslim.search.apply import build

    checks = (
        []
        if args.search_only
        else [("ort", "channels + low rank"), ("torch", "channels + low rank")]
    )
    checks += [("ort", "channels + int8")] if args.int8 else []
    checks = [] if args.no_predictor else checks
    for runtime, what in checks:
        tgt = RuntimeTarget(runtime, cache=cache)
        bound = spaces.get(what, SearchSpace(techniques=["channel", "lowrank"])).bind(
            dense, x, tgt.techniques, tgt.optional)  # fmt: skip
        calib = data.calib(64) if what == "channels + int8" else None
        ends = [build(dense, bound.dense(), x, calib), build(dense, bound.smallest(), x, calib)]
        tgt.calibrate(ends, x, fingerprint(ends[0]))
        rep = evaluate_predictor(tgt, bound, dense, x, n=args.predictor_n, calib=calib)
        pred_rows.append({"net": name, **rep.as_dict(), "target": f"{runtime} ({what})"})
        console.print(f"  predictor {runtime} ({what}): {rep.as_dict()}")
        save(args, rows, pred_rows)
    if not args.no_mcu and name not in TEXT_NETS:  # the C backend has no transformer ops
        mcu_part(name, dense, dense_acc, data, args, rows, pred_rows)


MCU_ZOO = ("resnet8", "mobilenetv2", "mobilenetv1", "squeezenet", "lenet5")


def mcu_budgets(dense: nn.Module, data: DataSplits) -> dict[str, Budget]:
    """The STM32F446 budgets: the issue's SRAM 128 KB / flash 512 KB, alone and with a
    device-model latency cap of half the dense net's (int8 C export, the current model)."""
    from edgeslim.search.cost import McuTarget

    mcu = McuTarget("stm32f446")
    calib = data.calib(64)
    mcu.calibrate([dense], data.test.x[:1], "", calib=calib)
    return budgets_for(mcu.measure(dense, data.test.x[:1], calib)["latency_ms"])


def budgets_for(dense_device_ms: float) -> dict[str, Budget]:
    """The two STM32F446 budgets, given the dense net's device-model latency."""
    cap = 0.5 * dense_device_ms
    return {
        f"stm32f446 + {cap:.1f} ms (device model)": Budget(
            max_sram_kb=128, max_flash_kb=512, max_latency_ms=cap, target="stm32f446"
        ),
        "stm32f446 (SRAM 128 KB, flash 512 KB)": Budget(
            max_sram_kb=128, max_flash_kb=512, target="stm32f446"
        ),
    }


def mcu_search(dense: nn.Module, data: DataSplits, budget: Budget, args, out: Path, **where):
    """The microcontroller search (``where``: ``workers=`` or ``ray=``). Weight bits stay 8
    (the C backend's own int8): a graph-mode quantized ResNet-8 cannot be lowered to the C
    backend's int8 graph (its quantizer requantizes relu(add) in float;
    tests/test_mcu_lower.py), so the bits knobs are left out of the space here. The device
    costs are the C export's and the latency model's: no host timing, so the same call gives
    the same answer on any executor and after a resume."""
    space = SearchSpace(techniques=["channel", "sparsity", "lowrank"])
    where = where or {"workers": args.workers}
    return search(dense, data, budget, space=space, trials=args.trials, batch=4, seed=0,
                  proxy_steps=args.proxy_steps, finetune_top=3,
                  finetune_epochs=args.finetune_epochs, out=out, progress=False,
                  **where)  # fmt: skip


def mcu_cost_ok(cost: dict[str, float], budget: Budget) -> bool:
    lim = budget.limits()
    return all(cost[k] <= v for k, v in lim.items() if k in cost)


def mcu_zoo_row(zoo: str, data: DataSplits, args, label: str, budget: Budget) -> dict[str, Any]:
    """A zoo net trained on the same task (``args.epochs``), compressed with edgeslim's tool
    when over the latency cap (``ChannelPrune(macs=f)``, f from the device model of the
    exported graph), then fine-tuned ``args.finetune_epochs`` distilled from its dense self
    (pruned or not: the search's finalists get the same), costs from the C export."""
    from edgeslim.core.errors import EdgeslimError
    from edgeslim.search.cost import McuTarget

    mcu = McuTarget("stm32f446")
    calib = data.calib(64)
    x = data.test.x[:1]
    row = {"net": zoo, "budget": label, "method": f"zoo {zoo}", "pred": None, "wall": None}
    try:
        dense = trained_dense(zoo, data, args)
        mcu.calibrate([dense], x, "", calib=calib)
        cost = mcu.measure(dense, x, calib)
    except EdgeslimError as exc:  # not exportable to C
        return {**row, "acc": None, "fits": False, "note": str(exc).splitlines()[0][:90]}
    model, frac, note = copy.deepcopy(dense), 1.0, "dense"
    cap = budget.max_latency_ms
    for _ in range(6):  # prune until the exported graph meets the latency cap
        if cap is None or cost["latency_ms"] <= cap:
            break
        frac *= 0.97 * cap / cost["latency_ms"]
        model = copy.deepcopy(dense)
        es.prune_(model, es.ChannelPrune(macs=frac), example=x)
        note = f"ChannelPrune(macs={frac:.3f})"
        cost = mcu.measure(model.eval(), x, calib)
    distil(model.train(), dense, data, args.finetune_epochs)
    cost = mcu.measure(model, x, calib)
    return {**row, "acc": es.evaluate(model, data), "dense_acc": es.evaluate(dense, data),
            "ms": cost["latency_ms"], "sram_kb": cost["sram_kb"], "flash_kb": cost["flash_kb"],
            "fits": mcu_cost_ok(cost, budget),
            "note": f"{note} + {args.finetune_epochs} ep KD"}  # fmt: skip


def mcu_part(name: str, dense: nn.Module, dense_acc: float, data: DataSplits, args,
             rows: list, pred_rows: list) -> None:  # fmt: skip
    """Per STM32F446 budget: the search's answer beside every zoo net of the same task that
    fits the same budget (latency cap included, compressed by edgeslim's tools to meet it)."""
    kinds = ("cap", "nocap")
    for kind, (label, budget) in zip(kinds, mcu_budgets(dense, data).items(), strict=True):
        if kind not in args.mcu_budgets:
            continue
        t0 = time.perf_counter()
        out = Path(args.out) / (f"{name}-stm32f446" + ("" if budget.max_latency_ms else "-nocap"))
        res = mcu_search(dense, data, budget, args, out)
        rows.append({"net": name, "budget": label, "method": "es.search", "acc": res.accuracy,
                     "dense_acc": dense_acc, "ms": res.measured.get("latency_ms"),
                     "pred": res.predicted.get("latency_ms"),
                     "wall": time.perf_counter() - t0, "feasible": res.feasible,
                     "fits": res.feasible and mcu_cost_ok(res.measured, budget),
                     "candidate": res.candidate, "sram_kb": res.measured.get("sram_kb"),
                     "flash_kb": res.measured.get("flash_kb")})  # fmt: skip
        console.print(f"  {label}: {res.summary()}")
        save(args, rows, pred_rows)
        for zoo in args.mcu_zoo:
            rows.append(mcu_zoo_row(zoo, data, args, label, budget))
            console.print(f"    {rows[-1]}")
            save(args, rows, pred_rows)


def same_result(data: DataSplits, args, rows: list) -> None:
    """ResNet-8, the STM32F446 budget with the latency cap: the search on the process pool,
    on a local Ray cluster, and killed with SIGKILL part-way then resumed on the same
    directory. Reports each one's choice and accuracy, and whether they are identical."""
    import random
    import shutil
    import signal
    import subprocess
    import sys

    dense = trained_dense("resnet8", data, args)
    label, budget = next(iter(mcu_budgets(dense, data).items()))
    base = Path(args.out) / "same"
    shutil.rmtree(base, ignore_errors=True)  # three fresh runs
    got: dict[str, Any] = {}
    t0 = time.perf_counter()
    got["process pool (2 workers)"] = mcu_search(dense, data, budget, args, base / "pool")
    t1 = time.perf_counter()
    got["local Ray cluster"] = mcu_search(dense, data, budget, args, base / "ray", ray="auto")
    t2 = time.perf_counter()
    killed = base / "killed"
    trials = killed / "trials.jsonl"
    low = min(3, args.trials - 1)  # killed part-way: at least one trial left to resume
    after = random.Random(time.time_ns()).randint(low, max(low, args.trials - 3))
    keep = [a for a in sys.argv[1:] if a != "--same-result"]  # the same settings
    if "--json" in keep:
        del keep[keep.index("--json") : keep.index("--json") + 2]
    cmd = [sys.executable, __file__, *keep, "--same-child", str(killed)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        if trials.exists() and len(trials.read_bytes().splitlines()) >= after:
            os.killpg(proc.pid, signal.SIGKILL)  # the search and its pool workers
            break
        time.sleep(0.05)
    proc.wait()
    done = len(trials.read_bytes().splitlines()) if trials.exists() else 0
    console.print(f"  killed (rc {proc.returncode}) after {done} of {args.trials} trials")
    got[f"SIGKILL after {done} trials, resumed"] = mcu_search(dense, data, budget, args, killed)
    walls = [t1 - t0, t2 - t1, time.perf_counter() - t2]
    ref = got["process pool (2 workers)"]
    key = [(t["candidate"], t["accuracy"]) for t in ref.trials]
    for (how, res), wall in zip(got.items(), walls, strict=True):
        rows.append({"net": "resnet8", "budget": label, "method": f"es.search on {how}",
                     "acc": res.accuracy, "ms": res.measured.get("latency_ms"),
                     "pred": res.predicted.get("latency_ms"), "wall": wall,
                     "sram_kb": res.measured.get("sram_kb"),
                     "flash_kb": res.measured.get("flash_kb"), "candidate": res.candidate,
                     "killed_rc": proc.returncode if how.startswith("SIGKILL") else None,
                     "same_choice": res.candidate == ref.candidate,
                     "same_accuracy": res.accuracy == ref.accuracy,
                     "same_trials": [(t["candidate"], t["accuracy"]) for t in res.trials] == key,
                     })  # fmt: skip
        console.print(f"  {how}: {res.summary()} ({wall:.0f} s)")


def same_child(data: DataSplits, args) -> None:
    """The search ``same_result`` kills (a subprocess, so that SIGKILL hits a real run)."""
    dense = trained_dense("resnet8", data, args)
    _, budget = next(iter(mcu_budgets(dense, data).items()))
    mcu_search(dense, data, budget, args, Path(args.same_child))


def save(args, rows: list, pred_rows: list) -> None:
    """The rows so far, as JSON (a long run keeps what it measured)."""
    if args.json:
        from edgeslim.core.fileio import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"rows": rows, "predictor": pred_rows},
                                                      indent=1, default=str))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-8 only, fewer trials")
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--smoke", action="store_true", help="a minute-long check that it runs")
    parser.add_argument("--int8", action="store_true",
                        help="also search channels + int8 (QDQ) on ONNX Runtime")  # fmt: skip
    parser.add_argument("--search-only", action="store_true",
                        help="only the searches (+ int8 predictor): no baselines")  # fmt: skip
    parser.add_argument("--fractions", default="0.7,0.5,0.35", help="latency budgets, x dense")
    parser.add_argument("--no-mcu", action="store_true", help="skip the STM32F446 part")
    parser.add_argument("--no-predictor", action="store_true", help="skip the predictor check")
    parser.add_argument("--dense-ms", type=float,
                        help="the dense model's ORT ms (budgets of an earlier run)")  # fmt: skip
    parser.add_argument(
        "--nets",
        dest="nets_arg",
        type=lambda t: t.split(","),
        help="comma-separated zoo nets (default: by --quick)",
    )
    parser.add_argument("--mcu-zoo", default=",".join(MCU_ZOO),
                        help="zoo nets beside the STM32F446 answer ('' for none)")  # fmt: skip
    parser.add_argument("--same-result", action="store_true",
                        help="only: ResNet-8's STM32F446 search on the pool, on Ray, and "
                        "SIGKILLed + resumed; are the answers identical")  # fmt: skip
    parser.add_argument("--same-child", help=argparse.SUPPRESS)
    parser.add_argument("--mcu-budgets", default="cap,nocap",
                        help="STM32F446 budgets: with the latency cap (cap), SRAM and flash "
                        "only (nocap)")  # fmt: skip
    parser.add_argument("--trials", type=int, help="trials per search (default 24 / 32)")
    args = parser.parse_args()
    args.mcu_zoo = [z for z in args.mcu_zoo.split(",") if z]
    args.mcu_budgets = args.mcu_budgets.split(",")
    args.nets = ["resnet8"] if args.quick or args.smoke else ["resnet8", "mobilenetv2"]
    args.nets = args.nets if not args.nets_arg else args.nets_arg
    args.epochs = 4 if args.quick else 8
    args.trials = args.trials or (24 if args.quick else 32)
    args.proxy_steps = 40  # 10 left heavily pruned nets at chance: no signal for the sampler
    args.finetune_epochs = 4  # finalists and every baseline alike
    args.predictor_n = 12 if args.quick else 16
    args.fractions = tuple(float(f) for f in args.fractions.split(",") if f)
    if args.smoke:
        args.epochs, args.trials, args.proxy_steps, args.finetune_epochs = 1, 4, 2, 0
        args.predictor_n, args.fractions = 3, (0.5,)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # the int8 export's duplicate-initializer notes
    cache = Path(args.out) / "latency-cache"
    os.makedirs(cache, exist_ok=True)
    start = time.perf_counter()
    datasets: dict[str, DataSplits] = {}
    data = task_data("resnet8", datasets) if args.same_child or args.same_result else None
    rows: list[dict] = []
    pred_rows: list[dict] = []
    if args.same_child:
        same_child(data, args)
        return
    if args.same_result:
        same_result(data, args, rows)
        save(args, rows, pred_rows)
        for r in rows:
            console.print(r)
        return
    for name in args.nets:
        net_part(name, task_data(name, datasets), args, rows, pred_rows, cache)
    table = Table(title="searched vs uniform vs recipe (test accuracy; ONNX Runtime ms, 1 thread)")
    for col in ("net", "budget", "method", "test acc", "measured ms", "fits", "predicted ms",
                "search s", "SRAM KB", "flash KB"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("net", "budget", "method") else "right")

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, int | float) else "-"

    for r in rows:
        fits = {True: "yes", False: "no"}.get(r.get("fits"), "-")
        table.add_row(r["net"], r["budget"], r["method"], f(100 * (r["acc"] or 0), ".2f"),
                      f(r["ms"], ".4f"), fits, f(r["pred"], ".4f"), f(r["wall"], ".0f"),
                      f(r.get("sram_kb"), ".1f"), f(r.get("flash_kb"), ".1f"))  # fmt: skip
    console.print(table)
    pt = Table(title="latency predictor on held-out random configurations")
    for col in ("net", "runtime", "n", "within ±10%", "Spearman", "mean |error|"):
        pt.add_column(col)
    for r in pred_rows:
        pt.add_row(r["net"], r["target"], str(r["n"]), f"{100 * r['within_10']:.0f}%",
                   f"{r['spearman']:.3f}", f"{100 * r['mean_abs_error']:.1f}%")  # fmt: skip
    console.print(pt)
    console.print(f"wall time {time.perf_counter() - start:.0f} s on {os.cpu_count()} CPUs")
    save(args, rows, pred_rows)


if __name__ == "__main__":
    main()
