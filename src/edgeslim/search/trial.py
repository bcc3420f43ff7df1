"""One trial of the search, as a worker runs it: the candidate built on a copy of the model,
fine-tuned briefly (or properly, for a finalist) with distillation from the original,
quantized, evaluated. A plain function of picklable arguments, so the same code runs in
process, on a process pool and on Ray (:mod:`.executor`).
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

from torch import nn

from edgeslim.core.data.datasets import DataSplits, Split
from edgeslim.search.apply import apply_structure_, quantize_candidate


def proxy_data(state: dict[str, Any], n_train: int) -> DataSplits:
    x, y = state["train"]
    val = Split(*state["val"])
    return DataSplits("search", Split(x[:n_train], y[:n_train]), val, val, state["classes"])


def run_trial(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """One trial on a worker: the candidate built, fine-tuned, quantized, evaluated.

    ``job["kind"]``: ``"proxy"`` (``steps`` batches; validation accuracy on the proxy's
    examples) or ``"final"`` (``epochs`` over the training split; the model comes back)."""
    from edgeslim.core.kd import KD
    from edgeslim.core.train import TrainConfig, evaluate, fit

    teacher = state["model"]
    model = copy.deepcopy(teacher)
    candidate = job["candidate"]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_structure_(model, candidate, state["example"])
        bs = state["batch_size"]
        if job["kind"] == "proxy":
            data = proxy_data(state, job["steps"] * bs)
            cfg = TrainConfig(epochs=1, lr=state["lr"], batch_size=bs, keep_best=False)
        else:
            x, y = state["train"]
            data = DataSplits(
                "search", Split(x, y), Split(*state["val"]), Split(*state["test"]), state["classes"]
            )
            cfg = TrainConfig(epochs=job["epochs"], lr=state["lr"], batch_size=bs)
        cfg = cfg.model_copy(update={"seed": job["seed"], "distill": KD()})
        if cfg.epochs > 0 and job.get("steps", 1) > 0:
            fit(model, data, cfg, teacher=teacher, progress=False)
        model = quantize_candidate(model.eval(), candidate, state["calib"])
        out = {"number": job["number"], "accuracy": evaluate(model, data, "val")}
        if job["kind"] == "final":
            out["test"] = evaluate(model, data, "test")
            out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["seconds"] = time.perf_counter() - start
    return out


def rebuild(model: nn.Module, candidate: dict, weights: dict, example, calib) -> nn.Module:
    """The candidate's structure built on a copy of ``model``, with ``weights`` loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = copy.deepcopy(model)
        apply_structure_(out, candidate, example)
        out = quantize_candidate(out.eval(), candidate, calib)
    out.load_state_dict(weights)
    return out.eval()
