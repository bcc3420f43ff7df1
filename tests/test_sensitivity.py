"""Sensitivity curves, the ratios derived from them, the stage kinds and the CLI command."""

import json
import shutil

import pytest
import torch
import yaml

import edgeslim as es
from edgeslim.core.data.text import english_sentences
from edgeslim.prune import ChannelPrune, Sensitivity, prune_, sensitivity
from edgeslim.prune.budget import count_macs
from test_cli import _cli


def test_derived_ratios_from_hand_made_curves():
    sens = Sensitivity(
        "unstructured", "accuracy", 0.9, [0.25, 0.5, 0.75],
        {"a": [0.9, 0.88, 0.5], "b": [0.85, 0.6, 0.3]}, {"a": 300, "b": 100},
    )  # fmt: skip
    assert sens.drop("a", 0.5) == pytest.approx(0.02)
    assert sens.drop("b", 0.125) == pytest.approx(0.025)  # interpolated from (0, 0)
    got = sens.ratios_for_drop(0.02)
    assert got["a"] == pytest.approx(0.5) and got["b"] == pytest.approx(0.1)
    target = sens.ratios_for_sparsity(0.4)
    removed = sum(sens.sizes[k] * r for k, r in target.items()) / 400
    assert 0.4 <= removed < 0.42 and target["a"] > target["b"]
    with pytest.raises(es.ConfigError, match="max_drop"):
        sens.ratios_for_drop(-0.1)


def test_unstructured_and_channel_sensitivity_leave_the_model_as_it_was(mnist, tmp_path):
    data = mnist.limit(600)
    model = es.load_model("zoo:lenet300")
    es.fit(model, data, epochs=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sens = sensitivity(model, data, ratios=(0.5, 0.9, 0.99))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert list(sens.curves) == ["fc1", "fc2", "fc3"] and sens.sizes["fc1"] == 235_200
    assert sens.curves["fc1"][0] > sens.curves["fc1"][2]  # more pruning, lower accuracy
    assert sens.curves["fc1"][1] > sens.curves["fc3"][1]  # fc1 is the redundant one
    ratios = sens.ratios_for_sparsity(0.8)
    assert ratios["fc1"] > ratios["fc3"]
    assert sens.plot(tmp_path / "s.png").stat().st_size > 1000
    fidelity = sensitivity(model, data, ratios=(0.5,), metric="fidelity")
    assert 0.9 < fidelity.curves["fc1"][0] <= 1.0 and fidelity.baseline == pytest.approx(1.0)

    cnn = es.load_model("zoo:resnet8")
    es.fit(cnn, data.limit(300), epochs=1)
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    sens = sensitivity(cnn, data, kind="channel", ratios=(0.5, 0.9))
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in state.items())
    assert sens.kind == "channel" and "stem.0" in sens.curves and sens.sizes["stem.0"] == 16
    with pytest.raises(es.ConfigError, match="ratios must be in"):
        sensitivity(cnn, data, ratios=(0.5, 1.0))


@pytest.mark.slow
def test_channel_prune_from_sensitivity_hits_a_macs_target(mnist):
    data = mnist.limit(300)
    model = es.load_model("zoo:resnet8")
    es.fit(model, data, epochs=1)
    x = data.example()
    dense = count_macs(model, x)
    cfg = ChannelPrune(macs=0.5, allocation="sensitivity")
    got = prune_(model, cfg, example=x, data=data)["removed"]
    assert 0.4 < count_macs(model, x) / dense <= 0.5
    assert len(set(round(r, 2) for r in got.values())) > 1  # not uniform


def test_english_sentences_are_deterministic_prose():
    first = english_sentences(50)
    assert first == english_sentences(50) and len(english_sentences()) > 500
    assert all(s[0].isupper() and s.endswith(".") and ">>>" not in s for s in first)
    assert all(6 <= len(s.split()) <= 40 for s in first)
    assert es.english_sentences(3) == first[:3]


