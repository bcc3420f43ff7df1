"""Hardware-aware NAS (``es.nas``) vs the zoo's networks compressed to the same budget.

    flock /tmp/edgeslim-cpu.lock python benchmarks/nas.py            # the recorded run
    python benchmarks/nas.py --quick                                  # a smoke test (minutes)

**Data: shifted, cluttered MNIST** (:func:`_tasks.cluttered_mnist`, 28x28: digits shifted by
up to 4 px, six 7x7 patches of other digits pasted, Gaussian noise 0.15; 3,500 train /
500 val / 2,000 test; ``--test-copies 10``: 10,000 test images, each of the 1,000 test digits
drawn 10 times with its own shift, clutter and noise -- the training and validation images
and the first 2,000 test images stay the same). The supernet's elastic resolution resizes
these images (bilinear) to 20, 24 or 28 pixels.

**Budgets**, per device profile: its SRAM and flash (STM32F446: 128 KB / 512 KB;
STM32F746: 320 KB / 1 MB) **and** a device-model latency of at most ``--latency-ms`` (250 ms
by default, with the per-op instruction model fitted on QEMU: about 1.4 M MACs of the
supernet's blocks on the F446, 2.5 M on the F746; the largest sub-network needs 2,296 /
1,275 ms at 28 pixels, so the limit binds on both). At this input size no network here comes
near the SRAM or flash limits (they are checked all the same, from the exported C), so the
latency limit is what makes the two budgets differ.

**Searched**: one supernet (``SupernetSpec`` with resolutions 20/24/28, the first
``--fused-stages`` stages made of fused blocks; ``--stem-stride 1``, the default: the stem
conv at the input's resolution and the first stage halving it -- SqueezeNet's stem also runs
at full resolution, and a probe of fixed architectures trained alone, 16 epochs each, read
+1.5 to +3 points for it at the same device latency) trained once with the
sandwich rule, then ``es.nas`` per device with the same checkpoint (space optimisation:
``--space-samples`` per width x resolution cell, the ``--space-top`` best cells searched
together by the evolution, ``--population`` x ``--generations``; 3 finalists exported to C
(the best-estimated of each searched cell first); the ``--tune-finalists`` that fit each
fine-tuned ``--nas-finetune-epochs`` on the labels and the teacher's soft targets,
``--kd-alpha``, and the most accurate on the 500 validation images deployed -- the supernet's
estimate ranked resolution 24 a point above 28 where fine-tuning put 28 a point ahead;
Int8PTQ, C + TFLite Micro bit-exact).

**Zoo**: MobileNetV2-style, MobileNetV1, ShuffleNetV2, SqueezeNet, ResNet-8 trained dense
(``--zoo-epochs``), then, when over the budget, ``ChannelPrune(macs=f)`` (edgeslim's
structured pruning) with ``f`` from the device latency model, fine-tuned ``--finetune-epochs``
(labels and the dense net's soft targets, ``--kd-alpha``); Int8PTQ; exported to C for the
device (``export_c``, compiled and checked). Accuracy is int8 test accuracy of the exported
model's PyTorch twin.

**Seeds** (``--seeds 0,1,2``): the last fine-tuning of every row (the searched winner's and
each zoo net's, after pruning) is repeated with each seed (the data order; the supernet, the
search, the dense training and the pruning stay those of seed 0); a row reports the mean int8
test accuracy, the per-seed values and their spread. Seed 0 is the run ``es.nas`` deploys and
exports; the other seeds' costs are the same architecture's (measured once, with seed 0).

**Paired comparison**: every row keeps its int8 predictions on the test images per seed;
the searched net is compared with the most accurate zoo net that fits (:func:`paired`: per
seed, the difference and an exact McNemar test; over seeds, a paired t test; per image, the
correctness averaged over the seeds and a normal test; per digit, the images of one test
digit averaged first -- its copies are not independent -- and a t test over the 1,000 digits;
and a conservative "combined" z test whose variance adds the seed term and the digit term,
``benchmarks/_stats.py``).

**Rank correlation**: >= 10 sub-networks the F446 evolution scored (spread over its
accuracy range), each fine-tuned ``--rank-epochs`` from the supernet's weights; Spearman of
the supernet's estimate (BN re-calibrated, 500 val images) vs the fine-tuned test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import edgeslim as es
from _stats import clustered_t, combined
from _tasks import cluttered_mnist
from edgeslim.core.errors import EdgeslimError, LoweringError
from edgeslim.core.kd import KD
from edgeslim.core.train import TrainConfig, evaluate, fit
from edgeslim.nas.api import finetune_subnet, nas, resize_data, sample_indices
from edgeslim.nas.cost import measure_export
from edgeslim.nas.extract import extract, recalibrate_bn
from edgeslim.nas.supernet import SubnetConfig, SupernetSpec, resize
from edgeslim.nas.train import SandwichTraining
from edgeslim.profiling.devices import load_device
from edgeslim.search.predictor_eval import spearman

console = Console(width=200)
warnings.filterwarnings("ignore")
DEVICES = ("stm32f446", "stm32f746")
ZOO = ("mobilenetv2", "mobilenetv1", "shufflenetv2", "squeezenet", "resnet8")


def c_cost(model, calib, device: str, out: Path, arm: bool = False) -> dict:
    """SRAM / flash / latency of ``model`` exported to C for ``device`` (compiled, checked;
    ``arm``: also linked with arm-none-eabi-gcc and run on QEMU, flash and SRAM from there)."""
    from edgeslim.export.c import export_c

    done = export_c(model, out, device if arm else None, calib=calib, arm=None if arm else False)
    return measure_export(done, load_device(device))


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _save_json(path: Path, obj) -> None:
    from edgeslim.core.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _dense(name: str, data, args, out: Path):
    """The zoo net trained dense ``--zoo-epochs`` (weights and accuracy kept in ``out``)."""
    torch.manual_seed(0)
    model = es.zoo.create(name)
    weights, meta = out / f"{name}-dense.pt", out / f"{name}-dense.json"
    if weights.exists() and meta.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), _load_json(meta)
    t0 = time.monotonic()
    fit(model, data, TrainConfig(epochs=args.zoo_epochs, lr=2e-3, seed=0), progress=False)
    info = {"train_s": time.monotonic() - t0, "dense_acc": evaluate(model, data, "test"),
            "epochs": args.zoo_epochs}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    _save_json(meta, info)
    return model.eval(), info


@torch.no_grad()
def test_pred(model, data) -> str:
    """The class ``model`` predicts for each test image of ``data``, one digit per image (for
    the paired comparison: every row is scored on the same 2,000 test images)."""
    model.eval()
    x = data.test.x
    preds = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return "".join(str(int(v)) for v in preds)


def _stats(values: list[float]) -> dict:
    """Mean, sample standard deviation and range of per-seed accuracies."""
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n}


def _pruned(name: str, dev_name: str, data, args, out: Path, row: dict):
    """The zoo net for ``dev_name``: dense, pruned (when over the latency limit) until its
    exported graph fits; ``None`` (with ``row["note"]`` saying why) when it cannot be."""
    calib = data.calib(128)
    try:  # exportable at all? (checked untrained, before spending the training)
        c_cost(es.zoo.create(name).eval(), calib, dev_name, out / f"{name}-probe")
    except LoweringError as exc:
        row["note"] = "not exportable to C: " + str(exc).splitlines()[1].strip()[:70]
        return None, None
    dense, info = _dense(name, data, args, out)
    row.update(info)
    model, frac, note = copy.deepcopy(dense), 1.0, "as is"
    cost = c_cost(dense, calib, dev_name, out / f"{name}-{dev_name}-d")
    row["dense_latency_ms"] = cost["latency_ms"]
    for _ in range(5):  # prune until the exported graph meets the latency limit
        if cost["latency_ms"] <= args.latency_ms:
            break
        frac *= 0.97 * args.latency_ms / cost["latency_ms"]
        model = copy.deepcopy(dense)
        try:
            es.prune_(model, es.ChannelPrune(macs=frac), example=data.example())
        except EdgeslimError as exc:  # e.g. a graph the pruner cannot trace
            row["fits"] = False
            row["note"] = (
                f"exports to C (dense {cost['latency_ms']:.0f} ms), not prunable: "
                + str(exc).splitlines()[0][:90]
            )
            return None, None
        note = f"ChannelPrune(macs={frac:.3f})"
        cost = c_cost(model.eval(), calib, dev_name, out / f"{name}-{dev_name}-p")
    row["note"] = note
    return model, dense


def zoo_row(name: str, dev_name: str, data, args, out: Path, seed: int, pruned, cost=None):
    """One zoo net for one device and one fine-tuning seed: ``pruned`` (from :func:`_pruned`)
    fine-tuned ``--finetune-epochs`` distilled from the dense net (or ``--teacher``), Int8PTQ;
    ``cost`` None: exported to C for the device (ARM link + QEMU) and measured, else the
    cost of the same architecture exported with another seed's weights."""
    dev = load_device(dev_name)
    calib = data.calib(128)
    model, dense = copy.deepcopy(pruned[0]), pruned[1]
    row = {**pruned[2], "seed": seed}
    t0 = time.monotonic()
    kd = KD(alpha=args.kd_alpha)
    cfg = TrainConfig(epochs=args.finetune_epochs, lr=1e-3, seed=seed, distill=kd)
    teacher = dense if not args.teacher else _dense(args.teacher, data, args, out)[0]
    fit(model, data, cfg, teacher=teacher, progress=False)
    row["note"] += f" + {args.finetune_epochs} ep KD" + (
        f" from {args.teacher}" if args.teacher else ""
    )
    row["float_acc"] = evaluate(model.eval(), data, "test")
    q = es.quantize(model.eval(), es.Int8PTQ(calibration="mse"), calib=calib)
    if cost is None:
        cost = c_cost(q, calib, dev_name, out / f"{name}-{dev_name}", arm=True)
    else:
        cost = dict(cost)
        row["cost_from_seed"] = cost.pop("seed")
    fits = (
        cost["latency_ms"] <= args.latency_ms
        and cost["sram_kb"] * 1024 <= dev.sram_bytes
        and cost["flash_kb"] * 1024 <= dev.flash_bytes
    )
    row.update(cost)
    row.update({"acc": evaluate(q, data, "test"), "fits": fits,
                "compress_s": time.monotonic() - t0, "test_pred": test_pred(q, data)})  # fmt: skip
    return row


