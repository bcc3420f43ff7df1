"""Dynamic inference and result reuse, measured: early exits, channel gating, frame cache,
one backbone for two tasks (issue 18).

    flock /tmp/edgeslim-cpu.lock python benchmarks/dynamic.py              # everything
    flock /tmp/edgeslim-cpu.lock python benchmarks/dynamic.py --part exits --seeds 0,1,2

Parts:

- ``exits``: BranchyNet exits on LeNet-5 (one exit after conv1, head: max-pool to 6x6 and one
  Linear; ``--after conv1,conv2 --hidden 128 --exit-epochs 15``: the older setting) for each
  seed, and on the zoo's
  MobileNetV2-style net (after blocks.0, .2, .4; seed 0): trained static, exits added and
  trained jointly (distillation from the final exit), thresholds calibrated on validation
  for at most 0.3 points below the higher of the static network's and the final exit's
  validation accuracy, with ``ExitCalibration(margin=1)`` (a Wilson bound on the answers the
  exits spoil; ``--against static --margin 0``: the previous rule). Test accuracy,
  average MACs per input (counted on the ops that ran), average batch-1 latency over the
  test images in PyTorch and in ONNX Runtime (the exported segments + runner) vs the static
  network in each runtime; the threshold sweep is plotted.
- ``gating``: FBS-style channel gating of MobileNetV2's inverted-residual blocks at density
  0.5, fine-tuned with distillation, vs static ``ChannelPrune`` to the same average MACs
  with the same fine-tuning; test accuracy, MACs and batch-1 latency in PyTorch.
- ``cache``: two workloads (``--cache-nets``): LeNet-5 trained on MNIST rendered in the
  synthetic video's style, on a 600-frame 28x28 synthetic test video; and ``SceneNet`` (a
  small CNN built here whose early convs cost 99.9% of its 25M MACs) on the same video
  rendered at 96x96 with 2x digits. The DeepCache-style cache at several matching
  thresholds (share of MACs reused, latency per frame, accuracy) vs recomputing every frame
  and vs running every 2nd / 3rd / 5th frame only. Latency: batch 1, one thread, cache and
  recompute interleaved in blocks of ``STREAM`` frames (each in its own CPU-cache state) and,
  for comparison, frame by frame; median over ``--repeats`` passes of the mean per frame.
- ``multitask``: digit and parity from one LeNet-5 trunk with two heads vs two LeNet-5s.

Latency: one thread, medians or means over single-sample calls as stated. Results go to
``benchmarks/results/dynamic.json`` and the plots to ``benchmarks/results/dynamic_*.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import edgeslim as es
from edgeslim.core.data.video import synthetic_video, video_splits
from edgeslim.core.errors import ConfigError
from edgeslim.dynamic import (
    ChannelGating,
    ExitCalibration,
    Exits,
    ExitTraining,
    Heads,
    add_exits_,
    add_heads,
    calibrate_exits,
    count_macs,
    exit_accuracies,
    gate_channels_,
    measure_exit_costs,
    skip_stats,
    stream_stats,
    task_accuracy,
    train_gates,
    train_heads,
)
from edgeslim.dynamic.cache import FrameCache
from edgeslim.dynamic.calibration import set_thresholds
from edgeslim.dynamic.exits import train_exits
from edgeslim.dynamic.plot import plot_tradeoffs, tradeoff
from edgeslim.export.exits import export_exits, load_runner
from edgeslim.export.exits_c import ExitsBuild, c_sources, export_exits_c
from edgeslim.export.exits_int8 import quantize_exits

console = Console(width=200)
RESULTS = Path(__file__).parent / "results"
TMP = Path(tempfile.mkdtemp(prefix="edgeslim-dynamic-"))
EXITS = {
    # one exit after conv1 whose head is max-pool to 6x6 + one Linear (hidden=0): its
    # weights are 29 KB, so the exit costs little beside conv1 in PyTorch eager (the older
    # setting, after conv1 and conv2 with 128 hidden units and 15 joint epochs, read 368 KB
    # and 410 KB of head weights per image); 30 joint epochs make exit 0 surer of itself
    "lenet5": dict(after=["conv1"], epochs=8, exit_epochs=30, pool=6, hidden=0),
    # pool 7: 4x4 windows divide the 28x28 features (the C backend has no ceil-mode pool)
    "mobilenetv2": dict(
        after=["blocks.0", "blocks.2", "blocks.4"], epochs=8, exit_epochs=6, pool=7, hidden=128
    ),
}


STREAM = 50  # images per block in the streamed timing (paired_latency_ms block=)
_TRAINED: dict[tuple, dict] = {}


def trained(name: str, data, epochs: int, seed: int, **kwargs) -> torch.nn.Module:
    """A zoo net trained on ``data`` (trained once per setting within a run)."""
    key = (name, data.name, epochs, seed, tuple(sorted(kwargs.items())))
    if key in _TRAINED:
        model = es.zoo.create(name, **kwargs)
        model.load_state_dict(_TRAINED[key])
        return model.eval()
    torch.manual_seed(seed)
    model = es.zoo.create(name, **kwargs)
    es.fit(model, data, es.TrainConfig(epochs=epochs, shift=2, seed=seed), progress=False)
    _TRAINED[key] = copy.deepcopy(model.state_dict())
    return model.eval()


def mean_latency_ms(fn, xs: torch.Tensor, warmup: int = 20) -> float:
    """Mean milliseconds of ``fn(x)`` over the single samples of ``xs`` (one thread)."""
    with torch.inference_mode():
        for i in range(warmup):
            fn(xs[i : i + 1])
        times = []
        for i in range(len(xs)):
            start = time.perf_counter()
            fn(xs[i : i + 1])
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.fmean(times)


def paired_latency_ms(
    fns: dict[str, object],
    xs: torch.Tensor,
    repeats: int = 5,
    warmup: int = 20,
    block: int = 1,
) -> dict[str, float]:
    """Mean milliseconds per single sample of each ``fns[k](x)``, measured interleaved.

    ``xs`` is taken in blocks of ``block`` samples; for every block every function runs on
    each of its samples, one function after the other, in an order that rotates from block
    to block, so load on a shared machine hits all of them alike; the mean over ``xs`` is
    taken per pass and the median over ``repeats`` passes reported (one thread).
    ``block=1``: the functions alternate sample by sample, so each one runs right after the
    others and finds the caches full of their weights; a larger block times each function
    on a stream of inputs, as it runs when deployed alone, in its own cache state.
    """
    names = list(fns)
    with torch.inference_mode():
        for i in range(warmup):
            for name in names:
                fns[name](xs[i : i + 1])
        means: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            total = dict.fromkeys(names, 0.0)
            for b, first in enumerate(range(0, len(xs), block)):
                rows = range(first, min(first + block, len(xs)))
                shift = b % len(names)
                for name in names[shift:] + names[:shift]:
                    fn = fns[name]
                    for i in rows:
                        x = xs[i : i + 1]
                        start = time.perf_counter()
                        fn(x)
                        total[name] += time.perf_counter() - start
            for name in names:
                means[name].append(1e3 * total[name] / len(xs))
    return {name: statistics.median(v) for name, v in means.items()}


def onednn_off_latency_ms(fns: dict[str, object], xs: torch.Tensor, **kw) -> dict[str, float]:
    """:func:`paired_latency_ms` with PyTorch's oneDNN (mkldnn) CPU kernels off for the
    whole pass (the flag is switched once, outside the timed calls)."""
    with torch.backends.mkldnn.flags(enabled=False):
        return paired_latency_ms(fns, xs, **kw)


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})


# --------------------------------------------------------------------------------------


def exits_part(
    name: str,
    seed: int,
    data,
    hidden: int | None = None,
    pool: int | None = None,
    against: str = "higher",
    max_loss: float = 0.003,
    latency_costs: bool = False,
    after: list[str] | None = None,
    exit_epochs: int | None = None,
    margin: float = 1.0,
) -> dict:
    """One net and seed; ``None`` options take the net's setting in ``EXITS``."""
    console.print(f"exits: {name} seed {seed}")
    spec = EXITS[name]
    hidden = spec["hidden"] if hidden is None else hidden
    after = after or spec["after"]
    exit_epochs = spec["exit_epochs"] if exit_epochs is None else exit_epochs
    static = trained(name, data, spec["epochs"], seed)
    static_acc = es.evaluate(static, data)
    static_val = es.evaluate(static, data, split="val")
    x = data.test.x
    static_macs = count_macs(static, x[:1])
    em = add_exits_(
        copy.deepcopy(static), Exits(after=after, pool=pool or spec["pool"], hidden=hidden)
    )
    train_exits(em, data, ExitTraining(epochs=exit_epochs, shift=2, seed=seed), progress=False)
    # "at most 0.3 points below the static network" (against="static": its validation
    # accuracy is the reference; "final": the jointly trained final exit's). "higher": below
    # both, the higher of the two: the exits may not spend the final exit's gain over the
    # static net on validation, a difference of two accuracies on 500 images (SE ~0.6
    # points) that need not carry over to new data; the loss against the final exit is
    # what the thresholds decide, paired per sample and bounded with ``margin``
    final_val = exit_accuracies(em, data.val.x, data.val.y)[-1]
    ref = {"static": static_val, "final": None, "higher": max(static_val, final_val)}[against]
    costs = None
    if latency_costs:  # minimise the expected PyTorch batch-1 time instead of the MACs
        torch.set_num_threads(1)
        costs = measure_exit_costs(em, data.val.x)
        torch.set_num_threads(2)
    try:
        cfg = ExitCalibration(max_loss=max_loss, reference_accuracy=ref, costs=costs, margin=margin)
        cal = calibrate_exits(em, data, cfg)
    except ConfigError as exc:  # the static net's accuracy is out of the exits' reach
        console.print(f"[yellow]{exc}: calibrating against the final exit instead")
        against = "final (static out of reach)"
        cfg = ExitCalibration(max_loss=max_loss, costs=costs, margin=margin)
        cal = calibrate_exits(em, data, cfg)
    em.eval()
    acc = es.evaluate(em, data)
    with torch.no_grad():
        em(x)
    shares = (torch.bincount(em.last_exit, minlength=em.num_exits).double() / len(x)).tolist()
    avg_macs = count_macs(em, x) / len(x)
    final_acc = exit_accuracies(em, x, data.test.y)[-1]
    out = TMP / f"{name}-{seed}"
    es.export_onnx(static, out / "static.onnx", x[:32])
    export_exits(em, out / "exits", x[:64])
    runner = load_runner(out / "exits")
    files = load_runner(out / "exits")
    files.single = None  # one session call per stage, as the earlier runner
    torch.set_num_threads(1)
    # static and exits interleaved sample by sample; then a second pair with oneDNN off for
    # both (some small convs run faster on PyTorch's own kernels), so each net also has its
    # best configuration
    torch_ms = paired_latency_ms({"static": static, "exits": em}, x)
    off = onednn_off_latency_ms({"static": static, "exits": em}, x)
    torch_ms |= {"static_no_onednn": off["static"], "exits_no_onednn": off["exits"]}
    ort_fns = {
        "static": ort_session(out / "static.onnx"),
        "exits": lambda t: runner.run(t.numpy()),  # exits-b1.onnx (If)
        "files": lambda t: files.run(t.numpy()),  # one file per exit
    }
    ort_ms = paired_latency_ms(ort_fns, x)
    # the same pairs on streams: blocks of STREAM images per net, the order rotating from
    # block to block (each net in its own cache state, as when it runs alone)
    stream_torch = paired_latency_ms({"static": static, "exits": em}, x, block=STREAM)
    stream_ort = paired_latency_ms(
        {"static": ort_fns["static"], "exits": ort_fns["exits"]}, x, block=STREAM
    )
    c = c_exits(em, data, out / "c", seed)
    torch.set_num_threads(2)
    return {
        "net": name,
        "seed": seed,
        "static_accuracy": static_acc,
        "final_exit_accuracy": final_acc,
        "accuracy": acc,
        "static_macs": static_macs,
        "avg_macs": avg_macs,
        "exit_shares": shares,
        "thresholds": cal["thresholds"],
        "val": {
            **{k: cal[k] for k in ("accuracy", "macs", "static_accuracy", "target")},
            "accuracy_bound": cal["accuracy_bound"],
            "shares": cal["shares"],
            "size": len(data.val),
            "static_net_accuracy": static_val,
        },
        "calibration": {
            "max_loss": max_loss,
            "against": against,
            "margin": margin,
            "margin_points": 100 * cal["margin"],
            "costs_us": None if costs is None else costs.model_dump(),
        },
        "after": after,
        "exit_epochs": exit_epochs,
        "hidden": hidden,
        "pool": pool or spec["pool"],
        "latency_ms": {
            "torch_static": torch_ms["static"],
            "torch_exits": torch_ms["exits"],
            "torch_static_no_onednn": torch_ms["static_no_onednn"],
            "torch_exits_no_onednn": torch_ms["exits_no_onednn"],
            "ort_static": ort_ms["static"],
            "ort_exits": ort_ms["exits"],
            "ort_exits_one_file_per_exit": ort_ms["files"],
        },
        "stream_block": STREAM,
        "stream_latency_ms": {
            "torch_static": stream_torch["static"],
            "torch_exits": stream_torch["exits"],
            "ort_static": stream_ort["static"],
            "ort_exits": stream_ort["exits"],
        },
        "c": c,
        "tradeoff": tradeoff(
            cal["curve"],
            {"macs": static_macs, "accuracy": cal["static_accuracy"]},
            cal,
            x_label="average MACs per input (validation)",
        ),
    }


