"""The search end to end: CLI, recipe stage, process pool / Ray, SIGKILL + resume, MCU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeslim as es
from edgeslim.search import Budget, SearchSpace
from edgeslim.search.engine import search

pytest.importorskip("optuna")
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def npz(tmp_path_factory, mnist):
    path = tmp_path_factory.mktemp("data") / "small.npz"
    n = 300
    x = torch.cat([mnist.train.x[:n], mnist.val.x[:100], mnist.test.x[:100]])
    y = torch.cat([mnist.train.y[:n], mnist.val.y[:100], mnist.test.y[:100]])
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "EDGESLIM_CACHE": str(cache), "EDGESLIM_QUIET": "1"}


def _cli(npz, out: Path, size_kb: str) -> list[str]:
    return [
        sys.executable, "-m", "edgeslim.cli", "optimize", "zoo:lenet5", "--data", f"npz:{npz}",
        "--target", "torch", "--max-size-kb", size_kb, "--trials", "2", "--batch", "2",
        "--proxy-steps", "1", "--finetune-top", "1", "--finetune-epochs", "0", "--workers", "0",
        "--techniques", "channel", "--out", str(out),
    ]  # fmt: skip


def test_cli_optimize_reports_an_infeasible_budget(tmp_path, npz):
    proc = subprocess.run(_cli(npz, tmp_path / "bad", "0.5"), capture_output=True, text=True,
                          env=_env(tmp_path), timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "INFEASIBLE" in proc.stdout and "closest" in proc.stdout
    assert "cannot be met" in proc.stderr
    assert "INFEASIBLE" in (tmp_path / "bad" / "report.md").read_text()


@pytest.mark.slow
def test_cli_optimize(tmp_path, npz):
    out = tmp_path / "run"
    proc = subprocess.run(_cli(npz, out, "900"), capture_output=True, text=True,
                          env=_env(tmp_path), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chosen trial" in proc.stdout and "report:" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["feasible"] and result["measured"]["size_kb"] <= 900
    assert (out / "model.onnx").exists()  # the answer exported (PyTorch target: ONNX too)


def test_recipe_search_stage_parses_and_refuses_bad_keys():
    from edgeslim.pipeline.stages.base import STAGE_KINDS

    kind = STAGE_KINDS["search"]
    stage = kind.parse({"max_size_kb": 100, "space": {"techniques": ["channel"]}}, "stages[0]")
    assert stage.budget().limits() == {"size_kb": 100.0} and kind.trains(stage)
    with pytest.raises(es.ConfigError, match=r"stages\[0\]\.bogus"):
        kind.parse({"max_size_kb": 100, "bogus": 1}, "stages[0]")
    with pytest.raises(es.ConfigError, match="space"):
        kind.parse({"max_size_kb": 100, "space": {"keep": [2.0]}}, "stages[0]")


def _tiny(mnist):
    torch.manual_seed(0)
    data = mnist.limit(300)
    model = es.zoo.create("lenet5")
    es.fit(model, data, epochs=1, progress=False)
    return model.eval(), data


def _settings(tmp, **kw):
    args = dict(
        target="torch",
        space=SearchSpace(keep=[1.0, 0.5, 0.25], techniques=["channel"]),
        trials=4,
        batch=2,
        seed=1,
        proxy_steps=2,
        proxy_val=100,
        batch_size=32,
        finetune_top=1,
        finetune_epochs=0,
        cache=tmp / "cache",
        export=False,
        progress=False,
    )
    args.update(kw)
    return args


@pytest.mark.slow
def test_process_pool_and_ray_give_the_same_result_as_in_process(tmp_path, mnist):
    model, data = _tiny(mnist)
    budget = Budget(max_size_kb=900)
    here = search(model, data, budget, out=tmp_path / "a", **_settings(tmp_path, workers=0))
    pool = search(model, data, budget, out=tmp_path / "b", **_settings(tmp_path, workers=2))
    key = [(t["candidate"], t["accuracy"]) for t in here.trials]
    assert key == [(t["candidate"], t["accuracy"]) for t in pool.trials]
    assert here.candidate == pool.candidate
    pytest.importorskip("ray")
    onray = search(model, data, budget, out=tmp_path / "c", **_settings(tmp_path, ray="auto"))
    assert key == [(t["candidate"], t["accuracy"]) for t in onray.trials]
    assert here.candidate == onray.candidate


KILL_SCRIPT = """
import sys, torch, edgeslim as es
from edgeslim.search import Budget, SearchSpace
from edgeslim.search.engine import search
torch.manual_seed(0)
data = es.load_data("mnist").limit(300)
model = es.zoo.create("lenet5"); es.fit(model, data, epochs=1, progress=False); model.eval()
r = search(model, data, Budget(max_size_kb=900), target="torch",
           space=SearchSpace(keep=[1.0, 0.5, 0.25], techniques=["channel"]), trials=8, batch=2,
           seed=1, proxy_steps=3, proxy_val=100, batch_size=32, finetune_top=1, finetune_epochs=0,
           workers=0, export=False, progress=False, out=sys.argv[1])