COST_KEYS = ("sram_kb", "flash_kb", "latency_ms")


def zoo_rows(data, args, out: Path) -> list[dict]:
    """The zoo's rows, one per net and device over ``--seeds``; each seed's row is persisted
    in ``out`` (a rerun skips those done; seed 0 keeps the file name of one-seed runs)."""
    rows = []
    for name in args.zoo.split(","):
        for dev_name in DEVICES:
            tail = f"-t{args.teacher}" if args.teacher and args.teacher != name else ""
            per_seed, pruned, cost = [], None, None
            for seed in args.seed_list:
                stem = f"{name}-{dev_name}{tail}" + (f"-s{seed}" if seed else "")
                path = out / f"{stem}.row.json"  # a net's own teacher: as before
                row = _load_json(path)
                if row is None:
                    if pruned is None:
                        info = {"device": dev_name, "net": name}
                        model, dense = _pruned(name, dev_name, data, args, out, info)
                        pruned = (model, dense, info)
                    if pruned[0] is None:  # not exportable or not prunable: one row
                        row = pruned[2]
                    else:
                        row = zoo_row(name, dev_name, data, args, out, seed, pruned, cost)
                    _save_json(path, row)
                if "acc" in row and cost is None:
                    cost = {k: row[k] for k in COST_KEYS} | {"seed": row.get("seed", 0)}
                per_seed.append(row)
                if "acc" not in row:
                    break
            rows.append(_merge_seeds(per_seed))
            console.print(rows[-1])
    return rows


