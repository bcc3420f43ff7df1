"""Is the searched model's lead at a latency budget real? Fine-tune seeds + paired tests.

    nice -n 19 python benchmarks/search_seeds.py --out RUN_DIR --nets resnet8,mobilenetv2 \
        --fraction 0.35 --seeds 0,1,2,3,4 --json benchmarks/results/search_seeds_035.json

A companion of ``benchmarks/search.py``: it reads that script's run directory (``--out``:
the dense weights ``{net}-dense-{E}ep.pt`` and the search directory ``{net}-{fraction}``)
and its results JSON (``--baselines``: which baselines fit the budget, as measured there),
and measures **no latency** (the architectures are those already judged to fit; so it may
run outside the CPU lock, niced, on one thread).

Per net, the architectures are fixed -- the search's chosen candidate (its channel choice:
``apply_structure_`` on the dense weights, as in the search) and every baseline that fit the
budget (Torch-Pruning's uniform pruner at its recorded ratio; a ``ChannelPrune`` recipe) --
and only the final fine-tune is repeated: the benchmark's 4 epochs distilled from the dense
net (``search.distil``: Adam, cosine, lr 1e-3, batch 64, the epoch with the best validation
accuracy kept), once per ``--seeds`` value (the seed sets the data order), the same for
every method. Seed 0 of a baseline is exactly the benchmark's own row; the search's
finalists were fine-tuned inside ``es.search`` (its own train order and 500 validation
images), so its seed 0 here is a re-run, and its delivered model is evaluated too.

Test sets: the benchmark's 2,000 images (the 1,000 test digits twice) and a larger one,
``--test-copies`` draws of every test digit (``_tasks.cluttered_mnist(test_copies=...)``:
the extra copies are drawn after the others, so the training data and the first 2,000 test
images are unchanged; all methods see the same images). Statistics (``_stats.py``): per
method mean +- sd over seeds; per seed the paired difference search - baseline; a paired t
over seeds; exact McNemar per seed; a t-test over the 1,000 digits of the per-digit mean
difference (copies of one digit are not independent); and a conservative combined z with
both the seed and the test-sample noise. Every fine-tune's per-image correctness is kept in
``--out`` (``{net}-{fraction}-seeds/``), so an interrupted run resumes.

MiniLM (``--nets minilm``): search.py's text task (2,000 test paragraphs, one draw each:
every paragraph is its own cluster, and there is no larger set), one distilled epoch
(search.py's ``TEXT`` settings), and two more baselines: uniform int8 after the same
fine-tune (``Int8PTQ``, MSE activation scales on 256 training paragraphs, as search.py's
row) and uniform int8 without one (no seeds: computed once); neither depends on the budget,
so their records are kept once per net (``{net}-seeds-shared/``). Methods whose fine-tune starts
from the same model share it per seed (``{net}-seeds-ft/``): where the search's answer is
uniform int8, it and the int8 baseline are then one fine-tuned float model quantized two
ways. ``--exclude REGEX`` leaves baselines out (e.g. one far behind, to save CPU time).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import edgeslim as es
from _stats import clustered_t, combined, mcnemar_exact, paired_t
from _tasks import cluttered_mnist
from edgeslim.core.data.datasets import DataSplits, Split
from edgeslim.core.fileio import atomic_path, atomic_write_text
from edgeslim.search.apply import CALIB_INPUTS, apply_structure_, quantize_candidate
from search import TEXT_NETS, distil, settings, task_data, tp_uniform, uniform_int8

console = Console(width=160)
warnings.filterwarnings("ignore")
STD = 2000  # the benchmark's test set: the first 2,000 images (MiniLM: its 2,000 paragraphs)
CHECK = 256  # MiniLM: es.evaluate is checked on this many paragraphs (int8 BERT is slow here)


@torch.no_grad()
def correct_on(model: nn.Module, split: Split, batch: int = 1000) -> torch.Tensor:
    """Per image: is the top-1 prediction right (bool, in the split's order)."""
    model.eval()
    out = [
        model(split.x[i : i + batch]).argmax(1) == split.y[i : i + batch]
        for i in range(0, len(split), batch)
    ]
    return torch.cat(out)


def load_dense(name: str, out: Path, epochs: int) -> nn.Module:
    saved = out / f"{name}-dense-{epochs}ep.pt"
    if not saved.exists():
        raise FileNotFoundError(f"{saved}: no dense weights (run benchmarks/search.py first)")
    if name in TEXT_NETS:
        from _tasks import minilm_classifier

        dense = minilm_classifier()[0]
    else:
        dense = es.load_model(f"zoo:{name}")
    dense.load_state_dict(torch.load(saved, weights_only=True))
    return dense.eval()


def digest(model: nn.Module) -> str:
    """A hash of a model's structure and every tensor's values: two methods whose built
    models have the same digest share one fine-tune per seed (``run_seed``)."""
    h = hashlib.sha256(repr(model).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def baseline_rows(files: list[Path], name: str, frac: float) -> list[dict[str, Any]]:
    """The baselines that fit the budget in ``search.py``'s results JSONs."""
    rows = []
    for f in files:
        for r in json.loads(f.read_text())["rows"]:
            if (r["net"] == name and str(r["budget"]).startswith(f"{frac:.2f}x")
                    and r.get("fits") and not r["method"].startswith("es.search")):  # fmt: skip
                rows.append(r)
    return rows


def methods_for(name: str, dense: nn.Module, data: DataSplits, frac: float, out: Path,
                baselines: list[Path]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{label: {"build": () -> pruned model, "finish": model -> model, ...}}``: the search's
    chosen architecture first, then every baseline that fit."""
    x = data.test.x[:1]
    sdir = out / f"{name}-{frac}"
    res = json.loads((sdir / "result.json").read_text())
    if not res["feasible"]:
        raise ValueError(f"{sdir}: the search found nothing that fits")
    cand, number = res["candidate"], res["finalists"][0]["number"]
    calib = data.calib(min(CALIB_INPUTS, len(data.train)))  # as es.search

    def build_search() -> nn.Module:
        m = copy.deepcopy(dense)
        apply_structure_(m, cand, x)
        return m

    # the structure must be the one the search fine-tuned (its weights' shapes)
    weights = torch.load(sdir / "final" / f"trial-{number}.pt", weights_only=True)
    built = quantize_candidate(build_search().eval(), cand, calib).state_dict()
    shapes = {k: tuple(v.shape) for k, v in built.items()}
    if shapes != {k: tuple(v.shape) for k, v in weights.items()}:
        raise ValueError(f"{sdir}: trial {number}'s saved weights do not match the rebuilt model")
    delivered = quantize_candidate(build_search().eval(), cand, calib)
    delivered.load_state_dict(weights)
    methods = {
        f"es.search (trial {number})": {
            "build": build_search, "finish": lambda m: quantize_candidate(m, cand, calib),
            "candidate": cand, "recorded_acc": res["accuracy"], "delivered": delivered.eval(),
        }
    }  # fmt: skip
    for row in baseline_rows(baselines, name, frac):
        label = row["method"]
        if m := re.fullmatch(r"Torch-Pruning uniform \(([\d.]+)\)", label):
            ratio = float(m.group(1))
            build = lambda r=ratio: tp_uniform(dense, x, r)  # noqa: E731
        elif m := re.fullmatch(r"recipe ChannelPrune\(macs=([\d.]+)\)", label):
            macs = float(m.group(1))

            def build(f=macs) -> nn.Module:
                h = copy.deepcopy(dense)
                cfg = es.ChannelPrune(macs=f, allocation="sensitivity")
                es.prune_(h, cfg, example=x, data=data)
                return h
        elif label in ("uniform int8 after the fine-tune", "uniform int8 (ORT QDQ)"):
            # search.py's uniform int8: the dense net fine-tuned like the others first, or
            # (ORT QDQ) as trained: no seeds to vary
            methods[label] = {
                "build": lambda: copy.deepcopy(dense), "recorded_acc": row["acc"],
                "finish": lambda m: uniform_int8(m, data),
                "finetune": label.endswith("fine-tune"), "shared": True,
            }  # fmt: skip
            continue
        else:
            raise ValueError(f"baseline {label!r}: no fine-tune to repeat")
        methods[label] = {"build": build, "finish": lambda m: m, "recorded_acc": row["acc"]}
    return methods


def run_seed(name: str, label: str, spec: dict, dense: nn.Module, data: DataSplits,
             big: Split, seed: int, cache: Path) -> dict[str, Any]:  # fmt: skip
    """One fine-tune of one architecture with one seed, then the method's finish (kept in
    ``cache``). The fine-tuned float weights are kept per built model's digest and seed in
    ``{name}-seeds-ft/`` beside ``cache`` (shared by every budget): methods that start from
    the same model share the fine-tune (MiniLM: the search's uniform int8 and uniform int8
    after the fine-tune then differ only in the int8 calibration -- the same float model,
    quantized two ways). A method without a fine-tune (``"finetune": False``) is computed
    once and reused for every seed; one that does not depend on the budget (``"shared"``:
    the int8 baselines) is kept in ``{name}-seeds-shared/``, reused by every budget."""
    slug = re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")
    tuned = spec.get("finetune", True)
    if spec.get("shared"):
        cache = cache.parent / f"{name}-seeds-shared"
        cache.mkdir(exist_ok=True)
    saved = cache / f"{slug}-seed{seed if tuned else 'none'}.pt"
    if saved.exists():
        return torch.load(saved, weights_only=True)
    cfg = settings(name)
    t0 = time.perf_counter()
    model = spec["build"]().train()
    if tuned:
        ft = cache.parent / f"{name}-seeds-ft" / f"{digest(model)}-seed{seed}.pt"
        if ft.exists():
            model.load_state_dict(torch.load(ft, weights_only=True))
        else:
            distil(model, dense, data, cfg["finetune_epochs"], cfg["ft_lr"], cfg["batch"],
                   seed=seed)  # fmt: skip
            ft.parent.mkdir(exist_ok=True)
            with atomic_path(ft) as tmp:
                torch.save(model.state_dict(), tmp)
    model = spec["finish"](model.eval())
    correct = correct_on(model, big)
    acc = float(correct[:STD].double().mean())
    n = CHECK if name in TEXT_NETS else STD  # es.evaluate agrees (MiniLM: on the first 256)
    part = DataSplits(data.name, data.train, data.val,
                      Split(big.x[:n], big.y[:n]), data.num_classes)  # fmt: skip
    if abs(es.evaluate(model, part) - float(correct[:n].double().mean())) > 1e-9:
        raise RuntimeError(f"{label}: es.evaluate != the top-1 of the first {n} test inputs")
    rec = {"correct": correct, "acc": acc, "seconds": time.perf_counter() - t0}
    with atomic_path(saved) as tmp:
        torch.save(rec, tmp)
    return rec


def compare(a: list[dict], b: list[dict], copies: int) -> dict[str, Any]:
    """Search (``a``) vs a baseline (``b``), paired by seed (lists in seed order)."""
    total = len(a[0]["correct"])
    digits = total // copies
    out: dict[str, Any] = {}
    parts = (("std", STD),) if total == STD else (("std", STD), ("big", total))
    for part, n in parts:
        acc_a = [100 * float(r["correct"][:n].double().mean()) for r in a]
        acc_b = [100 * float(r["correct"][:n].double().mean()) for r in b]
        if len(a) < 2:  # one seed: no seed-to-seed spread to test
            pt = {"diffs": [x - y for x, y in zip(acc_a, acc_b, strict=True)], "se": 0.0,
                  "mean": acc_a[0] - acc_b[0], "sd": None, "t": None, "df": 0, "p": None,
                  "ci95": None}  # fmt: skip
        else:
            pt = paired_t(acc_a, acc_b)
        pairs = list(zip(a, b, strict=True))
        mc = [mcnemar_exact(ra["correct"][:n], rb["correct"][:n]) for ra, rb in pairs]
        diff = torch.stack([ra["correct"][:n].double() - rb["correct"][:n].double()
                            for ra, rb in zip(a, b, strict=True)]).mean(0)  # fmt: skip
        cl = clustered_t(100 * diff, torch.arange(n) % digits)
        out[part] = {"images": n, "paired_t": pt, "mcnemar": mc, "digit_t": cl,
                     "combined": combined(pt["mean"], pt["se"], cl["se"])}  # fmt: skip
    return out


def net_part(name: str, args, data: DataSplits, big: Split, copies: int) -> dict[str, Any]:
    out = Path(args.out)
    dense = load_dense(name, out, args.dense_epochs[name])
    methods = methods_for(name, dense, data, args.fraction, out, args.baselines)
    first = next(iter(methods))  # the search's answer is always repeated
    methods = {k: v for k, v in methods.items()
               if k == first or not (args.exclude and re.search(args.exclude, k))}  # fmt: skip
    res = json.loads((out / f"{name}-{args.fraction}" / "result.json").read_text())
    dense_acc = es.evaluate(dense, data)
    if abs(dense_acc - res["dense"]["accuracy"]) > 1e-9:
        raise ValueError(f"{name}: dense {dense_acc} != the search's {res['dense']['accuracy']}")
    cache = out / f"{name}-{args.fraction}-seeds"
    cache.mkdir(exist_ok=True)
    rows: dict[str, Any] = {}
    runs: dict[str, list[dict]] = {}
    for label, spec in methods.items():
        runs[label] = []
        for seed in args.seeds:
            rec = run_seed(name, label, spec, dense, data, big, seed, cache)
            runs[label].append(rec)
            console.print(f"  {name} {label} seed {seed}: {100 * rec['acc']:.2f} (2,000) "
                          f"{100 * float(rec['correct'].double().mean()):.2f} ({len(big)}) "
                          f"{rec['seconds']:.0f} s")  # fmt: skip
        per = {p: [100 * float(r["correct"][:n].double().mean()) for r in runs[label]]
               for p, n in (("std", STD), ("big", len(big)))}  # fmt: skip
        rows[label] = {
            "recorded_acc": spec["recorded_acc"], "candidate": spec.get("candidate"),
            "seeds": list(args.seeds), "acc_std": per["std"], "acc_big": per["big"],
            "seconds": [r["seconds"] for r in runs[label]],
            **{f"mean_{p}": sum(v) / len(v) for p, v in per.items()},
            **{f"sd_{p}": float(torch.tensor(v).std()) if len(v) > 1 else 0.0
               for p, v in per.items()},
        }  # fmt: skip
        if "delivered" in spec:  # the search's own fine-tuned answer
            c = correct_on(spec["delivered"], big)
            rows[label]["delivered"] = {"acc_std": 100 * float(c[:STD].double().mean()),
                                        "acc_big": 100 * float(c.double().mean())}  # fmt: skip
    labels = list(methods)
    n = min(len(runs[k]) for k in labels)
    comps = {}
    for other in labels[1:]:
        comps[f"{labels[0]} - {other}"] = compare(runs[labels[0]][:n], runs[other][:n],
                                                  copies)  # fmt: skip
    return {"dense_acc": dense_acc, "dense_epochs": args.dense_epochs[name], "copies": copies,
            "limit_ms": res["budget"]["latency_ms"], "methods": rows,
            "comparisons": comps}  # fmt: skip


def verdict(c: dict[str, Any]) -> str:
    big = c.get("big", c["std"])  # MiniLM: one test set
    lead, p = big["paired_t"]["mean"], big["combined"]["p"]
    size = "lead >= 1 point" if lead >= 1 else "lead < 1 point" if lead > 0 else "no lead"
    sig = "significant" if p < 0.05 else "not significant"
    return f"{size} ({lead:+.2f}), {sig} (combined p {p:.3g})"


def show(result: dict[str, Any], copies: int) -> None:
    for name, part in result["nets"].items():
        t = Table(title=f"{name}, {result['fraction']}x: test accuracy over seeds")
        k = part.get("copies", copies)
        for col in ("method", "recorded", "per seed (2,000)", "mean ± sd (2,000)",
                    f"mean ± sd ({k} x 1,000)" if k > 1 else "(the same set)"):  # fmt: skip
            t.add_column(col)
        for label, r in part["methods"].items():
            t.add_row(label, f"{100 * r['recorded_acc']:.2f}",
                      " / ".join(f"{v:.2f}" for v in r["acc_std"]),
                      f"{r['mean_std']:.2f} ± {r['sd_std']:.2f}",
                      f"{r['mean_big']:.2f} ± {r['sd_big']:.2f}")  # fmt: skip
        console.print(t)
        for what, c in part["comparisons"].items():
            for p in c:
                pt, cl, cb = c[p]["paired_t"], c[p]["digit_t"], c[p]["combined"]
                mc = " ".join(f"{m['a_only']}/{m['b_only']} p={m['p']:.3g}"
                              for m in c[p]["mcnemar"])  # fmt: skip
                seeds = ("one seed" if pt["p"] is None else f"paired t p={pt['p']:.3g}, 95% CI "
                         f"{pt['ci95'][0]:+.2f}..{pt['ci95'][1]:+.2f}")  # fmt: skip
                console.print(
                    f"  {what} [{c[p]['images']} images]: diffs "
                    f"{' / '.join(f'{d:+.2f}' for d in pt['diffs'])}; mean {pt['mean']:+.2f} "
                    f"({seeds}); digit t p={cl['p']:.3g} (se {cl['se']:.2f}); "
                    f"combined p={cb['p']:.3g}; McNemar per seed (only search / only baseline) {mc}"
                )  # fmt: skip
            console.print(f"  verdict: {verdict(c)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="benchmarks/search.py's --out directory")
    parser.add_argument("--nets", default="resnet8,mobilenetv2")
    parser.add_argument("--fraction", type=float, default=0.35, help="the budget, x dense")
    parser.add_argument("--dense-epochs", default="resnet8=4,mobilenetv2=8,minilm=3",
                        help="NET=E: the dense weights' epochs (ResNet-8: --quick)")  # fmt: skip
    parser.add_argument(
        "--baselines",
        default="benchmarks/results/search_quick_fit.json,"
        "benchmarks/results/search_mobilenetv2_035.json",
        help="search.py results JSONs: their baselines that fit the budget are repeated",
    )
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--test-copies", type=int, default=10,
                        help="draws of each test digit in the larger test set")  # fmt: skip
    parser.add_argument("--exclude", default="",
                        help="a regex: baselines whose label matches are not repeated")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.dense_epochs = {k: int(v) for k, v in (p.split("=") for p in args.dense_epochs.split(","))}
    args.baselines = [Path(p) for p in args.baselines.split(",") if p]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result: dict[str, Any] = {"fraction": args.fraction, "seeds": args.seeds,
                              "test_copies": args.test_copies, "nets": {}}  # fmt: skip
    for name in args.nets.split(","):
        if name in TEXT_NETS:  # search.py's text task: 2,000 test paragraphs, one draw each
            data, copies = task_data(name, {}), 1
            big = data.test
            if len(big) != STD:
                raise ValueError(f"{name}: {len(big)} test paragraphs, expected {STD}")
        else:  # the 2,000 benchmark images + the larger draw (its first 2,000 are the same)
            full, copies = cluttered_mnist(test_copies=args.test_copies), args.test_copies
            data = DataSplits(full.name, full.train, full.val,
                              Split(full.test.x[:STD], full.test.y[:STD]),
                              full.num_classes)  # fmt: skip
            big = full.test
        result["nets"][name] = net_part(name, args, data, big, copies)
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(result, indent=1, default=str))
    show(result, args.test_copies)
    console.print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
