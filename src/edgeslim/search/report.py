"""A search's report in its run directory: ``result.json``, ``report.md``, ``pareto.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeslim.core.fileio import atomic_write_text


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _num(v: Any, fmt: str = ".4g") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "-"


def write_report(result: Any, directory: Path, bound: Any) -> Path:
    """Write the report files of ``result`` (a SearchResult) into ``directory``."""
    budget = result.budget
    metric = budget.primary()
    data = {
        "feasible": result.feasible,
        "stopped": result.stopped,
        "target": result.target,
        "budget": budget.limits(),
        "candidate": result.candidate,
        "accuracy": result.accuracy,
        "predicted": result.predicted,
        "measured": result.measured,
        "dense": result.dense,
        "closest": result.closest,
        "front": [{k: r[k] for k in ("number", "accuracy", "cost")} for r in result.front],
        "finalists": result.finalists,
        "proxy_spearman": result.proxy_spearman,
        "trials": len(result.trials),
        "files": result.files,
        "wall_s": result.wall_s,
        "verdict": getattr(result, "verdict", ""),
    }
    atomic_write_text(directory / "result.json", json.dumps(data, indent=1, default=str))
    lines = [f"# Compression search on {result.target}", ""]
    lines.append(
        f"Budget: {budget.limits()}. Trials: {len(result.trials)}; "
        f"wall time {result.wall_s:.1f} s. {result.summary()}"
    )
    lines.append("")
    if result.finalists:
        lines += ["## Finalists (fine-tuned with distillation; cost measured on the target)", ""]
        keys = sorted({k for f in result.finalists for k in f["measured"]})
        lines.append(
            _row(
                [
                    "trial",
                    "proxy acc",
                    "val acc",
                    "test acc",
                    "fits",
                    *[f"{k} measured / predicted" for k in keys],
                ]
            )
        )
        lines.append(_row(["---"] * (5 + len(keys))))
        for f in result.finalists:
            cells = [
                f["number"],
                _num(f["proxy"], ".4f"),
                _num(f["accuracy"], ".4f"),
                _num(f["test"], ".4f"),
                "yes" if f["fits"] else ("NO (not exportable)" if f.get("error") else "NO"),
            ]
            cells += [f"{_num(f['measured'].get(k))} / {_num(f['predicted'].get(k))}" for k in keys]
            lines.append(_row(cells))
        lines += [
            f"- trial {f['number']}: {f['error']}" for f in result.finalists if f.get("error")
        ]
        lines += [
            f"- trial {f['number']}, latency verdict: {f['fit']['how']}"
            for f in result.finalists
            if f.get("fit")
        ]
        lines += [
            "",
            f"Proxy quality: Spearman rank correlation of the proxy accuracy with "
            f"the fine-tuned accuracy over the finalists: {_num(result.proxy_spearman, '.3f')}",
            "",
        ]
    if result.measured:
        lines += ["## The answer, verified", ""]
        lines.append(_row(["metric", "budget", "predicted", "measured"]))
        lines.append(_row(["---"] * 4))
        for k, v in result.measured.items():
            lines.append(
                _row([k, _num(budget.limits().get(k)), _num(result.predicted.get(k)), _num(v)])
            )
        lines.append("")
        if getattr(result, "verdict", ""):
            lines += [f"Latency verdict: {result.verdict}.", ""]
    lines += [f"## Pareto front (proxy accuracy vs predicted {metric})", ""]
    lines.append(_row(["trial", "proxy acc", *budget.limits(), "knobs changed"]))
    lines.append(_row(["---"] * (3 + len(budget.limits()))))
    dense = bound.dense()
    for r in result.front:
        changed = {k: v for k, v in r["candidate"].items() if dense.get(k) != v}
        lines.append(
            _row(
                [
                    r["number"],
                    _num(r["accuracy"], ".4f"),
                    *[_num(r["cost"][m]) for m in budget.limits()],
                    len(changed),
                ]
            )
        )
    lines.append("")
    if _plot(result, directory / "pareto.png", metric):
        lines += ["![Pareto front](pareto.png)", ""]
    path = directory / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _plot(result: Any, path: Path, metric: str) -> bool:
    pts = [r for r in result.trials if r["accuracy"] is not None]
    if not pts:
        return False
    from edgeslim.core.plotting import new_figure, save_png

    fig = new_figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    feas = [r for r in pts if r["feasible"]]
    ax.scatter(
        [r["cost"][metric] for r in feas],
        [r["accuracy"] for r in feas],
        s=12,
        label="trials (proxy accuracy)",
        color="tab:blue",
        alpha=0.6,
    )
    front = result.front
    ax.plot(
        [r["cost"][metric] for r in front],
        [r["accuracy"] for r in front],
        "o-",
        color="tab:red",
        label="Pareto front",
    )
    limit = result.budget.limits().get(metric)
    if limit:
        ax.axvline(limit, color="gray", linestyle="--", label="budget")
    ax.set_xlabel(f"predicted {metric}")
    ax.set_ylabel("accuracy (proxy)")
    ax.legend(fontsize=8)
    save_png(fig, path)
    return True