def _merge_seeds(per_seed: list[dict]) -> dict:
    """One table row from a net's per-seed rows: the first seed's fields, ``acc`` and
    ``float_acc`` their means, with the per-seed values and their spread."""
    row = dict(per_seed[0])
    row.pop("test_pred", None)
    done = [r for r in per_seed if "acc" in r]
    if done:
        row["seeds"] = [r.get("seed", 0) for r in done]
        if all("test_pred" in r for r in done):
            row["test_pred_seeds"] = [r["test_pred"] for r in done]
        for key in ("acc", "float_acc"):
            values = [r[key] for r in done]
            row[key + "_seeds"] = values
            row[key] = sum(values) / len(values)
            row[key + "_stats"] = _stats(values)
    return row


def _mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar test: ``b`` images only the first net gets right, ``c`` only
    the second (binomial, p = 1/2)."""
    n, k = b + c, min(b, c)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _t_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom (its density
    integrated numerically, Simpson's rule)."""
    if math.isnan(t):
        return float("nan")
    x_max, n = min(abs(t), 1e4), 20_000
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = x_max / n
    ys = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    area = h / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))
    return max(0.0, 1 - 2 * area)


def paired(a: dict, b: dict, labels, digits: int = 1000) -> dict | None:
    """Row ``a`` minus row ``b`` (int8 test accuracy), paired by seed and by test image.

    Per seed: the difference and the exact McNemar test on that seed's 2,000 predictions.
    Over seeds: the mean difference, its sample sd and Student's t test (df = seeds - 1;
    the fine-tuning seed's spread). Over images: each image's correctness averaged over the
    seeds, the mean per-image difference, its standard error and a normal test (the
    test-set sampling, the seeds averaged); the same per digit (test image ``i`` is digit
    ``i % digits``: copies of one digit count once) and the combined test (seed and digit
    noise added). ``None`` when the rows share no seed with predictions."""
    pa = dict(zip(a.get("seeds", []), a.get("test_pred_seeds", []), strict=False))
    pb = dict(zip(b.get("seeds", []), b.get("test_pred_seeds", []), strict=False))
    common = [s for s in pa if s in pb]
    if not common:
        return None
    y = [str(int(v)) for v in labels]
    per_seed, per_image = [], [0.0] * len(y)
    for s in common:
        ra = [p == t for p, t in zip(pa[s], y, strict=True)]
        rb = [p == t for p, t in zip(pb[s], y, strict=True)]
        only_a = sum(u and not v for u, v in zip(ra, rb, strict=True))
        only_b = sum(v and not u for u, v in zip(ra, rb, strict=True))
        per_seed.append({"seed": s, "diff": (only_a - only_b) / len(y), "only_a": only_a,
                         "only_b": only_b, "mcnemar_p": _mcnemar_p(only_a, only_b)})  # fmt: skip
        for i, (u, v) in enumerate(zip(ra, rb, strict=True)):
            per_image[i] += (int(u) - int(v)) / len(common)
    diffs = [r["diff"] for r in per_seed]
    st = _stats(diffs)
    n = len(diffs)
    t = st["mean"] / (st["sd"] / n**0.5) if n > 1 and st["sd"] > 0 else float("nan")
    m = sum(per_image) / len(y)
    se = (sum((d - m) ** 2 for d in per_image) / (len(y) - 1) / len(y)) ** 0.5
    z = m / se if se > 0 else float("nan")
    digit = clustered_t(torch.tensor(per_image), torch.arange(len(y)) % digits)
    se_seed = st["sd"] / n**0.5 if n > 1 else 0.0
    both = combined(st["mean"], se_seed, digit["se"])
    return {
        "a": a["net"], "b": b["net"], "seeds": common, "per_seed": per_seed,
        "mean_diff": st["mean"], "sd_diff": st["sd"], "t": t,
        "t_p": _t_p(t, n - 1) if n > 1 else float("nan"),
        "image_mean_diff": m, "image_se": se,
        "image_p": math.erfc(abs(z) / 2**0.5) if se > 0 else float("nan"),
        "digit_mean_diff": digit["mean"], "digit_se": digit["se"], "digit_p": digit["p"],
        "combined_se": both["se"], "combined_p": both["p"],
    }  # fmt: skip