def c_exits(em, data, out: Path, seed: int) -> dict:
    """The exits in C: exported and checked bit-exact per exit (export_exits_c), int8 test
    accuracy and exits (reference interpreter), host latency (gcc -O2) vs the static net."""
    calib = data.calib(128, seed=seed)
    export = export_exits_c(em, out, calib=calib)
    x, y = data.test.x, data.test.y
    q = export.int8
    logits, taken = q.run(x.numpy())
    with torch.no_grad():
        _, float_taken = em.infer(x)
    static = copy.deepcopy(em)
    set_thresholds(static, [None] * len(em.heads))
    q_static = quantize_exits(static, calib)
    static_logits, _ = q_static.run(x.numpy())
    inputs = q.quantize_input(x[:300].numpy())
    times = {}
    for key, model in (("static", q_static), ("exits", q)):
        files, _ = c_sources(model)
        with ExitsBuild(files, len(model.stages), model.classes, sanitize=False) as build:
            times[key] = statistics.median(build.time_us(inputs, repeats=5) for _ in range(3))
    y = y.numpy()
    return {
        "verified": export.verified,
        "int8_final_accuracy": float((static_logits.argmax(1) == y).mean()),
        "int8_exits_accuracy": float((logits.argmax(1) == y).mean()),
        "same_exit_as_float": float((taken == float_taken.numpy()).mean()),
        "exit_shares": (np.bincount(taken, minlength=em.num_exits) / len(taken)).tolist(),
        "us_static": times["static"],
        "us_exits": times["exits"],
        "arena_bytes": export.arena_bytes,
        "feature_bytes": export.feature_bytes,
        "weight_bytes": export.weight_bytes,
    }


