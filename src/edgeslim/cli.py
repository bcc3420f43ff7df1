"""The ``edgeslim`` command: parse arguments, call the Python API, print with rich.

Heavy imports (torch and everything built on it) happen inside the command functions, so
``edgeslim --help`` stays fast and does not import torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeslim.core.errors import EdgeslimError

DEMO_RECIPES = ("deep_compression_lenet300", "deep_compression_lenet5")
DATA_HELP = (
    "dataset: mnist, npz:PATH, folder:DIR, py:module:factory, or a recipe YAML (its data block)"
)
DEVICE_HELP = "torch device to run on: cpu (default), cuda, cuda:1, mps ..."


def recipe_path(name: str) -> Path:
    """Path of a recipe shipped with edgeslim (``recipes/NAME.yaml``)."""
    from importlib.resources import files

    return Path(str(files("edgeslim") / "recipes" / f"{name}.yaml"))


def _print_table(run_dir: Path, title: str) -> None:
    from rich.console import Console

    from edgeslim.report import read_metrics, stage_table

    Console().print(stage_table(read_metrics(run_dir), title=title))


def cmd_demo(args: argparse.Namespace) -> None:
    from edgeslim.pipeline.runner import run_recipe

    out = Path(args.out)
    for name in DEMO_RECIPES:
        net = name.rsplit("_", 1)[1]
        result = run_recipe(recipe_path(name), out / net, restart=args.restart, device=args.device)
        _print_table(result.out, f"{name}  ->  {result.out}")
    print(f"run directories and reports under {out}/ (report.md in each)")


def cmd_compress(args: argparse.Namespace) -> None:
    from edgeslim.pipeline.runner import run_recipe

    result = run_recipe(args.recipe, args.out, restart=args.restart, device=args.device)
    _print_table(result.out, f"{args.recipe}  ->  {result.out}")
    print(f"report: {result.out / 'report.md'}")


def _example(model, shape: str | None, batch: int):
    import torch

    from edgeslim.core.models.io import example_input

    if shape:
        try:
            dims = tuple(int(s) for s in shape.split(","))
        except ValueError:
            raise EdgeslimError(f"--input-shape must look like 1,28,28, got {shape!r}") from None
        return torch.zeros(batch, *dims)
    return example_input(model, batch)


def _device(args: argparse.Namespace):
    """The ``--device`` of a command, checked (a ConfigError names a device this machine lacks)."""
    from edgeslim.core.device_check import check_device

    return check_device(args.device or "cpu", "--device")


def cmd_profile(args: argparse.Namespace) -> None:
    from rich.console import Console

    from edgeslim.core.models.io import load_model
    from edgeslim.profiling import profile

    device = _device(args)
    model = load_model(args.model)
    model.eval()
    example = _example(model, args.input_shape, 1)
    prof = profile(model.to(device), example, latency=not args.no_latency)
    where = "" if device.type == "cpu" else f" on {device}"
    Console().print(prof.table(title=f"profile of {args.model}{where}"))


def _load_data_arg(text: str):
    """``--data``: a data source (mnist, npz:, folder:, py:), or a recipe YAML whose ``data``
    block (source, image options, metric ...) is used."""
    if text.endswith((".yaml", ".yml")):
        from edgeslim.pipeline.recipe import Recipe
        from edgeslim.pipeline.runner import load_recipe_data

        cfg = Recipe.from_yaml(text).data
        if cfg.is_text:
            raise EdgeslimError(f"--data {text}: a text source needs its model; use compress")
        return load_recipe_data(cfg.model_copy(update={"max_train": None}))
    from edgeslim.core.data.datasets import load_data

    return load_data(text)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from edgeslim.core.data.transforms import apply_transform
    from edgeslim.core.metrics import format_value, get_metric
    from edgeslim.core.models.io import load_model
    from edgeslim.core.train import evaluate

    model = load_model(args.model).to(_device(args))
    data = apply_transform(_load_data_arg(args.data), args.transform)
    metric = get_metric(args.metric or data.metric)
    reference = load_model(args.reference).to(_device(args)) if args.reference else None
    value = evaluate(model, data, args.split, metric=metric, reference=reference)
    shown = format_value(metric.name, value)
    print(f"{args.split} {metric.title} of {args.model} on {args.data}: {shown}")


def cmd_report(args: argparse.Namespace) -> None:
    from edgeslim.report import render_report

    path = render_report(Path(args.dir))
    _print_table(Path(args.dir), str(args.dir))
    print(f"report: {path}")


def _index_bits(text: str):
    """``auto``, ``5`` or ``conv=8,linear=5`` (values ``auto`` or a number)."""
    if "=" not in text:
        return text if text == "auto" else int(text)
    out: dict[str, object] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip() if value.strip() == "auto" else int(value)
    return out


def cmd_pack(args: argparse.Namespace) -> None:
    from rich.console import Console

    from edgeslim.codec.packer import PackConfig, pack
    from edgeslim.codec.summary import pack_tables
    from edgeslim.core.models.io import load_model
    from edgeslim.core.options import validate

    try:
        bits = _index_bits(args.index_bits)
    except ValueError:
        raise EdgeslimError(
            f"--index-bits must be auto, N or conv=8,linear=5; got {args.index_bits!r}"
        ) from None
    cfg = validate(PackConfig, {"index_bits": bits, "architecture": args.architecture}, "pack")
    model = load_model(args.model)
    model.eval()
    example = _example(model, args.input_shape, 2) if args.input_shape else None
    report = pack(model, args.out, cfg, example=example)
    for table in pack_tables(report):
        Console().print(table)
    print(f"wrote {args.out} ({report.size_bytes:,} bytes, {report.architecture} architecture)")


def cmd_unpack(args: argparse.Namespace) -> None:
    from rich.console import Console

    from edgeslim.codec.summary import contents_table
    from edgeslim.codec.unpacker import unpack
    from edgeslim.core.models.io import save_model

    model = unpack(args.file)  # decodes and checks every tensor
    Console().print(contents_table(args.file))
    if args.out:
        save_model(model, args.out)
        print(f"wrote {args.out}")


def _graph_export_inputs(args: argparse.Namespace):
    """The model (int8 PTQ first with ``--int8``) and example batch of ``export onnx|openvino``."""
    from edgeslim.core.models.io import load_model

    model = load_model(args.model)
    model.eval()
    example = _example(model, args.input_shape, args.batch)
    if args.int8:
        from edgeslim.quant import Int8PTQ, quantize

        data = _load_data_arg(args.data)
        cfg = Int8PTQ(calibration=args.calibration)
        model = quantize(model, cfg, calib=data.calib(min(args.calib_size, len(data.train))))
    return model, example


def _print_verified(res, runtime: str, short: str) -> None:
    from rich.console import Console

    console = Console()
    if res.tolerance is not None:
        what = f"max |{short} - torch|" if res.metric == "max_abs" else "relative L2 error"
        value = res.max_abs_diff if res.metric == "max_abs" else res.rel_l2_error
        console.print(f"verified in {runtime}: {what} {value:.3g} <= {res.tolerance:.3g}")
    if res.integer_ops:
        ops = ", ".join(f"{op} x{n}" for op, n in res.integer_ops.items())
        console.print(f"{runtime} runs it with integer kernels: {ops}")


# format -> (module, function, what it writes, the runtime that checks it, its short name)
_GRAPH_EXPORTS = {
    "onnx": ("edgeslim.export.onnx", "export_onnx", "ONNX", "ONNX Runtime", "ort"),
    "openvino": (
        "edgeslim.export.openvino", "export_openvino", "OpenVINO IR", "OpenVINO Runtime",
        "openvino",
    ),
}  # fmt: skip


def cmd_export_graph(args: argparse.Namespace) -> None:
    """``edgeslim export onnx|openvino``: write the model (int8 with ``--int8``) and check it."""
    import importlib

    module, func, what, runtime, short = _GRAPH_EXPORTS[args.format]
    export = getattr(importlib.import_module(module), func)
    model, example = _graph_export_inputs(args)
    res = export(model, args.out, example, verify=not args.no_verify)
    kind = ("int8 QDQ" if short == "ort" else "int8") if res.quantized else "fp32"
    files = f"{res.path} + {res.bin_path}" if hasattr(res, "bin_path") else f"{res.path}"
    print(f"wrote {kind} {what} {files} ({res.size_bytes:,} bytes)")
    _print_verified(res, runtime, short)


def cmd_export_executorch(args: argparse.Namespace) -> None:
    from edgeslim.core.models.io import load_model
    from edgeslim.export.executorch import export_executorch

    model = load_model(args.model)
    model.eval()
    example = _example(model, args.input_shape, args.batch)
    res = export_executorch(model, args.out, example, verify=not args.no_verify)
    print(f"wrote fp32 ExecuTorch program {res.path} ({res.size_bytes:,} bytes, XNNPACK)")
    _print_verified(res, "ExecuTorch", "pte")


def _model_and_data(source: str, data_name: str | None, device: str | None = None):
    """A model and its data from a model source, or from a recipe (trained as it says), the
    model on ``device`` (a recipe's own ``device`` unless given; else the CPU)."""
    from edgeslim.core.data.datasets import load_data
    from edgeslim.core.device_check import check_device
    from edgeslim.core.models.io import load_model

    if source.endswith((".yaml", ".yml")):
        from edgeslim.pipeline.recipe import Recipe
        from edgeslim.pipeline.runner import recipe_inputs, train_baseline

        recipe = Recipe.from_yaml(source, device=device)
        if data_name is not None:
            recipe = recipe.model_copy(
                update={"data": recipe.data.model_copy(update={"source": data_name})}
            )
        model, data = recipe_inputs(recipe)
        model.to(recipe.device)
        return train_baseline(model, data, recipe), data
    model = load_model(source).to(check_device(device or "cpu", "--device"))
    return model, load_data(data_name or "mnist")


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from rich.console import Console

    from edgeslim.core.fileio import atomic_write_text
    from edgeslim.prune.sensitivity import sensitivity

    try:
        ratios = tuple(float(r) for r in args.ratios.split(","))
    except ValueError:
        raise EdgeslimError(f"--ratios must look like 0.25,0.5,0.75, got {args.ratios!r}") from None
    model, data = _model_and_data(args.model, args.data, args.device)
    sens = sensitivity(model, data, kind=args.kind, ratios=ratios, metric=args.metric)
    console = Console()
    console.print(sens.table(title=f"{args.kind} sensitivity of {args.model} ({args.metric})"))
    derived = None
    if args.max_drop is not None:
        derived = sens.ratios_for_drop(args.max_drop)
        console.print(f"per-layer ratios for at most {args.max_drop:.2%} drop each:")
    elif args.target is not None:
        derived = sens.ratios_for_sparsity(args.target)
        console.print(f"per-layer sparsities for {args.target:.0%} of all weights removed:")
    if derived is not None:
        for name, ratio in derived.items():
            console.print(f"  {name}: {ratio:.3f}")
    if args.plot:
        print(f"plot: {sens.plot(args.plot)}")
    if args.json:
        import json

        body = {**sens.to_dict(), "derived": derived}
        print(f"curves: {atomic_write_text(args.json, json.dumps(body, indent=1))}")


def cmd_fit(args: argparse.Namespace) -> None:
    from rich.console import Console

    from edgeslim.core.models.io import load_model
    from edgeslim.export.devicefit import calibration_inputs, fit_report

    model = load_model(args.model)
    calib = calibration_inputs(model, args.data, args.calib)
    Console().print(fit_report(model, calib, args.device, name=args.model).table())


def cmd_export(args: argparse.Namespace) -> None:
    from edgeslim.core.models.io import load_model
    from edgeslim.export.devicefit import calibration_inputs, export_file

    model = load_model(args.model)
    calib = calibration_inputs(model, args.data, args.calib)
    device, patch = getattr(args, "device", None), getattr(args, "patch", "auto")
    runtime, dtype = getattr(args, "runtime", "auto"), getattr(args, "dtype", "int8")
    summary = export_file(
        args.format,
        model,
        args.out,
        calib,
        device=device,
        patch=patch,
        runtime=runtime,
        dtype=dtype,
    )
    print(summary)


def cmd_optimize(args: argparse.Namespace) -> None:
    from edgeslim.core.data.datasets import load_data
    from edgeslim.core.models.io import load_model
    from edgeslim.core.train import fit
    from edgeslim.search import Budget, SearchSpace
    from edgeslim.search.engine import search

    model = load_model(args.model)
    data = load_data(args.data)
    if args.fit_epochs:
        fit(model, data, epochs=args.fit_epochs)
    budget = Budget.shared_with(args)  # --target, --max-latency-ms, --max-flash-kb ...
    space = SearchSpace(techniques=args.techniques, exclude=args.exclude or [])
    result = search(
        model,
        data,
        budget,
        space=space,
        trials=args.trials,
        batch=args.batch,
        seed=args.seed,
        sampler=args.sampler,
        proxy_steps=args.proxy_steps,
        finetune_top=args.finetune_top,
        finetune_epochs=args.finetune_epochs,
        workers=args.workers,
        ray=args.ray,
        out=args.out,
        max_time=args.max_time,
    )
    print(result.summary())
    print(f"report: {Path(result.out) / 'report.md'}")
    if not result.feasible:
        raise EdgeslimError(f"the budget cannot be met on {result.target} (see the report)")


def _floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(v) for v in text.split(","))


