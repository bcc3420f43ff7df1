"""The ``edgeslim`` command: parse arguments, call the Python API, print with rich.

Heavy imports (torch and everything built on it) happen inside the command functions, so
``edgeslim --help`` stays fast and does not import torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import EdgeslimError

DEMO_RECIPES = ("han2015_lenet300", "han2015_lenet5")


def recipe_path(name: str) -> Path:
    """Path of a recipe shipped with edgeslim (``recipes/NAME.yaml``)."""
    from importlib.resources import files

    return Path(str(files("edgeslim") / "recipes" / f"{name}.yaml"))


def _print_table(run_dir: Path, title: str) -> None:
    from rich.console import Console

    from .report import read_metrics, stage_table

    Console().print(stage_table(read_metrics(run_dir), title=title))


def cmd_demo(args: argparse.Namespace) -> None:
    from .pipeline import run_recipe

    out = Path(args.out)
    for name in DEMO_RECIPES:
        net = name.split("_", 1)[1]
        result = run_recipe(recipe_path(name), out / net, restart=args.restart)
        _print_table(result.out, f"{name}  ->  {result.out}")
    print(f"run directories and reports under {out}/ (report.md in each)")


def cmd_compress(args: argparse.Namespace) -> None:
    from .pipeline import run_recipe

    result = run_recipe(args.recipe, args.out, restart=args.restart)
    _print_table(result.out, f"{args.recipe}  ->  {result.out}")
    print(f"report: {result.out / 'report.md'}")


def _example(model, shape: str | None, batch: int):
    import torch

    from .models.io import example_input

    if shape:
        try:
            dims = tuple(int(s) for s in shape.split(","))
        except ValueError:
            raise EdgeslimError(f"--input-shape must look like 1,28,28, got {shape!r}") from None
        return torch.zeros(batch, *dims)
    return example_input(model, batch)


def cmd_profile(args: argparse.Namespace) -> None:
    from rich.console import Console

    from .models.io import load_model
    from .profile import profile

    model = load_model(args.model)
    model.eval()
    prof = profile(model, _example(model, args.input_shape, 1), latency=not args.no_latency)
    Console().print(prof.table(title=f"profile of {args.model}"))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .data.datasets import load_data
    from .data.transforms import apply_transform
    from .models.io import load_model
    from .train import evaluate

    model = load_model(args.model)
    acc = evaluate(model, apply_transform(load_data(args.data), args.transform), args.split)
    print(f"{args.split} accuracy of {args.model} on {args.data}: {100 * acc:.2f}%")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import render_report

    path = render_report(Path(args.dir))
    _print_table(Path(args.dir), str(args.dir))
    print(f"report: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeslim",
        description="Make trained PyTorch models small and fast for the edge, and measure it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="prune LeNet-300-100 and LeNet-5 on MNIST as Han et al. did")
    p.add_argument("--out", default="runs/demo", help="directory for the two runs")
    p.add_argument("--restart", action="store_true", help="discard finished stages")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compress", help="run (or resume) a YAML recipe")
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--restart", action="store_true", help="discard finished stages")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("profile", help="params, MACs, memory, bytes and latency per layer")
    p.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
    p.add_argument("--input-shape", help="one example's shape, e.g. 1,28,28 (zoo models know)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("evaluate", help="top-1 accuracy of a model on a dataset split")
    p.add_argument("model", help="model source: zoo:NAME, py:module:factory or FILE.pt2")
    p.add_argument("--data", default="mnist", help="dataset: mnist or npz:PATH")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--transform", choices=("haar",), help="input transform the model expects")
    p.set_defaults(func=cmd_evaluate)

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