print("CHOICE", sorted(r.candidate.items()), r.accuracy)
"""


@pytest.mark.slow
def test_sigkill_during_the_search_then_resume_gives_the_same_choice(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = _env(tmp_path / "cache")
    straight = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    trials = out / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if trials.exists() and len(trials.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(trials.read_bytes().splitlines())
    assert 3 <= done < 8  # killed mid-search
    resumed = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    choice = [x for x in straight.stdout.splitlines() if x.startswith("CHOICE")]
    assert choice and choice == [x for x in resumed.stdout.splitlines() if x.startswith("CHOICE")]


@pytest.mark.slow
def test_microcontroller_budget_is_met_by_the_c_exports_own_numbers(tmp_path, mnist):
    model, data = _tiny(mnist)
    budget = Budget(max_flash_kb=200, target="stm32f446")
    space = SearchSpace(keep=[1.0, 0.5, 0.25], techniques=["channel", "bits"], bits=[8, 4])
    result = search(
        model,
        data,
        budget,
        out=tmp_path / "run",
        **_settings(tmp_path, target=None, space=space, workers=0, export=True),
    )
    assert result.feasible, result.summary()
    assert result.measured["flash_kb"] <= 200 and result.measured["sram_kb"] <= 128
    assert (tmp_path / "run" / "c" / "model.c").exists()
    # the prediction is the planner's arena and the constants: SRAM exact, flash close
    assert result.predicted["sram_kb"] == pytest.approx(result.measured["sram_kb"], rel=1e-6)
    assert result.predicted["flash_kb"] == pytest.approx(result.measured["flash_kb"], rel=0.2)


@pytest.mark.slow
def test_recipe_with_a_search_stage_runs_and_resumes(tmp_path, npz):
    import yaml

    recipe = {
        "name": "search", "seed": 0, "model": "zoo:lenet5", "data": f"npz:{npz}",
        "train": {"epochs": 1},
        "stages": [{"search": {
            "target": "torch", "max_size_kb": 900, "trials": 2, "batch": 2, "proxy_steps": 1,
            "finetune_top": 1, "finetune_epochs": 0, "workers": 0,
            "space": {"techniques": ["channel"]}, "out": str(tmp_path / "search"),
        }}],
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    first = es.run_recipe(es.Recipe.from_yaml(path), out=tmp_path / "run")
    size = sum(p.numel() for p in first.model.parameters())
    assert size * 4 / 1024 <= 900 < 431_080 * 4 / 1024
    again = es.run_recipe(es.Recipe.from_yaml(path), out=tmp_path / "run")
    assert again.resumed_from == 1
    assert sum(p.numel() for p in again.model.parameters()) == size
