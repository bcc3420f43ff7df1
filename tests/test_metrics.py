"""Task metrics: the registry, evaluate(metric=...), the regression loss, recipes, pipeline
rows, the report and ``edgeslim evaluate --metric``."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

import edgeslim as es
from edgeslim.core.metrics import display, format_value, get_metric, names
from edgeslim.pipeline.recipe import Recipe
from edgeslim.report import build_markdown, read_metrics

REGRESSION = """
import torch
from torch.utils.data import Dataset


class Line(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], float(self.y[i])


def splits():
    return Line(256, 0), Line(64, 1), Line(64, 2)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def mae(outputs, targets):
    return (outputs.reshape(-1) - targets.to(outputs.dtype)).abs().mean()


mae.higher_is_better = False
mae.loss = "mse"
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_regression.py").write_text(REGRESSION)
    yield "user_regression"
    sys.modules.pop("user_regression", None)


@pytest.fixture(scope="module")
def scores(mnist):
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300")
    es.fit(model, mnist.limit(500), epochs=1, progress=False)
    with torch.no_grad():
        logits = model(mnist.test.x)
    return model, logits


def test_registry_names_directions_and_errors():
    assert names() == ["cosine", "mse", "perplexity", "top1", "top5"]
    better = {n: get_metric(n).higher_is_better for n in names()}
    assert better == {"cosine": True, "mse": False, "perplexity": False, "top1": True, "top5": True}
    assert get_metric("accuracy") is get_metric("top1") and get_metric(None).name == "top1"
    assert get_metric("mse").loss == "mse" and get_metric("top5").loss == "cross_entropy"
    with pytest.raises(es.ConfigError, match="unknown metric 'top3'; known: cosine, mse"):
        get_metric("top3")


def test_top1_top5_and_perplexity_match_their_definitions(mnist, scores):
    model, logits = scores
    y = mnist.test.y
    top1 = int((logits.argmax(1) == y).sum()) / len(y)
    top5 = int((logits.topk(5, 1).indices == y[:, None]).any(1).sum()) / len(y)
    ppl = math.exp(float(F.cross_entropy(logits, y)))
    assert es.evaluate(model, mnist) == top1
    assert es.evaluate(model, mnist, metric="top5") == top5
    assert es.evaluate(model, mnist, metric="perplexity") == pytest.approx(ppl, rel=1e-5)
    assert top5 >= top1


def test_cosine_compares_with_a_reference_model(mnist, scores):
    model, _ = scores
    assert es.evaluate(model, mnist, metric="cosine", reference=model) == pytest.approx(1.0)
    other = es.load_model("zoo:lenet300")
    assert es.evaluate(model, mnist, metric="cosine", reference=other) < 0.9
    with pytest.raises(es.ConfigError, match="pass reference=MODEL"):
        es.evaluate(model, mnist, metric="cosine")


def test_regression_trains_on_squared_error_and_keeps_the_lowest_val_mse(user_module):
    data = es.load_data(f"py:{user_module}:splits", metric="mse")
    model = es.load_model(f"py:{user_module}:mlp")
    before = es.evaluate(model, data)
    history = es.fit(model, data, epochs=20, lr=0.02, batch_size=32, progress=False)
    after = es.evaluate(model, data)
    assert after < before / 10 and history[-1]["metric"] == "mse"
    assert es.evaluate(model, data, "val") == min(h["val_accuracy"] for h in history)


def test_keep_best_picks_the_lowest_mse_when_training_diverges(user_module):
    data = es.load_data(f"py:{user_module}:splits", metric="mse")
    model = es.load_model(f"py:{user_module}:mlp")
    history = es.fit(model, data, epochs=4, lr=0.5, optimizer="sgd", momentum=0.9, progress=False)
    vals = [h["val_accuracy"] for h in history]
    assert vals.index(min(vals)) < len(vals) - 1  # the last epoch is not the best
    assert es.evaluate(model, data, "val") == min(vals)


def test_a_py_metric_function(user_module):
    data = es.load_data(f"py:{user_module}:splits")
    model = es.load_model(f"py:{user_module}:mlp")
    metric = get_metric(f"py:{user_module}:mae")
    assert not metric.higher_is_better and metric.loss == "mse"
    with torch.no_grad():
        expected = float((model(data.test.x[:]).reshape(-1) - data.test.y[:]).abs().mean())
    value = es.evaluate(model, data, metric=f"py:{user_module}:mae")
    assert value == pytest.approx(expected, rel=1e-5)
    with pytest.raises(es.ConfigError, match="has no callable 'absent'"):
        get_metric(f"py:{user_module}:absent")


