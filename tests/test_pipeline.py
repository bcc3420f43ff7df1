import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import edgeslim as es
from edgeslim.pipeline.stages.base import STAGE_KINDS
from repro_helpers import assert_same_run

SMALL = {
    "name": "small",
    "seed": 3,
    "model": "zoo:lenet300",
    "data": {"source": "mnist", "max_train": 400},
    "train": {"epochs": 2, "lr": 0.002},
    "stages": [
        {"prune": {"method": "magnitude", "sparsity": 0.5}, "finetune": {"epochs": 1}},
        {
            "name": "to 80%",
            "prune": {"method": "magnitude", "layer_sparsity": {"fc*": 0.8}, "steps": 2},
            "finetune": {"epochs": 1, "lr": 0.001},
        },
    ],
}
ROW_KEYS = {"stage", "accuracy", "params", "nonzero_params", "macs", "size_bytes", "format"}


def _recipe(**changes) -> dict:
    r = json.loads(json.dumps(SMALL))
    r.update(changes)
    return r


# -------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modle": "zoo:lenet5"}, r"modle: unknown key"),
        ({"train": {"epochs": "ten"}}, r"train\.epochs: .*integer"),
        ({"train": {"epochz": 3}}, r"train\.epochz: unknown key"),
        ({"train": {"lr": -1}}, r"train\.lr: .*greater than 0"),
        ({"data": {"source": "mnist", "max_train": 0}}, r"data\.max_train"),
        ({"seed": "x"}, r"seed: .*integer"),
        ({"stages": {"prune": {}}}, r"stages: must be a list"),
        ({"stages": ["prune"]}, r"stages\[0\]: a stage must be a mapping"),
        ({"stages": [{"teleport": {}}]}, r"stages\[0\]\.teleport: unknown stage kind"),
        ({"stages": [{"prune": {"method": "magic"}}]}, r"stages\[0\]\.prune\.method: unknown"),
        (
            {"stages": [{"prune": {"method": "magnitude", "sparsty": 0.5}}]},
            r"stages\[0\]\.prune\.sparsty: unknown key",
        ),
        (
            {"stages": [{"prune": {"method": "magnitude", "sparsity": 1.5}}]},
            r"stages\[0\]\.prune\.sparsity: .*less than 1",
        ),
        (
            {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5, "steps": 0}}]},
            r"stages\[0\]\.prune\.steps",
        ),
        (
            {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}, "finetune": 3}]},
            r"stages\[0\]\.finetune",
        ),
        (
            {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}, "extra": 1}]},
            r"stages\[0\]: a stage needs exactly one stage kind",
        ),
    ],
)
def test_malformed_recipe_names_the_key_path(change, message):
    with pytest.raises(es.ConfigError, match=message):
        es.Recipe.from_dict(_recipe(**change))


def test_recipe_missing_required_and_not_a_mapping(tmp_path):
    bad = _recipe()
    del bad["model"]
    with pytest.raises(es.ConfigError, match="model: required key is missing"):
        es.Recipe.from_dict(bad)
    with pytest.raises(es.ConfigError, match="must be a mapping"):
        es.Recipe.from_dict(["not", "a", "mapping"])
    path = tmp_path / "r.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(es.ConfigError, match="not valid YAML"):
        es.Recipe.from_yaml(path)
    with pytest.raises(es.ConfigError, match="does not exist"):
        es.Recipe.from_yaml(tmp_path / "missing.yaml")
    path.write_text(yaml.safe_dump(_recipe(train={"epochz": 1})))
    with pytest.raises(es.ConfigError, match=r"r\.yaml:\ntrain\.epochz: unknown key"):
        es.Recipe.from_yaml(path)


def test_recipe_round_trips_through_yaml():
    r = es.Recipe.from_dict(_recipe())
    again = es.Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()
    assert again.prefix_hash(2) == r.prefix_hash(2)
    assert r.prefix_hash(1) != r.prefix_hash(2)


_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_every_technique_ships_recipes():
    assert len(_RECIPES) >= 18
    assert {"han2015_lenet300.yaml", "deep_compression_lenet5.yaml", "lowrank_lenet5.yaml",
            "int8_ptq_lenet5.yaml", "wanda_minilm.yaml"} <= {p.name for p in _RECIPES}  # fmt: skip