def _recipe(tmp_path, stages):
    body = {
        "name": "t",
        "model": "zoo:resnet8",
        "data": {"max_train": 200},
        "train": {"epochs": 1},
        "stages": stages,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_prune_stage_methods_and_schedules(tmp_path, mnist):
    path = _recipe(
        tmp_path,
        [
            {"prune": {"method": "channel", "ratio": 0.5, "round_to": 4}},
            {"prune": {"method": "obd", "sparsity": 0.5, "samples": 32, "agp": {"every": 2}},
             "finetune": {"epochs": 1}},
            {"prune": {"method": "nm", "n": 2, "m": 4, "exclude": ["stem.0"]}},
        ],
    )  # fmt: skip
    result = es.run_recipe(path, tmp_path / "run")
    rows = result.rows
    assert rows[1]["params"] < 0.35 * rows[0]["params"]  # channels really removed
    assert rows[1]["notes"] == [] and rows[3]["notes"]
    assert "agp" in rows[2]["log"] and rows[2]["nonzero_params"] < 0.6 * rows[1]["params"]
    assert any("gain no speed" in n for n in rows[3]["notes"])
    assert "gain no speed" in (tmp_path / "run" / "report.md").read_text()


def test_prune_stage_validation(tmp_path):
    bad = [
        ({"prune": {"method": "channel", "ratio": 0.5, "steps": 2}}, "prunes in one step"),
        ({"prune": {"method": "magnitude", "quality": 1.0, "agp": {}}}, "agp: AGP needs"),
        ({"prune": {"method": "obd", "sparsity": 0.5, "steps": 2, "agp": {}}}, "not both"),
        ({"prune": {"method": "channel", "ratio": 0.5, "colour": 1}}, "colour: unknown key"),
    ]
    for stage, message in bad:
        with pytest.raises(es.ConfigError, match=message):
            es.Recipe.from_yaml(_recipe(tmp_path, [stage]))


def test_cli_sensitivity_prints_curves_and_writes_json(tmp_path):
    out = tmp_path / "s.json"
    proc = _cli(
        "sensitivity", "zoo:lenet300", "--ratios", "0.5,0.9", "--max-drop", "0.01",
        "--json", out, "--plot", tmp_path / "s.png",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fc1" in proc.stdout and "per-layer ratios" in proc.stdout
    body = json.loads(out.read_text())
    assert set(body["curves"]) == {"fc1", "fc2", "fc3"} and set(body["derived"]) == {
        "fc1", "fc2", "fc3"
    }  # fmt: skip
    assert (tmp_path / "s.png").stat().st_size > 1000
    proc = _cli("sensitivity", "zoo:lenet300", "--ratios", "0.5,2")
    assert proc.returncode == 2 and "ratios must be in (0, 1)" in proc.stderr


def test_resume_after_a_channel_stage_replays_the_cut(tmp_path):
    body = {
        "name": "resume",
        "model": "zoo:lenet5",
        "data": {"max_train": 200},
        "train": {"epochs": 1},
        "stages": [
            {"prune": {"method": "channel", "ratio": 0.5}},
            {"prune": {"method": "magnitude", "sparsity": 0.5}},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    first = es.run_recipe(path, tmp_path / "run")
    assert first.model.conv2.out_channels == 25 and first.rows[1]["log"]["result"]["cut"]
    shutil.rmtree(tmp_path / "run" / "stage-2")  # as if killed during the last stage
    again = es.run_recipe(path, tmp_path / "run")
    assert again.resumed_from == 1 and again.model.conv2.out_channels == 25
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "name",
    [
        "channel_resnet8",
        "depth_channel_resnet8",
        "obd_lenet300",
        "obs_lenet300",
        "agp_lenet300",
        "nm24_lenet5",
    ],
)
def test_shipped_pruning_recipes_validate(name):
    from edgeslim.cli import recipe_path

    recipe = es.Recipe.from_yaml(recipe_path(name))
    assert recipe.name == name and recipe.stages[0].kind == "prune"