def test_recipe_metric_keys_are_validated():
    base = {"name": "m", "model": "zoo:lenet300"}
    assert Recipe.from_dict({**base, "data": {"metric": "top5"}}).data.metric == "top5"
    with pytest.raises(es.ConfigError, match=r"data: .*unknown metric 'top-3'"):
        Recipe.from_dict({**base, "data": {"metric": "top-3"}})
    with pytest.raises(es.ConfigError, match="text source is scored by the model's own metric"):
        Recipe.from_dict({**base, "data": {"source": "text:stdlib", "metric": "top1"}})
    with pytest.raises(es.ConfigError, match="'image_size' applies to image folders"):
        Recipe.from_dict({**base, "data": {"source": "mnist", "image_size": 14}})


def test_recipe_hash_of_old_recipes_is_unchanged_and_ignores_workers():
    """The data keys added for streaming and metrics do not change the hash of a recipe that
    does not use them (its run directories still resume); num_workers never changes it."""
    recipe = {
        "name": "h",
        "model": "zoo:lenet300",
        "data": {"source": "mnist", "max_train": 300},
        "train": {"epochs": 1},
        "stages": [{"prune": {"method": "magnitude", "sparsity": 0.9}, "finetune": {"epochs": 1}}],
    }
    r = Recipe.from_dict(recipe)
    assert (r.prefix_hash(0), r.prefix_hash(1)) == ("37ee4b922229f31e", "34c76e28b64d5ebb")
    workers = Recipe.from_dict({**recipe, "data": {**recipe["data"], "num_workers": 3}})
    assert workers.prefix_hash(1) == r.prefix_hash(1)
    top5 = Recipe.from_dict({**recipe, "data": {**recipe["data"], "metric": "top5"}})
    assert top5.prefix_hash(0) != r.prefix_hash(0)


def test_pipeline_regression_rows_report_and_cli(tmp_path, user_module, capsys):
    recipe = {
        "name": "regression",
        "model": f"py:{user_module}:mlp",
        "data": {"source": f"py:{user_module}:splits", "metric": "mse"},
        "train": {"epochs": 4, "lr": 0.01, "batch_size": 32},
        "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}, "finetune": {"epochs": 2}}],
    }
    result = es.run_recipe(Recipe.from_dict(recipe), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["metric"] for r in rows] == ["mse", "mse"]
    assert all(r["higher_is_better"] is False and r["accuracy"] >= 0 for r in rows)
    text = build_markdown(rows, "regression")
    assert "| MSE |" in text and f"MSE {format_value('mse', rows[1]['accuracy'], 1)}" in text
    assert result.model is not None

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    from edgeslim.cli import main

    model_file = tmp_path / "run" / "stage-1" / "model.pt2"
    assert main(["evaluate", str(model_file), "--data", str(tmp_path / "r.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"test MSE of {model_file}" in out
    assert format_value("mse", rows[1]["accuracy"]) in out


def test_pipeline_cosine_to_the_baseline_survives_a_resume(tmp_path, mnist):
    recipe = Recipe.from_dict(
        {
            "name": "cos",
            "model": "zoo:lenet300",
            "data": {"source": "mnist", "max_train": 300, "metric": "cosine"},
            "train": {"epochs": 1},
            "stages": [
                {"prune": {"method": "magnitude", "sparsity": 0.5}},
                {"prune": {"method": "magnitude", "sparsity": 0.9}},
            ],
        }
    )
    out = tmp_path / "run"
    es.run_recipe(recipe, out, progress=False)
    rows = read_metrics(out)
    assert rows[0]["accuracy"] == pytest.approx(1.0) and rows[0]["metric"] == "cosine"
    assert 1.0 > rows[1]["accuracy"] > rows[2]["accuracy"]
    import shutil

    shutil.rmtree(out / "stage-2")
    es.run_recipe(recipe, out, progress=False)  # resumes after stage 1: the baseline reloaded
    again = read_metrics(out)
    assert again[2]["accuracy"] == rows[2]["accuracy"]


def test_report_display_of_each_metric():
    assert display("top1")[2] == "accuracy" and display("accuracy")[0] == "%"
    assert display("perplexity")[:2] == ("ppl", False)
    assert display("py:m:f", higher_is_better=False) == ("", False, "py:m:f")
    assert format_value("top5", 0.9876) == "98.76%" and format_value("mse", 0.012345) == "0.01235"
    assert json.loads(json.dumps(display("embedding_cosine"))) == ["%", True, "embedding_cosine"]