def searched_seeds(res, dev_dir: Path, data, teacher, args) -> list[dict]:
    """The searched winner's fine-tuning repeated with each of ``--seeds`` (seed 0 is the
    deployment ``es.nas`` did; the others: the same steps via :func:`finetune_subnet`,
    Int8PTQ on the same calibration images, int8 test accuracy; the C export's costs are
    the same architecture's, measured with seed 0)."""
    per_seed = []
    bn_idx, calib_idx = sample_indices(len(data.train))
    for seed in args.seed_list:
        if seed == 0:
            pred = test_pred(res.model, resize_data(data, res.config.resolution))
            per_seed.append({"seed": 0, "acc": res.accuracy, "float_acc": res.float_accuracy,
                             "test_pred": pred})  # fmt: skip
            continue
        path = dev_dir / f"seed{seed}.json"
        row = _load_json(path)
        if row is None:
            t0 = time.monotonic()
            sub = finetune_subnet(res.supernet, res.config, data, data.train.x[bn_idx],
                                  epochs=args.nas_finetune_epochs, alpha=args.kd_alpha,
                                  seed=seed, teacher=teacher, progress=False).eval()  # fmt: skip
            rdata = resize_data(data, res.config.resolution)
            calib = rdata.train.x[calib_idx]
            q = es.quantize(sub, es.Int8PTQ(calibration="mse"), calib=calib)
            row = {"seed": seed, "acc": evaluate(q, rdata, "test"),
                   "float_acc": evaluate(sub, rdata, "test"),
                   "train_s": time.monotonic() - t0,
                   "test_pred": test_pred(q, rdata)}  # fmt: skip
            _save_json(path, row)
        per_seed.append(row)
    return per_seed