def exits_table(rows: list[dict]) -> Table:
    t = Table(title="early exits (test split; latency: mean over the 1,000 test images, batch 1)")
    for col in (
        "net",
        "seed",
        "static acc",
        "exits acc",
        "Δ pts",
        "avg MACs",
        "fewer",
        "torch ms static/exits",
        "speedup",
        "no oneDNN ms",
        "speedup",
        "best vs best",
        "ORT ms static/exits",
        "speedup",
        "stream: torch ms",
        "speedup",
        "stream: ORT ms",
        "speedup",
        "shares",
    ):
        t.add_column(col)
    for r in rows:
        lat = r["latency_ms"]
        no_static = lat.get("torch_static_no_onednn", math.nan)  # older rows: not measured
        no_exits = lat.get("torch_exits_no_onednn", math.nan)
        st, nan = r.get("stream_latency_ms", {}), math.nan  # older rows: not measured
        t.add_row(
            r["net"],
            str(r["seed"]),
            f"{100 * r['static_accuracy']:.1f}",
            f"{100 * r['accuracy']:.1f}",
            f"{100 * (r['accuracy'] - r['static_accuracy']):+.1f}",
            f"{r['avg_macs'] / 1e6:.2f}M / {r['static_macs'] / 1e6:.2f}M",
            f"{r['static_macs'] / r['avg_macs']:.2f}x",
            f"{lat['torch_static']:.3f} / {lat['torch_exits']:.3f}",
            f"{lat['torch_static'] / lat['torch_exits']:.2f}x",
            f"{no_static:.3f} / {no_exits:.3f}",
            f"{no_static / no_exits:.2f}x",
            f"{min(lat['torch_static'], no_static) / min(lat['torch_exits'], no_exits):.2f}x",
            f"{lat['ort_static']:.3f} / {lat['ort_exits']:.3f}",
            f"{lat['ort_static'] / lat['ort_exits']:.2f}x",
            f"{st.get('torch_static', nan):.3f} / {st.get('torch_exits', nan):.3f}",
            f"{st.get('torch_static', nan) / st.get('torch_exits', nan):.2f}x",
            f"{st.get('ort_static', nan):.3f} / {st.get('ort_exits', nan):.3f}",
            f"{st.get('ort_static', nan) / st.get('ort_exits', nan):.2f}x",
            " ".join(f"{s:.2f}" for s in r["exit_shares"]),
        )
    return t