def _stages(text: str) -> tuple[tuple[int, int, int], ...]:
    try:
        return tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))  # type: ignore[misc]
    except ValueError as exc:
        raise EdgeslimError(f"--stages {text!r}: expected C:DEPTH:STRIDE,... ({exc})") from exc


def cmd_nas(args: argparse.Namespace) -> None:
    from edgeslim.core.data.datasets import load_data
    from edgeslim.nas.api import nas
    from edgeslim.nas.supernet import SupernetSpec
    from edgeslim.nas.train import SandwichTraining

    data = load_data(args.data)
    if args.limit_train:
        data = data.limit(args.limit_train)
    shape = data.input_shape
    fields: dict = {"in_channels": shape[0], "num_classes": int(data.num_classes or 10)}
    if args.stages:
        fields["stages"] = _stages(args.stages)
    for name in ("stem", "head"):
        if getattr(args, name):
            fields[name] = getattr(args, name)
    if args.fused_stages:
        fields["fused_stages"] = args.fused_stages
    if args.stem_stride:
        fields["stem_stride"] = args.stem_stride
    if args.widths:
        fields["widths"] = _floats(args.widths)
    if args.resolutions:
        fields["resolutions"] = tuple(int(v) for v in _floats(args.resolutions) or ())
    result = nas(
        data,
        args.device,
        out=args.out,
        spec=SupernetSpec(**fields),
        max_sram_kb=args.max_sram_kb,
        max_flash_kb=args.max_flash_kb,
        max_latency_ms=args.max_latency_ms,
        training=SandwichTraining(epochs=args.epochs, seed=args.seed),
        space_samples=args.space_samples,
        space_top=args.space_top,
        population=args.population,
        generations=args.generations,
        finalists=args.finalists,
        tune_finalists=args.tune_finalists,
        tie_tolerance=args.tie_tolerance,
        finetune_epochs=args.finetune_epochs,
        finetune_alpha=args.finetune_alpha,
        workers=args.workers,
        ray=args.ray,
        seed=args.seed,
        export=not args.no_export,
    )
    print(result.summary())
    if result.verified:
        print("checked: " + "; ".join(result.verified))
    print(f"report: {Path(result.out) / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeslim",
        description="Make trained PyTorch models small and fast for the edge, and measure it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", help="Deep Compression of LeNet-300-100 and LeNet-5 on MNIST: prune, share, code"
    )
    p.add_argument("--out", default="runs/demo", help="directory for the two runs")
    p.add_argument("--restart", action="store_true", help="discard finished stages")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compress", help="run (or resume) a YAML recipe")
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--restart", action="store_true", help="discard finished stages")
    p.add_argument("--device", help="torch device, overriding the recipe's device: (cpu, cuda ...)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("profile", help="params, MACs, memory, bytes and latency per layer")
    p.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
    p.add_argument("--input-shape", help="one example's shape, e.g. 1,28,28 (zoo models know)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--device", help=DEVICE_HELP + " (latency is measured there)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("evaluate", help="a model's metric (top-1 accuracy ...) on a dataset split")
    p.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
    p.add_argument("--data", default="mnist", help=DATA_HELP)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--transform", choices=("haar",), help="input transform the model expects")
    p.add_argument(
        "--metric",
        help="top1 (default: the data's), top5, mse, cosine, perplexity or py:module:function",
    )
    p.add_argument("--reference", help="model source that --metric cosine compares with")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("pack", help="write a model as a compressed .slim file")
    p.add_argument("model", help="model source: zoo:NAME, py:module:factory, FILE.pt2 or FILE.slim")
    p.add_argument("out", help="the .slim file to write")
    p.add_argument(
        "--index-bits",
        default="conv=8,linear=5",
        help="sparse index width: auto, N or conv=8,linear=5",
    )
    p.add_argument("--architecture", default="auto", choices=("auto", "zoo", "graph"))
    p.add_argument("--input-shape", help="one example's shape, e.g. 1,28,28 (zoo models know)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("unpack", help="check a .slim file and list its contents (or save it)")
    p.add_argument("file", help="the .slim file")
    p.add_argument("--out", help="also save the model as a .pt2 archive here")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("export", help="write a deployable file (checked against PyTorch)")
    fmt = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, text, suffix in (
        ("onnx", "ONNX, fp32 or int8 QDQ, verified in ONNX Runtime", "onnx"),
        (
            "openvino",
            "OpenVINO IR (.xml + .bin), fp32 or int8, verified in OpenVINO Runtime",
            "xml (its .bin is written beside it)",
        ),
    ):
        q = fmt.add_parser(name, help=text)
        q.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
        q.add_argument("--out", required=True, help=f"the .{suffix} file to write")
        q.add_argument("--int8", action="store_true", help="post-training int8 quantization first")
        q.add_argument(
            "--calibration", default="mse", choices=("minmax", "percentile", "mse", "kl")
        )
        q.add_argument("--data", default="mnist", help=f"calibration {DATA_HELP}")
        q.add_argument("--calib-size", type=int, default=256, help="calibration inputs")
        q.add_argument("--input-shape", help="one example's shape, e.g. 1,28,28 (zoo models know)")
        q.add_argument("--batch", type=int, default=1, help="batch size of the verification input")
        q.add_argument("--no-verify", action="store_true", help="skip the runtime check")
        q.set_defaults(func=cmd_export_graph)
    q = fmt.add_parser(
        "executorch", help="ExecuTorch .pte (fp32, XNNPACK), verified in ExecuTorch's runtime"
    )
    q.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
    q.add_argument("--out", required=True, help="the .pte file to write")
    q.add_argument("--input-shape", help="one example's shape, e.g. 1,28,28 (zoo models know)")
    q.add_argument("--batch", type=int, default=1, help="the program's (fixed) batch size")
    q.add_argument("--no-verify", action="store_true", help="skip the runtime check")
    q.set_defaults(func=cmd_export_executorch)
    for name, text in (
        ("tflite", "int8 .tflite flatbuffer, run and checked in TFLite Micro and/or LiteRT"),
        ("litert", "int8 or float32 .tflite flatbuffer, run and checked in LiteRT (phones)"),
        ("c", "C99 for microcontrollers (model.h, model.c, weights.h), compiled and checked"),
    ):
        q = fmt.add_parser(name, help=text)
        q.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
        q.add_argument("--out", required=True, help="the file (tflite) or directory (c)")
        q.add_argument("--data", default="mnist", help="calibration data: mnist, npz:PATH, random")
        q.add_argument("--calib", type=int, default=128, help="number of calibration inputs")
        if name == "tflite":
            q.add_argument(
                "--runtime",
                choices=("auto", "tflm", "litert", "all"),
                default="auto",
                help="where to run the file before writing it (auto: each one installed)",
            )
        if name in ("tflite", "litert"):
            q.add_argument(
                "--dtype",
                choices=("int8", "float32"),
                default="int8",
                help="int8 (quantized on the calibration data) or float32 (the float model)",
            )
        if name == "c":
            q.add_argument("--device", help="device profile to fit (e.g. stm32f746)")
            q.add_argument(
                "--patch",
                choices=("auto", "on", "off"),
                default="auto",
                help="patch-based execution of the first layers (auto: if needed)",
            )
        q.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "sensitivity", help="per-layer pruning sensitivity curves and the ratios they suggest"
    )
    p.add_argument("model", help="model source (FILE.pt2, py:module:factory) or a recipe YAML")
    p.add_argument("--data", help="dataset: mnist or npz:PATH (default: the recipe's, or mnist)")
    p.add_argument("--kind", default="unstructured", choices=("unstructured", "channel"))
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "fidelity"))
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--max-drop", type=float, help="allowed drop per layer, e.g. 0.01")
    target.add_argument("--target", type=float, help="global sparsity to reach (unstructured)")
    p.add_argument("--plot", help="write the curves to this PNG")
    p.add_argument("--json", help="write the curves (and derived ratios) to this JSON file")
    p.add_argument("--device", help=DEVICE_HELP + " (a recipe's own device: unless given)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("fit", help="flash, SRAM and estimated latency on a device")
    p.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
    p.add_argument("--device", required=True, help="device profile, e.g. stm32f446")
    p.add_argument("--data", default="mnist", help="calibration data: mnist, npz:PATH, random")
    p.add_argument("--calib", type=int, default=64, help="number of calibration inputs")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "optimize", help="search a compression that meets a latency / flash / SRAM budget"
    )
    p.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
    p.add_argument("--data", default="mnist", help="dataset: mnist or npz:PATH")
    p.add_argument("--target", default="ort", help="ort, torch or a device profile (stm32f446)")
    p.add_argument("--max-latency-ms", type=float, help="latency budget on the target")
    p.add_argument("--max-flash-kb", type=float, help="flash budget (device profiles)")
    p.add_argument("--max-sram-kb", type=float, help="SRAM budget (device profiles)")
    p.add_argument("--max-size-kb", type=float, help="model size budget")
    p.add_argument("--max-time", type=float, help="seconds; then finish with the best found")
    p.add_argument("--ray", help="run trials on Ray: auto (a local cluster) or an ADDRESS")
    p.add_argument("--workers", type=int, help="local worker processes (0: in this process)")
    p.add_argument("--out", default="runs/optimize", help="run directory (resumes if present)")
    p.add_argument("--trials", type=int, default=32, help="candidates to try")
    p.add_argument("--batch", type=int, default=4, help="candidates asked per generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["guided", "tpe", "nsga2", "random"], default="guided")
    p.add_argument("--proxy-steps", type=int, default=20, help="fine-tune batches per trial")
    p.add_argument("--finetune-top", type=int, default=3, help="finalists fine-tuned properly")
    p.add_argument("--finetune-epochs", type=int, default=3, help="epochs per finalist")
    p.add_argument("--fit-epochs", type=int, default=0, help="train the model first (zoo:)")
    p.add_argument(
        "--techniques", nargs="+", help="allowed: channel sparsity nm bits lowrank precision"
    )
    p.add_argument("--exclude", nargs="+", help="layer globs never changed")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser(
        "nas", help="search a network for a microcontroller (supernet + evolution), deploy it"
    )
    p.add_argument("--device", default="stm32f446", help="device profile, e.g. stm32f746")
    p.add_argument("--data", default="mnist", help=DATA_HELP)
    p.add_argument("--out", default="runs/nas", help="run directory (resumes if present)")
    p.add_argument("--max-sram-kb", type=float, help="SRAM budget (default: the device's)")
    p.add_argument("--max-flash-kb", type=float, help="flash budget (default: the device's)")
    p.add_argument("--max-latency-ms", type=float, help="device-model latency budget")
    p.add_argument("--epochs", type=int, default=6, help="supernet training epochs")
    p.add_argument("--space-samples", type=int, default=24, help="samples per width x resolution")
    p.add_argument(
        "--space-top", type=int, default=2, help="best width x resolution cells searched together"
    )
    p.add_argument("--population", type=int, default=24)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--finalists", type=int, default=3, help="exported to C before choosing")
    p.add_argument(
        "--tune-finalists",
        type=int,
        default=1,
        help="of the finalists that fit, how many to fine-tune and compare on the validation "
        "data (the best of each width x resolution cell first); 1: the best estimate",
    )
    p.add_argument(
        "--tie-tolerance",
        type=float,
        default=None,
        help="supernet estimates within it of the best are tied; ties go to the most MACs "
        "(default: one standard error of the best estimate; 0: the most accurate first)",
    )
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning of the winner")
    p.add_argument(
        "--finetune-alpha",
        type=float,
        default=0.7,
        help="winner's fine-tuning: weight of the largest sub-network's soft targets (0: labels)",
    )
    p.add_argument("--widths", help="width multipliers, e.g. 0.5,0.75,1.0")
    p.add_argument("--resolutions", help="input resolutions, e.g. 20,24,28,32")
    p.add_argument("--stages", help="supernet stages C:MAXDEPTH:STRIDE,... e.g. 16:2:1,24:3:2")
    p.add_argument("--stem", type=int, help="stem channels")
    p.add_argument(
        "--stem-stride",
        type=int,
        help="stride of the stem conv (default 2; 1 keeps the input's resolution, e.g. with "
        "--stages whose first stage has stride 2)",
    )
    p.add_argument("--head", type=int, help="head channels")
    p.add_argument(
        "--fused-stages",
        type=int,
        default=0,
        help="the first N stages use fused blocks (k x k conv + 1x1 projection, no depthwise)",
    )
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--workers", type=int, default=0, help="processes for the accuracy jobs")
    p.add_argument("--ray", help="run accuracy jobs on Ray: auto or an ADDRESS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-export", action="store_true", help="search only: no fine-tune / C")
    p.set_defaults(func=cmd_nas)

    p = sub.add_parser("report", help="re-render DIR/report.md and its plots")
    p.add_argument("dir", help="run directory written by compress or demo")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EdgeslimError as exc:
        print(f"edgeslim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeslim: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
