"""How many components each layer keeps: a fixed rank, an energy share, or a MAC budget.

Three ways, one per config field (exactly one is given):

- ``rank``: the same rank for every layer, or per layer name (glob patterns allowed);
- ``energy``: per layer, the smallest rank keeping that share of the spectrum's energy;
- ``macs``: keep this fraction of the candidate layers' MACs, ranks chosen from *measured*
  sensitivity. Each layer alone is factorised at ranks costing 1/8, 2/8, ... 7/8 of its MACs
  and the model's output distortion on calibration inputs is measured,
  ``sum |f'(x) - f(x)|^2 / sum |f(x) - mean f(x)|^2``. A greedy allocation then repeatedly
  takes the step with the least added distortion per MAC saved until the budget is met
  (distortions are taken as additive), and finally spends any slack left on the steps back
  up that remove the most distortion per MAC.

A layer whose chosen pair would not cost fewer MACs than the layer itself is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import run_calibration
from edgeslim.core.options import Options
from edgeslim.core.progress import enabled, progress_bar
from edgeslim.core.selection import lookup_layer, unmatched
from edgeslim.lowrank.layers import Factored, Factorization, replace_

MAC_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


class RankTarget(Options):
    """Exactly one of ``rank``, ``energy`` or ``macs``; layers matching ``exclude`` are kept."""

    model_config = ConfigDict(extra="forbid")

    rank: int | dict[str, int] | None = Field(None, description="rank, or layer glob -> rank")
    energy: float | None = Field(None, gt=0, le=1, description="share of the spectrum to keep")
    macs: float | None = Field(
        None, gt=0, lt=1, description="fraction of the candidate layers' MACs to keep"
    )
    exclude: list[str] = Field(default_factory=list, description="layer globs left alone")

    @model_validator(mode="after")
    def _one_target(self) -> RankTarget:
        self.require_one_of("rank", "energy", "macs")
        ranks = self.rank if isinstance(self.rank, dict) else {"*": self.rank or 1}
        for name, r in ranks.items():
            if r < 1:
                raise ValueError(f"rank[{name!r}] = {r} must be >= 1")
        return self


def inside_factored(model: nn.Module) -> set[str]:
    """Names of modules that are already part of a factorised pair."""
    return {
        f"{name}.{child}"
        for name, module in model.named_modules()
        if isinstance(module, Factored)
        for child, _ in module.named_children()
    }


# --------------------------------------------------------------------------------------
# measured sensitivity
# --------------------------------------------------------------------------------------


def model_outputs(model: nn.Module, calib: Any) -> torch.Tensor:
    """The model's outputs on ``calib`` (eval mode, no grad), concatenated over batches."""
    outs: list[torch.Tensor] = []

    def keep(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"a 'macs' budget measures output distortion, so the model must return a "
                f"tensor; {type(model).__name__} returns {type(output).__name__} (wrap it)"
            )
        outs.append(output.detach().double())

    run_calibration(model, calib, {"": model}, keep)
    return torch.cat(outs)