def c_table(rows: list[dict]) -> Table:
    t = Table(title="early exits in C (int8, host gcc -O2; mean µs per test image, 300 images)")
    for col in (
        "net",
        "seed",
        "int8 final-exit acc",
        "int8 exits acc",
        "same exit as float",
        "µs static / exits",
        "speedup",
        "shares",
        "constants B",
        "checked",
    ):
        t.add_column(col)
    for r in rows:
        c = r["c"]
        t.add_row(
            r["net"],
            str(r["seed"]),
            f"{100 * c['int8_final_accuracy']:.1f}",
            f"{100 * c['int8_exits_accuracy']:.1f}",
            f"{100 * c['same_exit_as_float']:.1f}%",
            f"{c['us_static']:.1f} / {c['us_exits']:.1f}",
            f"{c['us_static'] / c['us_exits']:.2f}x",
            " ".join(f"{s:.2f}" for s in c["exit_shares"]),
            f"{c['weight_bytes']:,}",
            "bit-exact" if any("bit-exact" in v for v in c["verified"]) else "not compiled",
        )
    return t


# --------------------------------------------------------------------------------------


def _wide_blocks(model, hidden: int = 96) -> list[str]:
    """The inverted-residual blocks with at least ``hidden`` hidden channels."""
    from edgeslim.dynamic.gating import _is_inverted_residual

    return [
        n
        for n, m in model.named_modules()
        if n and _is_inverted_residual(m) and m.block[-2][0].in_channels >= hidden
    ]


