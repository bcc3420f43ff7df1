"""Deep Compression in the pipeline: prune -> share -> pack, metrics, resume, shipped recipes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import edgeslim as es
from edgeslim.codec import restorable_state

RECIPE = {
    "name": "dc-small",
    "seed": 2,
    "model": "zoo:lenet300",
    "data": {"source": "mnist", "max_train": 300},
    "train": {"epochs": 2, "lr": 0.002},
    "stages": [
        {"prune": {"method": "magnitude", "layer_sparsity": {"fc*": 0.9}}},
        {
            "share": {"method": "kmeans", "bits": {"linear": 4}},
            "finetune": {"epochs": 1, "lr": 0.001},
        },
        {"pack": {"index_bits": "auto"}},
    ],
}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dc")
    es.run_recipe(es.Recipe.from_dict(RECIPE), out, progress=False)
    return out


def test_pack_stage_row_is_the_real_slim_file(run):
    out = run
    base, pruned, shared, packed = _rows(out)
    assert [r["stage"] for r in (base, pruned, shared, packed)] == [
        "baseline",
        "prune",
        "share",
        "pack",
    ]
    assert base["size_bytes"] == (out / "stage-0" / "weights.dense.safetensors").stat().st_size
    assert packed["format"] == "slim" and packed["file"] == "model.slim"
    assert packed["size_bytes"] == (out / "stage-3" / "model.slim").stat().st_size
    assert packed["size_bytes"] < pruned["size_bytes"] / 4 < base["size_bytes"] / 20
    # sharing keeps the nonzero weights (plus 16 centroids a layer) and the accuracy it had
    assert shared["nonzero_params"] == pruned["nonzero_params"] + 3 * 16
    assert packed["accuracy"] == shared["accuracy"]
    streams = packed["log"]["streams"]
    assert {s["codec"] for s in streams} <= {"huffman", "ans"}
    assert all(s["bytes"] == min(s["sizes"].values()) for s in streams)
    # the .slim file restores exactly the weights of the stage's exact state
    state = load_file(str(out / "stage-3" / "state.safetensors"))
    restored = es.unpack(out / "stage-3" / "model.slim")
    for name, t in restorable_state(restored).items():
        assert torch.equal(t, state[name]), name
    assert (
        es.evaluate(es.load_model(out / "stage-3" / "model.slim"), es.load_data("mnist"))
        == (packed["accuracy"])
    )


def test_resume_after_share_reloads_the_shared_model_bitwise(run, tmp_path):
    out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "stage-3")
    shutil.rmtree(copy / "stage-2")
    again = es.run_recipe(es.Recipe.from_dict(RECIPE), copy, progress=False)
    assert again.resumed_from == 1
    for stage in ("stage-2", "stage-3"):
        a = load_file(str(out / stage / "state.safetensors"))
        b = load_file(str(copy / stage / "state.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "stage-3" / "model.slim").read_bytes() == (
        copy / "stage-3" / "model.slim"
    ).read_bytes()
    shutil.rmtree(copy / "stage-3")
    resumed = es.run_recipe(es.Recipe.from_dict(RECIPE), copy, progress=False)
    assert resumed.resumed_from == 2  # the shared model came back from state.safetensors
    assert (copy / "stage-3" / "model.slim").read_bytes() == (
        out / "stage-3" / "model.slim"
    ).read_bytes()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"share": {"bits": 4}}, r"stages\[0\]\.share: must be a mapping with a 'method'"),
        ({"share": {"method": "pq"}}, r"stages\[0\]\.share\.method: unknown sharing method"),
        ({"share": {"method": "kmeans", "bitz": 4}}, r"stages\[0\]\.share\.bitz: unknown key"),
        ({"share": {"method": "hash", "ratio": 2}}, r"stages\[0\]\.share\.ratio"),
        ({"pack": {"codecs": ["zstd"]}}, r"stages\[0\]\.pack\.codecs\[0\]"),
        ({"pack": {"index_bits": "best"}}, r"stages\[0\]\.pack\.index_bits"),
    ],
)
def test_share_and_pack_stage_validation(body, message):
    with pytest.raises(es.ConfigError, match=message):
        es.Recipe.from_dict({**RECIPE, "stages": [body]})


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
def test_shipped_deep_compression_recipes_validate(net):
    root = Path(__file__).resolve().parents[1]
    recipe = es.Recipe.from_yaml(root / "recipes" / f"deep_compression_{net}.yaml")
    assert [s.kind for s in recipe.stages] == ["prune", "share", "pack"]
    han = es.Recipe.from_yaml(root / "recipes" / f"han2015_{net}.yaml")
    assert recipe.prefix_hash(1) == han.prefix_hash(1)  # the same pruning as Han et al. 2015


def test_hashed_share_stage_resumes_with_its_hashed_layers(tmp_path):
    recipe = {
        "name": "hash-small",
        "seed": 1,
        "model": "zoo:lenet300",
        "data": {"source": "mnist", "max_train": 200},
        "train": {"epochs": 1},
        "stages": [
            {"share": {"method": "hash", "ratio": 0.125}, "finetune": {"epochs": 1}},
            {"pack": {}},
        ],
    }
    out = tmp_path / "run"
    es.run_recipe(es.Recipe.from_dict(recipe), out, progress=False)
    first = (out / "stage-2" / "model.slim").read_bytes()
    shutil.rmtree(out / "stage-2")
    again = es.run_recipe(es.Recipe.from_dict(recipe), out, progress=False)
    assert again.resumed_from == 1 and isinstance(again.model.fc1, es.HashedLinear)
    assert (out / "stage-2" / "model.slim").read_bytes() == first
    assert _rows(out)[1]["params"] == 29_400 + 3_750 + 125 + 410


def test_pack_stage_encodes_the_model_once(tmp_path, monkeypatch):
    """The stage's log and its ``model.slim`` come from one encoding, and agree."""
    from edgeslim.codec import packer

    calls = []
    encode = packer.encode_model

    def counting(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(packer, "encode_model", counting)
    recipe = {
        "name": "pack-once",
        "seed": 0,
        "model": "zoo:lenet300",
        "data": {"source": "mnist", "max_train": 200},
        "stages": [{"prune": {"method": "magnitude", "sparsity": 0.9}}, {"pack": {}}],
    }
    out = tmp_path / "run"
    es.run_recipe(es.Recipe.from_dict(recipe), out, progress=False)
    assert len(calls) == 1
    packed = _rows(out)[2]
    assert packed["format"] == "slim"
    assert packed["size_bytes"] == packed["log"]["size_bytes"]
    assert packed["size_bytes"] == (out / "stage-2" / "model.slim").stat().st_size
