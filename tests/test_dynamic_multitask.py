"""Shared backbone with several heads; exports and recipe stages of dynamic techniques."""

import pytest
import torch

from edgeslim import ConfigError
from edgeslim.core.models import zoo
from edgeslim.core.train import TrainConfig
from edgeslim.dynamic import Heads, add_heads, count_macs, task_accuracy, train_heads


def test_heads_share_the_trunk_and_export_together(mnist, tmp_path):
    from edgeslim.export.multitask import export_heads

    model = zoo.create("lenet5")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    mh = add_heads(model, Heads(after="fc1", tasks={"digit": "label", "parity": "parity"}))
    mh.eval()
    with torch.no_grad():
        outs = mh.forward_all(x)
        assert torch.allclose(outs["digit"], ref)  # the trained classifier is kept
        assert outs["parity"].shape == (4, 2) and torch.equal(mh(x), outs["digit"])
    one = count_macs(model, x[:1])
    both = count_macs(mh.forward_all, x[:1])
    assert one < both < 1.01 * one  # the second task costs one small layer
    data = mnist.limit(300)
    train_heads(mh, data, TrainConfig(epochs=1), progress=False)
    acc = task_accuracy(mh, data.test.x, data.test.y)
    assert set(acc) == {"digit", "parity"} and acc["parity"] > 0.5
    diffs = export_heads(mh.eval(), tmp_path / "mt.onnx", data.test.x[:8])
    assert set(diffs) == {"digit", "parity"} and max(diffs.values()) < 1e-4


def test_multitask_errors():
    model = zoo.create("lenet5")
    with pytest.raises(ConfigError, match="tasks"):
        Heads(after="fc1", tasks={})
    with pytest.raises(ConfigError, match="no module"):
        add_heads(model, Heads(after="nope", tasks={"a": "label"}))
    with pytest.raises(ConfigError, match=r"no nn\.Linear"):
        add_heads(model, Heads(after="fc2", tasks={"a": "label"}))
    mh = add_heads(model, Heads(after="fc1", tasks={"a": "label"}))
    with pytest.raises(ConfigError, match="no task"):
        train_heads(mh, None, weights={"b": 1.0})  # type: ignore[arg-type]


def test_dynamic_recipe_stages(tmp_path):
    from edgeslim.pipeline.recipe import Recipe
    from edgeslim.pipeline.runner import run_recipe

    recipe = Recipe.from_dict(
        {
            "name": "dyn",
            "model": "zoo:lenet5",
            "data": {"max_train": 300},
            "train": {"epochs": 1},
            "stages": [
                {"cache": {"n_frames": 12, "thresholds": [0.0, 0.05]}},
                {
                    "exits": {
                        "after": ["conv1"],
                        "train": {"epochs": 1},
                        "calibrate": {"max_loss": 0.02},
                    }
                },
            ],
        }
    )
    result = run_recipe(recipe, tmp_path / "run", progress=False)
    rows = result.rows
    assert rows[1]["log"]["sweep"][0]["reused_macs_share"] >= 0
    assert rows[2]["log"]["test_avg_macs"] <= rows[2]["log"]["static_macs"] * 1.05
    assert (tmp_path / "run" / "plots" / "accuracy_vs_compute.png").is_file()
    with pytest.raises(ConfigError, match=r"stages\[0\]\.exits"):
        Recipe.from_dict({"name": "x", "model": "zoo:lenet5", "stages": [{"exits": {"after": []}}]})
    with pytest.raises(ConfigError, match=r"calibrate"):
        Recipe.from_dict(
            {
                "name": "x",
                "model": "zoo:lenet5",
                "stages": [{"exits": {"after": ["conv1"], "calibrate": {"budget": 2}}}],
            }
        )


def test_gating_and_multitask_stages_log_their_curves(mnist, tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from edgeslim.core.train import TrainConfig, fit
    from edgeslim.pipeline.stages.dynamic import (
        GatingStage,
        MultitaskStage,
        run_gating,
        run_multitask,
    )
    from edgeslim.report.plots import plot_accuracy_vs_compute

    data = mnist.limit(200)
    data = dataclasses.replace(data, val=data.val.subset(150), test=data.test.subset(150))
    ctx = SimpleNamespace(data=data, example=data.test.x[:1], teacher=None, seed=0, progress=False)
    torch.manual_seed(0)
    model = zoo.create("lenet5")
    fit(model, data, epochs=1, progress=False)
    cfg = GatingStage(layers=["conv1", "conv2"], anneal=0.5, sweep=[0.5, 1.0])
    stage = SimpleNamespace(config=cfg, finetune=TrainConfig(epochs=1))
    _, gating = run_gating(model, stage, ctx)
    assert [p["density"] for p in gating["sweep"]] == [0.5, 1.0]
    assert gating["sweep"][0]["macs"] < gating["sweep"][1]["macs"] <= gating["static_macs"] * 1.05
    assert len(gating["tradeoff"]["points"]) == 3
    model = zoo.create("lenet5")
    cfg = MultitaskStage(after="fc1", tasks={"digit": "label", "parity": "parity"})
    stage = SimpleNamespace(config=cfg, finetune=TrainConfig(epochs=1))
    _, multi = run_multitask(model, stage, ctx)
    assert multi["tradeoff"]["static"]["macs"] == 2 * multi["macs_one_network"]
    assert multi["tradeoff"]["points"][0]["macs"] == multi["macs_all_tasks"]
    rows = [{"stage": "gating", "log": gating}, {"stage": "multitask", "log": multi}]
    assert plot_accuracy_vs_compute(rows, tmp_path / "curve.png").is_file()
