"""Han et al. 2015 on the MNIST subset: our recipes beside the paper and beside PyTorch's pruner.

For LeNet-300-100 and LeNet-5, in one run and per seed:

1. **edgeslim**: the shipped recipe (``recipes/han2015_*.yaml``): train dense, then iterative
   per-layer magnitude pruning with retraining (``edgeslim compress`` does exactly this).
2. **torch global L1, one-shot**: from the *same* trained dense weights,
   ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured)`` to the same overall
   weight sparsity, then the same fine-tuning budget (epochs x cycles, optimizer, lr, weight
   decay, augmentation) in one run.
3. **torch global L1, iterative**: the same, in the same number of prune -> retrain cycles with
   the same geometric sparsity schedule as ours.

Everything is counted the same way: nonzero parameters (biases included) and test error on the
1,000-image test split. Usage::

    python benchmarks/han2015.py                 # seed 0
    python benchmarks/han2015.py --seeds 0,1,2   # mean over seeds as well
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("EDGESLIM_QUIET", "1")

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from torch.nn.utils import prune as torch_prune

import edgeslim as es
from edgeslim.pipeline.runner import stage_seed
from edgeslim.profiling import count_params

ROOT = Path(__file__).resolve().parents[1]
# (paper's weights before, after, error before, after) -- Han et al. 2015, Table 1
PAPER = {
    "lenet300": (267_000, 22_000, 1.64, 1.59),
    "lenet5": (431_000, 36_000, 0.80, 0.77),
}


@dataclass
class Result:
    net: str
    method: str
    seed: int
    params: int
    nonzero: int
    error_before: float  # % on the test split
    error_after: float
    seconds: float


def _error(model: torch.nn.Module, data: es.DataSplits) -> float:
    return 100 * (1 - es.evaluate(model, data, "test"))


def run_ours(net: str, seed: int, data: es.DataSplits, workdir: Path) -> tuple[Result, dict]:
    recipe = es.Recipe.from_yaml(ROOT / "recipes" / f"han2015_{net}.yaml")
    recipe = es.Recipe.from_dict({**recipe.to_dict(), "seed": seed})
    start = time.perf_counter()
    result = es.run_recipe(recipe, workdir / f"{net}-{seed}", restart=True, progress=False)
    seconds = time.perf_counter() - start
    base, final = result.rows[0], result.rows[-1]
    baseline_state = load_file(str(workdir / f"{net}-{seed}" / "stage-0" / "state.safetensors"))
    res = Result(
        net,
        "edgeslim (per-layer, iterative)",
        seed,
        final["params"],
        final["nonzero_params"],
        100 * (1 - base["accuracy"]),
        100 * (1 - final["accuracy"]),
        seconds,
    )
    return res, {"recipe": recipe, "baseline": baseline_state, "final": result.model}


def _weight_sparsity(model: torch.nn.Module) -> float:
    """Fraction of zeros over the Conv/Linear weights (what both pruners act on)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / total


def run_torch(net: str, seed: int, data: es.DataSplits, ctx: dict, iterative: bool) -> Result:
    """torch.nn.utils.prune global L1 from our baseline weights, same fine-tuning budget."""
    recipe: es.Recipe = ctx["recipe"]
    stage = recipe.stages[0]
    steps, ft = stage.config.extra.get("steps", 1), stage.finetune
    target = _weight_sparsity(ctx["final"])
    model = es.load_model(recipe.model)
    model.load_state_dict(ctx["baseline"])
    error_before = _error(model, data)
    layers = [
        (m, "weight") for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    cycles = steps if iterative else 1
    seed0 = stage_seed(recipe.seed, 1)
    start = time.perf_counter()
    for k in range(1, cycles + 1):
        # the same geometric schedule as ours: density_k = density ** (k / steps); torch's
        # `amount` is the fraction of the *remaining* weights to remove in this call
        done = 1 - (1 - target) ** ((k - 1) / cycles)
        goal = 1 - (1 - target) ** (k / cycles)
        amount = (goal - done) / (1 - done)
        torch_prune.global_unstructured(
            layers, pruning_method=torch_prune.L1Unstructured, amount=amount
        )
        epochs = ft.epochs if iterative else ft.epochs * steps
        es.finetune(model, data, ft, epochs=epochs, seed=seed0 + k, progress=False)
    seconds = time.perf_counter() - start
    for module, name in layers:
        torch_prune.remove(module, name)
    params, nonzero = count_params(model)
    label = "torch global L1, " + (f"iterative x{steps}" if iterative else "one-shot")
    return Result(net, label, seed, params, nonzero, error_before, _error(model, data), seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated recipe seeds")
    parser.add_argument("--nets", default="lenet300,lenet5")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    nets = args.nets.split(",")
    data = es.load_data("mnist")
    console = Console(width=130)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in nets:
            for seed in seeds:
                ours, ctx = run_ours(net, seed, data, Path(tmp))
                results.append(ours)
                console.print(f"{net} seed {seed}: ours done ({ours.seconds:.0f} s)")
                for iterative in (False, True):
                    results.append(run_torch(net, seed, data, ctx, iterative))
                    console.print(f"  {results[-1].method} done ({results[-1].seconds:.0f} s)")

    table = Table(title=f"Han et al. 2015 on the MNIST subset (seeds {args.seeds})")
    for col in ("net", "method", "nonzero params", "fewer x", "error before %", "error after %"):
        table.add_column(col, justify="left" if col in ("net", "method") else "right")
    table.add_column("Δ error (pts)", justify="right")
    for net in nets:
        before, after, e0, e1 = PAPER[net]
        table.add_row(
            net,
            "paper (full MNIST)",
            f"{after:,}",
            f"{before / after:.1f}x",
            f"{e0:.2f}",
            f"{e1:.2f}",
            f"{e1 - e0:+.2f}",
        )
        for method in dict.fromkeys(r.method for r in results if r.net == net):
            rs = [r for r in results if r.net == net and r.method == method]
            nz = statistics.mean(r.nonzero for r in rs)
            eb = statistics.mean(r.error_before for r in rs)
            ea = statistics.mean(r.error_after for r in rs)
            deltas = ", ".join(f"{r.error_after - r.error_before:+.1f}" for r in rs)
            table.add_row(
                net,
                method,
                f"{nz:,.0f}",
                f"{rs[0].params / nz:.1f}x",
                f"{eb:.2f}",
                f"{ea:.2f}",
                f"{ea - eb:+.2f}" + (f" ({deltas})" if len(rs) > 1 else ""),
            )
        table.add_section()
    console.print(table)
    console.print(
        "Same dense start and same fine-tuning budget for every method of a seed; errors on the "
        "1,000-image test split (1 image = 0.1 points)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
