"""OBD vs magnitude, one-shot without fine-tuning, on LeNet-300-100 (MNIST subset).

    flock /tmp/edgeslim-cpu.lock python benchmarks/obd.py

Trains LeNet-300-100 once per seed, then prunes copies of it to 50 / 70 / 90 / 95% global
sparsity and reports the test accuracy of each, with no fine-tuning:

- by |w| with one global threshold (Han et al.);
- by OBD saliency h_kk w^2 / 2 of the loss (LeCun et al. 1989; Fisher and Hutchinson estimates
  of the Hessian diagonal on 512 training examples, one global threshold);
- by layer-wise OBD, w_ij^2 H_jj / 2 with H = 2 E[x x^T] of each layer's inputs (Dong et al.
  2017), and layer-wise OBS (w_ij^2 / 2[H^-1]_jj, then each row's kept weights re-fit), with
  the per-layer sparsities of the global |w| threshold ("magnitude" allocation) or one
  threshold on saliency / layer output energy ("normalized").
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from rich.console import Console
from rich.table import Table

import edgeslim as es
from edgeslim.prune import OBDPrune, OBSPrune, prune_

SPARSITIES = (0.5, 0.7, 0.9, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = es.load_data("mnist")
    methods = {
        "magnitude": lambda s: es.MagnitudePrune(sparsity=s),
        "OBD (Fisher)": lambda s: OBDPrune(sparsity=s, samples=512),
        "OBD (Hutchinson)": lambda s: OBDPrune(sparsity=s, samples=512, hessian="hutchinson"),
        "layer-wise OBD, magnitude alloc.": lambda s: OBDPrune(
            sparsity=s, samples=512, hessian="layerwise", allocation="magnitude"
        ),
        "layer-wise OBD, normalized alloc.": lambda s: OBDPrune(
            sparsity=s, samples=512, hessian="layerwise", allocation="normalized"
        ),
        "layer-wise OBS, magnitude alloc.": lambda s: OBSPrune(sparsity=s, samples=512),
        "layer-wise OBS, normalized alloc.": lambda s: OBSPrune(
            sparsity=s, samples=512, allocation="normalized"
        ),
    }
    results: dict[tuple[str, float], list[float]] = {}
    dense: list[float] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        model = es.load_model("zoo:lenet300")
        es.fit(model, data, epochs=args.epochs, seed=seed, progress=False)
        dense.append(es.evaluate(model, data))
        for name, make in methods.items():
            for s in SPARSITIES:
                pruned = copy.deepcopy(model)
                kwargs = {"data": data} if name != "magnitude" else {}
                prune_(pruned, make(s), **kwargs)
                results.setdefault((name, s), []).append(es.evaluate(pruned, data))
    table = Table(title=f"LeNet-300-100, one-shot pruning, no fine-tuning ({len(dense)} seeds)")
    table.add_column("method")
    for s in SPARSITIES:
        table.add_column(f"{s:.0%} sparse", justify="right")
    table.add_row("dense", *[f"{100 * statistics.mean(dense):.2f}"] * len(SPARSITIES))
    for name in methods:
        cells = []
        for s in SPARSITIES:
            accs = results[(name, s)]
            cells.append(f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.pstdev(accs):.2f}")
        table.add_row(name, *cells)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