def _gated_vs_pruned(
    static, data, density: float, ft, static_macs: float, seed: int, anneal=0.0, wide=False
):
    x = data.test.x
    gated = copy.deepcopy(static)
    layers = _wide_blocks(gated) if wide else None
    cfg = ChannelGating(density=density, layers=layers)
    gate_channels_(gated, cfg, calib=data.calib(256, seed=seed))
    start = time.perf_counter()
    train_gates(gated, data, ft, teacher=static, progress=False, anneal=anneal)
    gated.eval()
    label = f"density {density}" + (f", anneal {anneal}" if anneal else "")
    label += f", {ft.epochs} epochs" + (", wide blocks only" if wide else "")
    g_macs = count_macs(gated, x[:200]) / 200
    pruned = copy.deepcopy(static)
    es.prune_(pruned, es.ChannelPrune(macs=g_macs / static_macs), example=x[:1])
    es.finetune(pruned, data, ft, teacher=static, progress=False)
    pruned.eval()
    torch.set_num_threads(1)
    rows = [
        {
            "method": f"FBS gating, {label}",
            "accuracy": es.evaluate(gated, data),
            "macs": g_macs,
            "latency_ms": mean_latency_ms(gated, x[:300]),
            "train_seconds": time.perf_counter() - start,
        },
        {
            "method": f"ChannelPrune, same MACs as {label}",
            "accuracy": es.evaluate(pruned, data),
            "macs": count_macs(pruned, x[:1]),
            "latency_ms": mean_latency_ms(pruned, x[:300]),
        },
    ]
    torch.set_num_threads(2)
    return rows


def gating_part(
    data, seed: int = 0, epochs: int = 5, densities=(0.5, 0.75), anneal=0.0, wide=False
) -> list[dict]:
    spec = EXITS["mobilenetv2"]
    static = trained("mobilenetv2", data, spec["epochs"], seed)
    x = data.test.x
    rows = []
    torch.set_num_threads(1)
    base = {
        "method": "static",
        "accuracy": es.evaluate(static, data),
        "macs": count_macs(static, x[:1]),
        "latency_ms": mean_latency_ms(static, x[:300]),
    }
    torch.set_num_threads(2)
    rows.append(base)
    ft = es.TrainConfig(epochs=epochs, lr=1e-3, shift=2, seed=seed, distill=es.KD(alpha=0.5))
    for density in densities:
        rows += _gated_vs_pruned(static, data, density, ft, base["macs"], seed, anneal, wide)
    return rows


# --------------------------------------------------------------------------------------