@pytest.mark.parametrize("path", _RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    import edgeslim.pipeline.stages  # noqa: F401  (registers every stage kind)

    r = es.Recipe.from_yaml(path)  # every stage body is parsed by its kind's validator
    assert r.stages and all(s.kind in STAGE_KINDS for s in r.stages)
    assert es.Recipe.from_dict(yaml.safe_load(r.to_yaml())).to_yaml() == r.to_yaml()


# -------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = es.run_recipe(es.Recipe.from_dict(_recipe()), out, progress=False)
    return out, result


def test_run_writes_stages_metrics_and_report(small_run):
    out, result = small_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["baseline", "prune", "prune"]
    for row in rows:
        assert set(row) >= ROW_KEYS and "latency_ms" in row
        assert 0 <= row["accuracy"] <= 1 and row["latency_ms"] > 0
    base, mid, last = rows
    # the baseline is the dense fp32 weights file; its size is that file's size
    assert base["format"] == "dense" and base["nonzero_params"] == base["params"] == 266_610
    assert base["size_bytes"] == (out / "stage-0" / "weights.dense.safetensors").stat().st_size
    assert base["size_bytes"] > 4 * 266_610
    # 80% of the fc weights pruned: nonzeros = 20% of 266,200 weights + 410 biases
    assert last["nonzero_params"] == round(0.2 * 235_200) + round(0.2 * 30_000) + 200 + 410
    assert last["format"] == "sparse"
    assert last["size_bytes"] == (out / "stage-2" / "weights.sparse.safetensors").stat().st_size
    assert last["size_bytes"] < base["size_bytes"] / 2
    assert last["effective_macs"] < mid["effective_macs"] < base["effective_macs"]
    assert (out / "report.md").is_file()
    assert (out / "plots" / "accuracy_vs_size.png").stat().st_size > 1000
    assert (out / "plots" / "layer_sparsity.png").stat().st_size > 1000
    assert "stage-2 to 80%" in (out / "report.md").read_text()
    assert result.resumed_from is None and len(result.rows) == 3


def test_stage_model_reloads_with_the_recorded_accuracy(small_run, mnist):
    out, _ = small_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model = es.load_model(out / "stage-2" / "model.pt2")
    assert es.evaluate(model, mnist) == rows[2]["accuracy"]


def test_rerun_resumes_and_changes_nothing(small_run):
    out, first = small_run
    before = (out / "stage-2" / "state.safetensors").read_bytes()
    again = es.run_recipe(es.Recipe.from_dict(_recipe()), out, progress=False)
    assert again.resumed_from == 2
    assert (out / "stage-2" / "state.safetensors").read_bytes() == before
    for a, b in zip(
        first.model.state_dict().values(), again.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_different_recipe_in_same_dir_is_refused(small_run):
    out, _ = small_run
    other = _recipe(seed=4)
    with pytest.raises(es.RunDirError, match="different recipe"):
        es.run_recipe(es.Recipe.from_dict(other), out, progress=False)


def test_corrupt_stage_checkpoint_is_a_checkpoint_error(small_run, tmp_path):
    out, _ = small_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    state = copy / "stage-2" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    state.write_bytes(bytes(data))
    with pytest.raises(es.CheckpointError, match=r"stage-2.*sha256"):
        es.run_recipe(es.Recipe.from_dict(_recipe()), copy, progress=False)
    (copy / "stage-2" / "meta.json").write_text("{not json")
    with pytest.raises(es.CheckpointError, match=r"stage-2.*corrupt"):
        es.run_recipe(es.Recipe.from_dict(_recipe()), copy, progress=False)


# -------------------------------------------------------------------------- kill and resume


def _compress(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "EDGESLIM_QUIET": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgeslim.cli", "compress", str(recipe), "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_sigkill_then_resume_gives_bitwise_identical_weights_and_files(tmp_path):
    slow = _recipe()
    slow["stages"][1]["finetune"]["epochs"] = (
        40  # stage 2 runs long enough (seconds) to be killed in
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(slow))

    straight = _compress(recipe, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()

    out = tmp_path / "killed"
    proc = _compress(recipe, out)
    deadline = time.time() + 600
    while not (out / "stage-1").exists():  # wait until stage 2 is under way
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stage-2").exists(), "stage 2 finished before the kill; test is void"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    resumed = _compress(recipe, out)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    a = load_file(str(tmp_path / "straight" / "stage-2" / "state.safetensors"))
    b = load_file(str(out / "stage-2" / "state.safetensors"))
    assert a.keys() == b.keys()
    differ = {
        k: f"{int((a[k] != b[k]).sum())} of {a[k].numel()} differ, max |d| "
        f"{float((a[k].double() - b[k].double()).abs().max()):.3g}"
        for k in a
        if not torch.equal(a[k], b[k])
    }
    assert not differ, f"resumed weights differ from the straight run's: {differ}"
    assert not list(out.glob(".stage-*"))  # the interrupted stage's temporary is gone
    # every file of the run directory, byte for byte: state, deployable weights and .pt2 of
    # every stage, plots, recipe; meta.json and metrics.jsonl but for measured times
    assert_same_run(tmp_path / "straight", out)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_every_public_config_refuses_bad_input_with_config_error():
    from edgeslim.core.options import Options

    configs = []
    for name in sorted(es._LAZY):
        obj = getattr(es, name)
        if isinstance(obj, type) and issubclass(obj, Options):
            configs.append(obj)
    assert len(configs) >= 20, [c.__name__ for c in configs]
    for cls in configs:
        with pytest.raises(es.ConfigError, match=rf"(?m)^{cls.__name__}\.bogus: unknown key"):
            cls(bogus=1)
    with pytest.raises(es.ConfigError, match=r"^KD\.temperature: Input should be greater"):
        es.KD(temperature=0)
    with pytest.raises(es.ConfigError, match=r"^MagnitudePrune: give exactly one"):
        es.MagnitudePrune(sparsity=0.5, layer_sparsity={"fc1": 0.5})


# ------------------------------------------------------- the pipeline owns stage fine-tuning


def test_share_stage_fine_tunes_with_the_teacher_when_it_distils(tmp_path, monkeypatch):
    """Regression: the share stage fine-tuned itself and forgot ``teacher=``."""
    import edgeslim.pipeline.runner as runner

    seen = []
    real = runner.finetune

    def spy(model, data, cfg, *, teacher=None, **kw):
        seen.append((cfg.distill is not None, teacher is not None))
        return real(model, data, cfg, teacher=teacher, **kw)

    monkeypatch.setattr(runner, "finetune", spy)
    recipe = _recipe(
        train={"epochs": 1},
        stages=[
            {
                "share": {"method": "kmeans", "bits": 3},
                "finetune": {"epochs": 1, "distill": {"temperature": 4, "alpha": 0.7}},
            }
        ],
    )
    result = es.run_recipe(es.Recipe.from_dict(recipe), tmp_path / "run", progress=False)
    assert seen == [(True, True)]
    log = result.rows[1]["log"]
    assert {"layers", "finetune", "val_before_finetune", "val_after_finetune"} <= set(log)