def rank_correlation(result, data, args) -> dict:
    """Supernet estimate vs accuracy after fine-tuning, over >= 10 scored sub-networks."""
    scored = sorted(
        (r for r in result.trials if r["accuracy"] is not None), key=lambda r: r["accuracy"]
    )
    n = min(args.rank_n, len(scored))
    picks = [scored[round(i * (len(scored) - 1) / max(1, n - 1))] for i in range(n)]
    picks = list({r["key"]: r for r in picks}.values())
    est, tuned = [], []
    bn_x = data.train.x[:500]
    for r in picks:
        cfg = SubnetConfig.from_dict(r["candidate"])
        sub = recalibrate_bn(extract(result.supernet, cfg), resize(bn_x, cfg.resolution))
        rdata = resize_data(data, cfg.resolution)
        tc = TrainConfig(epochs=args.rank_epochs, lr=1e-3, seed=0, keep_best=False)
        fit(sub, rdata, tc, progress=False)
        est.append(r["accuracy"])
        tuned.append(evaluate(sub, rdata, "test"))
    return {"n": len(picks), "spearman": spearman(est, tuned), "estimated": est, "tuned": tuned}


def _se(acc) -> str:
    """One standard error of an accuracy on the 2,000 test images, in points."""
    return f"{100 * (acc * (1 - acc) / 2000) ** 0.5:.1f}" if isinstance(acc, float) else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--epochs", type=int, default=20,
                   help="supernet epochs (20: issue 17j; 10 before, 1-2 points lower after "
                        "fine-tuning)")  # fmt: skip
    p.add_argument("--zoo-epochs", type=int, default=8, help="zoo nets' dense training epochs")
    p.add_argument(
        "--finetune-epochs", type=int, default=8, help="zoo nets: epochs after pruning (KD)"
    )
    p.add_argument(
        "--nas-finetune-epochs",
        type=int,
        default=None,
        help="the searched winner's (default: 6; the supernet is trained once for every "
        "device and sub-network, the zoo nets --zoo-epochs + --finetune-epochs each)",
    )
    p.add_argument(
        "--kd-alpha",
        type=float,
        default=0.7,
        help="fine-tuning (zoo and searched): weight of the soft targets, 1 - alpha: labels",
    )
    p.add_argument(
        "--fused-stages",
        type=int,
        default=2,
        help="supernet stages made of fused blocks (k x k conv + 1x1 projection), from the first",
    )
    p.add_argument(
        "--stem-stride",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: the stem conv runs at the input's resolution and the first stage halves it "
        "(as SqueezeNet's stem; the stages see the same sizes as with 2); 2: the stem halves it",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="a zoo net (dense, --zoo-epochs) whose soft targets every fine-tuning uses, the "
        "searched winner's and every zoo net's (default: the largest sub-network / the net's "
        "own dense version)",
    )
    p.add_argument("--tune-finalists", type=int, default=3,
                   help="finalists that fit fine-tuned, the best on validation deployed (es.nas "
                        "tune_finalists; the best of each searched cell first)")  # fmt: skip
    p.add_argument("--space-samples", type=int, default=32, help="per width x resolution cell")
    p.add_argument("--space-top", type=int, default=3, help="cells searched by the evolution")
    p.add_argument("--rank-epochs", type=int, default=1)
    p.add_argument("--rank-n", type=int, default=10)
    p.add_argument("--latency-ms", type=float, default=250.0)
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--out", default="runs/bench-nas")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zoo", default=",".join(ZOO), help="zoo nets to compare (comma list)")
    p.add_argument("--parts", default="nas,zoo,rank",
                   help="what to run now (comma list of nas, zoo, rank): each part is kept in "
                        "--out, so a run can be split over several invocations")  # fmt: skip
    p.add_argument("--results", default=None, help="also write the table's JSON here")
    p.add_argument("--devices", default=",".join(DEVICES), help="devices searched (comma list)")
    p.add_argument("--test-copies", type=int, default=2,
                   help="test images per test digit, each its own clutter (2: the usual "
                        "2,000 test images; 10: 10,000, a finer paired comparison)")  # fmt: skip
    p.add_argument("--seeds", default="0",
                   help="fine-tuning seeds (comma list): the searched winner's and every zoo "
                        "row's last fine-tuning is repeated with each (the data order); "
                        "rows report the mean and the spread")  # fmt: skip
    args = p.parse_args(argv)
    args.seed_list = [int(v) for v in args.seeds.split(",")]
    if args.seed_list[0] != 0 or len(set(args.seed_list)) != len(args.seed_list):
        p.error("--seeds: distinct integers, starting with 0 (the deployment es.nas does)")
    parts = set(args.parts.split(","))
    if args.nas_finetune_epochs is None:
        args.nas_finetune_epochs = 6
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    data = cluttered_mnist(seed=0, test_copies=args.test_copies)
    stages = SupernetSpec().stages  # (channels, depth, stride): the library's layout
    if args.stem_stride == 1:  # the first stage downsamples instead of the stem
        stages = ((stages[0][0], stages[0][1], 2), *stages[1:])
    spec = SupernetSpec(resolutions=(20, 24, 28), fused_stages=args.fused_stages,
                        stem_stride=args.stem_stride, stages=stages)  # fmt: skip
    if args.quick:
        data = data.limit(256)
        spec = SupernetSpec(stem=8, stages=((8, 1, 3 - args.stem_stride), (16, 2, 2), (24, 2, 2)),
                            head=32, resolutions=(20, 28), stem_stride=args.stem_stride,
                            fused_stages=min(args.fused_stages, 3))  # fmt: skip
        args.epochs, args.zoo_epochs, args.finetune_epochs = 1, 1, 1
        args.nas_finetune_epochs = 1
        args.population, args.generations, args.rank_n = 4, 1, 3
        args.space_samples, args.space_top = 2, 2
    out = Path(args.out)
    results, rows = {}, []
    teacher = None
    if args.teacher and parts & {"nas", "rank"}:  # the dense zoo net, trained --zoo-epochs
        teacher = _dense(args.teacher, data, args, out / "zoo")[0]
        teacher.input_shape = tuple(data.train.x.shape[1:])
    if parts & {"nas", "rank"}:
        for dev_name in args.devices.split(","):
            t0 = time.monotonic()
            res = nas(
                data,
                dev_name,
                out=out / (dev_name + (f"-t{args.teacher}" if args.teacher else "")),
                spec=spec,
                max_latency_ms=args.latency_ms,
                training=SandwichTraining(epochs=args.epochs, seed=0),
                supernet_checkpoint=out / "supernet.pt",
                population=args.population,
                generations=args.generations,
                space_samples=args.space_samples,
                space_top=args.space_top,
                finetune_epochs=args.nas_finetune_epochs,
                finetune_alpha=args.kd_alpha,
                finetune_teacher=teacher,
                finalists=max(3, args.tune_finalists),
                tune_finalists=args.tune_finalists,
                workers=0,
                progress=False,
            )
            results[dev_name] = res
            console.print(res.summary())
            dev_dir = out / (dev_name + (f"-t{args.teacher}" if args.teacher else ""))
            seeds = searched_seeds(res, dev_dir, data, teacher, args)
            row = {"device": dev_name, "net": "searched (es.nas)", "acc": res.accuracy,
                   "float_acc": res.float_accuracy, "fits": True, "note": res.config.key(),
                   **res.measured, "wall_s": time.monotonic() - t0, "timings": res.timings,
                   "estimated_acc": res.estimated_accuracy, "cells": res.space.cells,
                   "selection": res.selection,
                   "evaluated": sum(r["accuracy"] is not None for r in res.trials)}  # fmt: skip
            slim = [{k: v for k, v in s.items() if k != "test_pred"} for s in seeds]
            rows.append(_merge_seeds([{**row, **s} for s in seeds]) | {"per_seed": slim})
    rank = _load_json(out / "rank.json")
    if "rank" in parts and rank is None:
        rank = rank_correlation(results["stm32f446"], data, args)
        _save_json(out / "rank.json", rank)
    if "zoo" in parts:
        rows += zoo_rows(data, args, out / "zoo")
    if rank is not None:
        console.print(rank)
    table = Table(title=f"NAS vs zoo, cluttered MNIST, budget: device SRAM/flash + "
                        f"{args.latency_ms:g} ms device-model latency")  # fmt: skip
    for col in ("device", "net", "int8 test acc (mean)", "sd", "per seed", "+-1 SE", "float acc",
                "SRAM KB", "flash KB", "latency ms", "fits", "how"):  # fmt: skip
        table.add_column(col)
    for r in sorted(rows, key=lambda r: r["device"]):

        def f(k, fmt=".1f", r=r):
            return format(r[k], fmt) if isinstance(r.get(k), int | float) else "-"

        stats = r.get("acc_stats", {})
        sd = f"{stats['sd']:.4f}" if stats else "-"
        each = " ".join(f"{v:.3f}" for v in r.get("acc_seeds", []))
        table.add_row(r["device"], r["net"], f("acc", ".4f"), sd, each, _se(r.get("acc")),
                      f("float_acc", ".4f"), f("sram_kb"), f("flash_kb"), f("latency_ms", ".2f"),
                      str(r.get("fits", "-")), str(r.get("note", "")))  # fmt: skip
    console.print(table)
    devices = {d: load_device(d).model_dump() for d in DEVICES}
    console.print("device profiles used:", devices)
    if results:
        t = {d: results[d].timings for d in results}
        console.print(
            f"supernet training {next(iter(t.values()))['supernet_train_s']:.0f} s (once, shared); "
            + ", ".join(
                f"{d}: space {t[d]['space_s']:.0f} s + evolution {t[d]['search_s']:.0f} s"
                for d in t
            )
        )
    console.print(f"this invocation: {time.monotonic() - started:.0f} s")
    comparisons = []
    for dev_name in DEVICES:  # the searched net vs the most accurate zoo net that fits
        mine = [r for r in rows if r["device"] == dev_name]
        ours = next((r for r in mine if r["net"].startswith("searched")), None)
        zoo = [r for r in mine if r is not ours and r.get("fits") and "acc" in r]
        if ours is None or not zoo:
            continue
        cmp = paired(ours, max(zoo, key=lambda r: r["acc"]), data.test.y.tolist(),
                     digits=len(data.test.y) // args.test_copies)  # fmt: skip
        if cmp is not None:
            comparisons.append({"device": dev_name, **cmp})
            each = ", ".join(f"{100 * r['diff']:+.2f}" for r in cmp["per_seed"])
            mcn = ", ".join(f"{r['mcnemar_p']:.3f}" for r in cmp["per_seed"])
            console.print(
                f"{dev_name}: searched - {cmp['b']}: {100 * cmp['mean_diff']:+.2f} points "
                f"(per seed {each}; paired t over seeds p={cmp['t_p']:.3f}; per image "
                f"{100 * cmp['image_mean_diff']:+.2f} +- {100 * cmp['image_se']:.2f}, "
                f"p={cmp['image_p']:.3f}; per digit se {100 * cmp['digit_se']:.2f}, "
                f"p={cmp['digit_p']:.3f}; combined se {100 * cmp['combined_se']:.2f}, "
                f"p={cmp['combined_p']:.3f}; McNemar per seed {mcn})"
            )
    summary = {"rows": rows, "rank": rank, "args": vars(args), "devices": devices,
               "paired": comparisons}  # fmt: skip
    _save_json(out / "bench.json", summary)
    if args.results and parts >= {"nas", "zoo"}:  # with the rank correlation when it was run
        _save_json(Path(args.results), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