class SceneNet(torch.nn.Module):
    """A small CNN for 96x96 camera frames whose early convolutions cost the most, as in
    DeepCache's mobile CNNs (24.9M MACs, all but 640 in the three convs; 24.2k params):
    conv 16@5x5 - ReLU - maxpool 2 - conv 32@3x3 - ReLU - maxpool 2 - conv 64@3x3 - ReLU -
    maxpool 2 - global max pool - fc 10. Built here, not in the zoo."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.amax(self.features(x), dim=(2, 3)))


# the cache's workloads: LeNet-5 on the 28x28 video; SceneNet on the video rendered at
# 96x96 with digits enlarged 2x (56 px, drifting up to 20 px from the centre: about a third
# of the frame moves) or at their size (28 px, up to 34 px from the centre: a small object
# moving over a static scene, as a fixed camera sees it)
CACHE_WORKLOADS = {
    "lenet5": dict(size=28, scale=1, epochs=8),
    "scenenet96x2": dict(size=96, scale=2, epochs=6),
    "scenenet96x1": dict(size=96, scale=1, epochs=6),
}
WEIGHTS = Path(__file__).resolve().parent / ".cache"


def cache_model(name: str, vdata, seed: int) -> torch.nn.Module:
    """The workload's classifier, trained on ``vdata`` (SceneNet's weights are cached in
    ``benchmarks/.cache/``: delete to retrain)."""
    epochs = CACHE_WORKLOADS[name]["epochs"]
    if name == "lenet5":
        return trained("lenet5", vdata, epochs, seed)
    path = WEIGHTS / f"dynamic_{name}_seed{seed}_e{epochs}.pt"
    torch.manual_seed(seed)
    model = SceneNet(vdata.num_classes)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        es.fit(model, vdata, es.TrainConfig(epochs=epochs, shift=2, seed=seed), progress=False)
        WEIGHTS.mkdir(exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def cache_part(workloads: list[str], seed: int = 0, n_frames: int = 600, repeats: int = 5) -> dict:
    mnist = es.load_data("mnist")
    out = {}
    for name in workloads:
        w = CACHE_WORKLOADS[name]
        size, scale = w["size"], w["scale"]
        vdata = video_splits(mnist, seed=seed, size=size, scale=scale)
        model = cache_model(name, vdata, seed)
        image_accuracy = es.evaluate(model, vdata)
        del vdata
        video = synthetic_video(mnist.test, n_frames, seed=seed, size=size, scale=scale)
        torch.set_num_threads(1)
        rows = []
        for t in (0.0, 0.02, 0.03, 0.05, 0.1):
            # timed in blocks of STREAM frames (each as deployed alone, in its own CPU cache
            # state), and frame by frame (each right after the other) for comparison
            cfg = FrameCache(threshold=t)
            row = stream_stats(model, video, cfg, timing=True, repeats=repeats, block=STREAM)
            by_frame = stream_stats(model, video, cfg, timing=True, repeats=repeats, block=1)
            row["block"] = STREAM
            row["frame_by_frame"] = {k: v for k, v in by_frame.items() if "latency" in k}
            rows.append({"threshold": t, **row})
        skips = [skip_stats(model, video, k) for k in (2, 3, 5)]
        torch.set_num_threads(2)
        # frame skipping's time per frame: one frame in k recomputed, the others free
        static_ms = statistics.median(r["static_latency_ms"] for r in rows)
        for r in skips:
            r["latency_ms"] = static_ms * math.ceil(n_frames / r["every"]) / n_frames
        out[name] = {
            "frames": n_frames,
            "frame_size": size,
            "digit_scale": scale,
            "image_accuracy": image_accuracy,
            "cache": rows,
            "skip": skips,
        }
    return out


def cache_table(name: str, c: dict) -> Table:
    t = Table(title=f"frame cache on {c['frames']} synthetic frames ({name})")
    cols = (
        "method",
        "acc %",
        "agree %",
        "MACs/frame",
        "reused",
        "ms/frame",
        "p50 ms",
        "vs recompute",
        "frame by frame",
    )
    for col in cols:
        t.add_column(col)
    s0 = c["cache"][0]
    t.add_row(
        "recompute every frame",
        f"{100 * s0['static_accuracy']:.1f}",
        "100",
        f"{s0['static_macs'] / 1e6:.2f}M",
        "0",
        f"{s0['static_latency_ms']:.3f}",
        f"{s0['static_latency_p50_ms']:.3f}",
        "",
        "",
    )
    for r in c["cache"]:
        t.add_row(
            f"cache, threshold {r['threshold']}",
            f"{100 * r['accuracy']:.1f}",
            f"{100 * r['agreement']:.1f}",
            f"{r['macs'] / 1e6:.2f}M",
            f"{100 * r['reused_macs_share']:.0f}%",
            f"{r['latency_ms']:.3f}",
            f"{r['latency_p50_ms']:.3f}",
            f"{r['latency_ms'] / r['static_latency_ms']:.2f}x",
            f"{f['latency_ms'] / f['static_latency_ms']:.2f}x"
            if (f := r.get("frame_by_frame"))
            else "",
        )
    for r in c["skip"]:
        t.add_row(
            f"run every {r['every']} frames",
            f"{100 * r['accuracy']:.1f}",
            "",
            f"{r['macs'] / 1e6:.2f}M",
            "",
            f"{r['latency_ms']:.3f}",
            "",
            "",
            "",
        )
    return t


# --------------------------------------------------------------------------------------


def multitask_part(data, seed: int, epochs: int = 8) -> dict:
    x = data.test.x
    digit = trained("lenet5", data, epochs, seed)
    from edgeslim.core.data.datasets import DataSplits, Split

    parity_data = DataSplits(
        "mnist-parity", *(Split(s.x, s.y % 2) for s in (data.train, data.val, data.test)), 2
    )
    parity = trained("lenet5", parity_data, epochs, seed, num_classes=2)
    torch.manual_seed(seed)
    mh = add_heads(
        es.zoo.create("lenet5"), Heads(after="fc1", tasks={"digit": "label", "parity": "parity"})
    )
    train_heads(mh, data, es.TrainConfig(epochs=epochs, shift=2, seed=seed), progress=False)
    acc = task_accuracy(mh, x, data.test.y)
    torch.set_num_threads(1)
    two_lat = mean_latency_ms(lambda t: (digit(t), parity(t)), x[:300])
    mh_lat = mean_latency_ms(mh.forward_all, x[:300])
    torch.set_num_threads(2)
    from edgeslim.export.multitask import export_heads

    diffs = export_heads(mh.eval(), TMP / f"mt-{seed}.onnx", x[:16])
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "seed": seed,
        "two_nets": {
            "digit": es.evaluate(digit, data),
            "parity": es.evaluate(parity, parity_data),
            "macs": count_macs(digit, x[:1]) + count_macs(parity, x[:1]),
            "params": params(digit) + params(parity),
            "latency_ms": two_lat,
        },
        "shared": {
            **acc,
            "macs": count_macs(mh.forward_all, x[:1]),
            "params": params(mh),
            "latency_ms": mh_lat,
            "onnx_max_diff": max(diffs.values()),
        },
    }


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["all", "exits", "gating", "cache", "multitask"], default="all"
    )
    parser.add_argument("--seeds", default="0,1,2", help="LeNet-5 seeds (exits, multitask)")
    parser.add_argument(
        "--nets", default="lenet5,mobilenetv2", help="exits: which nets (each for every seed)"
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="exits: hidden units per head (default per net)"
    )
    parser.add_argument(
        "--after", default=None, help="exits, LeNet-5: modules to exit after (default conv1)"
    )
    parser.add_argument(
        "--exit-epochs", type=int, default=None, help="exits: joint epochs (default per net)"
    )
    parser.add_argument("--pool", type=int, default=None, help="exits: head pool (default per net)")
    parser.add_argument(
        "--against",
        choices=["static", "final", "higher"],
        default="higher",
        help="exits: max_loss below the static net's validation accuracy, the final exit's, "
        "or the higher of the two",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=1.0,
        help="exits: ExitCalibration.margin (Wilson bound on the answers the exits spoil)",
    )
    parser.add_argument("--max-loss", type=float, default=0.003, help="exits: calibration")
    parser.add_argument(
        "--latency-costs",
        action="store_true",
        help="exits: calibrate for the measured PyTorch stage times instead of MACs",
    )
    parser.add_argument("--densities", default="0.5,0.75", help="gating: densities")
    parser.add_argument("--gate-epochs", type=int, default=5, help="gating: fine-tuning epochs")
    parser.add_argument("--anneal", type=float, default=0.0, help="gating: density schedule")
    parser.add_argument("--wide", action="store_true", help="gating: only the wide blocks")
    parser.add_argument("--cache-nets", default=",".join(CACHE_WORKLOADS), help="cache: workloads")
    parser.add_argument("--frames", type=int, default=600, help="cache: frames of the video")
    parser.add_argument("--repeats", type=int, default=5, help="cache: timing passes")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(2)
    data = es.load_data("mnist")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "dynamic.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    start = time.perf_counter()
    if args.part in ("all", "exits"):
        nets = args.nets.split(",")
        exit_args = (args.hidden, args.pool, args.against, args.max_loss, args.latency_costs)
        lenet_after = args.after.split(",") if args.after else None
        rows = [
            exits_part("lenet5", s, data, *exit_args, lenet_after, args.exit_epochs, args.margin)
            for s in (seeds if "lenet5" in nets else [])
        ]
        rows += [
            exits_part("mobilenetv2", s, data, *exit_args, None, args.exit_epochs, args.margin)
            for s in (seeds if "mobilenetv2" in nets else [])
        ]
        rerun = {(r["net"], r["seed"]) for r in rows}  # other rows are kept
        kept = [r for r in results.get("exits", []) if (r["net"], r["seed"]) not in rerun]
        results["exits"] = rows = kept + rows
        console.print(exits_table(rows))
        console.print(c_table([r for r in rows if "c" in r]))
        curves = {f"{r['net']} seed {r['seed']}": r["tradeoff"] for r in rows}
        for net in ("lenet5", "mobilenetv2"):
            plot_tradeoffs(
                {k: v for k, v in curves.items() if k.startswith(net)},
                RESULTS / f"dynamic_exits_{net}.png",
                f"early exits, {net}",
            )
        console.print(f"[{time.perf_counter() - start:.0f} s]")
    if args.part in ("all", "gating"):
        new = gating_part(
            data,
            epochs=args.gate_epochs,
            densities=[float(d) for d in args.densities.split(",")],
            anneal=args.anneal,
            wide=args.wide,
        )
        names = {r["method"] for r in new}
        results["gating"] = [r for r in results.get("gating", []) if r["method"] not in names]
        results["gating"] += new
        t = Table(title="channel gating vs static channel pruning, MobileNetV2 (test split)")
        for col in ("method", "test acc %", "MACs (avg)", "torch ms (batch 1, mean)"):
            t.add_column(col)
        for r in results["gating"]:
            t.add_row(
                r["method"],
                f"{100 * r['accuracy']:.1f}",
                f"{r['macs'] / 1e6:.2f}M",
                f"{r['latency_ms']:.3f}",
            )
        console.print(t)
        console.print(f"[{time.perf_counter() - start:.0f} s]")
    if args.part in ("all", "cache"):
        import subprocess

        names = args.cache_nets.split(",")
        new = cache_part(names, n_frames=args.frames, repeats=args.repeats)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        old = results.get("cache", {})
        if "workloads" not in old and old:  # the first layout (LeNet-5 only, older code)
            results["cache_older"] = old
            old = {}
        workloads = {**old.get("workloads", {}), **new}
        for name in new:
            workloads[name]["commit"] = commit
            workloads[name]["seconds"] = time.perf_counter() - start
        results["cache"] = {"workloads": workloads}
        curves = {}
        for name, c in workloads.items():
            console.print(cache_table(name, c))
            s0 = c["cache"][0]
            static = {"macs": s0["static_macs"], "accuracy": s0["static_accuracy"]}
            curves[f"{name}: frame cache"] = tradeoff(
                c["cache"], static, x_label="average MACs per frame (share of static)"
            )
            curves[f"{name}: frame skipping"] = tradeoff(c["skip"], static)
        plot_tradeoffs(curves, RESULTS / "dynamic_cache.png", "frame cache vs skipping")
        console.print(f"[{time.perf_counter() - start:.0f} s]")
    if args.part in ("all", "multitask"):
        results["multitask"] = rows = [multitask_part(data, s) for s in seeds]
        t = Table(title="digit + parity: two LeNet-5s vs one trunk with two heads (test)")
        for col in (
            "seed",
            "setup",
            "digit acc %",
            "parity acc %",
            "MACs",
            "params",
            "ms (batch 1)",
        ):
            t.add_column(col)
        for r in rows:
            for key, label in (("two_nets", "two networks"), ("shared", "shared trunk")):
                v = r[key]
                t.add_row(
                    str(r["seed"]),
                    label,
                    f"{100 * v['digit']:.1f}",
                    f"{100 * v['parity']:.1f}",
                    f"{v['macs'] / 1e6:.2f}M",
                    f"{v['params']:,}",
                    f"{v['latency_ms']:.3f}",
                )
        console.print(t)
    results["seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(results, indent=1, default=float))
    console.print(f"wrote {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