def distortion(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Squared error relative to the reference outputs' variance."""
    scale = float((reference - reference.mean(0)).pow(2).sum()) or 1.0
    return float((out - reference).pow(2).sum()) / scale


def measure_sensitivity(
    model: nn.Module, factors: dict[str, Factorization], calib: Any
) -> dict[str, dict[int, float]]:
    """For each layer, output distortion when only it is factorised at each candidate rank."""
    reference = model_outputs(model, calib)
    ranks = {
        n: sorted({f.rank_for_macs(frac) for frac in MAC_FRACTIONS}) for n, f in factors.items()
    }
    result: dict[str, dict[int, float]] = {}
    with progress_bar(disable=not enabled()) as bar:
        task = bar.add_task("sensitivity", total=sum(len(r) for r in ranks.values()))
        for name, fz in factors.items():
            result[name] = {}
            try:
                for r in ranks[name]:
                    replace_(model, name, fz.build(r))
                    result[name][r] = distortion(model_outputs(model, calib), reference)
                    bar.update(task, advance=1)
            finally:
                replace_(model, name, fz.layer)
    return result


def allocate(
    options: dict[str, list[tuple[int, float, int]]], dense: dict[str, int], budget: float
) -> dict[str, int]:
    """Greedy choice of one option ``(macs, distortion, rank)`` per layer under ``budget`` MACs.

    Every layer starts dense (``dense[name]`` MACs, no distortion). Returns the chosen rank of
    each layer that is factorised; raises :class:`ConfigError` if the budget cannot be met.
    """
    state = {n: (dense[n], 0.0, 0) for n in options}  # rank 0 = not factorised
    options = {n: [*opts, state[n]] for n, opts in options.items()}  # may go back to dense
    total = sum(dense[n] for n in options)

    def best_step(better) -> tuple[str, tuple[int, float, int]] | None:
        found, found_score = None, None
        for name, opts in options.items():
            m0, d0, _ = state[name]
            for opt in opts:
                score = better(m0, d0, *opt[:2])
                if score is not None and (found_score is None or score < found_score):
                    found, found_score = (name, opt), score
        return found

    def down(m0: int, d0: float, m: int, d: float) -> float | None:  # cheaper, least harm
        return (d - d0) / (m0 - m) if m < m0 else None

    while total > budget:
        step = best_step(down)
        if step is None:
            raise ConfigError(
                f"macs budget {budget:,.0f} cannot be met: the cheapest factorisation of the "
                f"{len(options)} candidate layers still costs {total:,} MACs; raise 'macs'"
            )
        name, opt = step
        total -= state[name][0] - opt[0]
        state[name] = opt

    def up(m0: int, d0: float, m: int, d: float) -> float | None:  # slack: most gain per MAC
        return (d - d0) / (m - m0) if m > m0 and d < d0 and total + m - m0 <= budget else None

    while (step := best_step(up)) is not None:
        name, opt = step
        total += opt[0] - state[name][0]
        state[name] = opt
    return {n: s[2] for n, s in state.items() if s[2] > 0}


# --------------------------------------------------------------------------------------
# choosing and applying
# --------------------------------------------------------------------------------------


def choose_ranks(
    model: nn.Module, cfg: RankTarget, factors: dict[str, Factorization], calib: Any
) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """Rank per layer as ``cfg`` says (layers absent are kept), and any measured sensitivity."""
    if isinstance(cfg.rank, dict):
        unknown = unmatched(cfg.rank, factors)
        if unknown:
            raise ConfigError(
                f"rank names {unknown} match no layer that can be factorised; candidates: "
                f"{list(factors)}"
            )
        found = {n: lookup_layer(cfg.rank, n) for n in factors}
        return {n: min(r, factors[n].max_rank) for n, r in found.items() if r is not None}, {}
    if cfg.rank is not None:
        return {n: min(cfg.rank, f.max_rank) for n, f in factors.items()}, {}
    if cfg.energy is not None:
        return {n: f.rank_for_energy(cfg.energy) for n, f in factors.items()}, {}
    if calib is None:
        raise ConfigError("a 'macs' budget measures sensitivity: pass calib=INPUTS to lowrank_")
    sens = measure_sensitivity(model, factors, calib)
    options = {n: [(factors[n].macs(r), d, r) for r, d in s.items()] for n, s in sens.items()}
    dense = {n: f.dense_macs() for n, f in factors.items()}
    return allocate(options, dense, cfg.macs * sum(dense.values())), sens


def _kept(name: str, why: str) -> None:
    import warnings

    warnings.warn(f"low-rank: {name} left as it is: {why}", stacklevel=3)


def factorize_(
    model: nn.Module, cfg: RankTarget, factors: dict[str, Factorization], calib: Any
) -> dict[str, dict[str, float]]:
    """Choose ranks and replace the layers in place; one log entry per factorised layer."""
    ranks, sens = choose_ranks(model, cfg, factors, calib)
    log: dict[str, dict[str, float]] = {}
    for name, rank in ranks.items():
        fz = factors[name]
        if fz.macs(rank) >= fz.dense_macs():
            _kept(name, f"rank {rank} costs {fz.macs(rank):,} MACs, the layer {fz.dense_macs():,}")
            continue  # not cheaper than the layer itself
        built = fz.build(rank)
        before = sum(p.numel() for p in model.get_submodule(name).parameters())
        after = sum(p.numel() for p in built.parameters())
        if after >= before:
            _kept(name, f"rank {rank} needs {after:,} parameters, the layer has {before:,}")
            continue  # a factorisation must never make the layer larger
        replace_(model, name, built)
        log[name] = {
            "rank": rank,
            "max_rank": fz.max_rank,
            "energy": round(fz.energy(rank), 6),
            "macs": fz.dense_macs(),
            "factored_macs": fz.macs(rank),
        }
        if name in sens:
            log[name]["distortion"] = sens[name][rank]
    return log
