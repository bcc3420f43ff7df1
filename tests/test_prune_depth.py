"""Depth pruning: residual blocks found by tracing, removed, chosen by damage per cost."""

import shutil

import pytest
import torch
import yaml
from torch import nn

import edgeslim as es
from edgeslim.prune import DepthPrune, MagnitudePrune, prune_
from edgeslim.prune.budget import count_macs
from edgeslim.prune.depth import Bypass, residual_blocks


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _silence_branch_(bn: nn.BatchNorm2d) -> None:
    """Make a residual branch output exact zeros: its last BatchNorm's scale and shift 0."""
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()


def test_residual_blocks_are_found_with_what_they_reduce_to():
    found = residual_blocks(es.load_model("zoo:resnet8"))
    assert list(found) == ["layers.0"] and found["layers.0"].relu  # relu(x + f(x))
    found = residual_blocks(es.load_model("zoo:mobilenetv2"))
    assert list(found) == ["blocks.0", "blocks.2", "blocks.4", "blocks.6"]
    assert not any(b.relu for b in found.values())  # x + f(x)
    assert residual_blocks(es.load_model("zoo:mobilenetv1")) == {}  # no skip: nothing to remove
    plain = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())  # same shapes, no skip
    assert residual_blocks(nn.Sequential(plain, plain)) == {}
    kept = residual_blocks(es.load_model("zoo:mobilenetv2"), ignore=["blocks.[02]"])
    assert list(kept) == ["blocks.4", "blocks.6"]


@pytest.mark.parametrize(
    ("net", "block", "last_bn"),
    [("resnet8", "layers.0", "layers.0.bn2"), ("mobilenetv2", "blocks.4", "blocks.4.block.2.1")],
)
def test_removing_a_silent_block_keeps_outputs_and_shapes(net, block, last_bn):
    torch.manual_seed(0)
    model = es.load_model(f"zoo:{net}").eval()
    _silence_branch_(model.get_submodule(last_bn))  # the block is now identity-equivalent
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    params, macs = _params(model), count_macs(model, x)
    block_params = _params(model.get_submodule(block))
    got = prune_(model, DepthPrune(blocks=1), example=x)
    assert got == {block: 1.0}  # zero damage: chosen first whatever it saves
    assert isinstance(model.get_submodule(block), Bypass)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert _params(model) == params - block_params
    assert count_macs(model, x) < macs


def test_macs_target_and_impossible_budgets():
    x = torch.randn(8, 1, 28, 28)
    model = es.load_model("zoo:mobilenetv2")
    dense = count_macs(model, x)
    removed = prune_(model, DepthPrune(macs=0.6), example=x)
    assert count_macs(model, x) <= 0.6 * dense and len(removed) >= 2
    with pytest.raises(es.ConfigError, match=r"keeps 0\.6\d of the MACs, not 0.5"):
        prune_(es.load_model("zoo:resnet8"), DepthPrune(macs=0.5), example=x)
    with pytest.raises(es.ConfigError, match=r"1 removable residual block.*fewer than blocks=2"):
        prune_(es.load_model("zoo:resnet8"), DepthPrune(blocks=2), example=x)


def test_latency_cost_in_both_runtimes_and_names():
    x = torch.randn(8, 1, 28, 28)
    for runtime in ("torch", "onnxruntime"):
        model = es.load_model("zoo:resnet8")
        cfg = DepthPrune(blocks=1, cost="latency", runtime=runtime, repeats=3)
        assert prune_(model, cfg, example=x) == {"layers.0": 1.0}
    model = es.load_model("zoo:mobilenetv2")
    prune_(model, DepthPrune(names=["blocks.6", "blocks.2"]), example=x)
    assert list(residual_blocks(model)) == ["blocks.0", "blocks.4"]
    assert model(x).shape == (8, 10)


def test_depth_validation_errors():
    with pytest.raises(ValueError, match="exactly one"):
        DepthPrune()
    with pytest.raises(ValueError, match="exactly one"):
        DepthPrune(blocks=1, macs=0.5)
    with pytest.raises(ValueError, match="empty"):
        DepthPrune(names=[])
    with pytest.raises(ValueError):
        DepthPrune(blocks=0)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(es.ConfigError, match=r"\['stem'\] are not removable.*layers\.0"):
        prune_(es.load_model("zoo:resnet8"), DepthPrune(names=["stem"]), example=x)
    with pytest.raises(es.ShapeError, match="needs inputs"):
        prune_(es.load_model("zoo:resnet8"), DepthPrune(blocks=1))
    masked = es.load_model("zoo:resnet8")
    prune_(masked, MagnitudePrune(sparsity=0.5))
    with pytest.raises(es.ConfigError, match="remove_masks_"):
        prune_(masked, DepthPrune(blocks=1), example=x)
    model = es.load_model("zoo:resnet8")
    with pytest.raises(es.ConfigError, match="fewer than"):  # filter_fn keeps the only block
        prune_(model, DepthPrune(blocks=1), example=x, filter_fn=lambda m, n: n != "layers.0")


def test_depth_stage_resumes_by_replaying_the_removal(tmp_path):
    body = {
        "name": "depth",
        "model": "zoo:resnet8",
        "data": {"max_train": 64},
        "train": {"epochs": 1},
        "stages": [
            {"prune": {"method": "depth", "blocks": 1, "samples": 16}},
            {"prune": {"method": "magnitude", "sparsity": 0.5}},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    first = es.run_recipe(path, tmp_path / "run", progress=False)
    removed = list(first.rows[1]["log"]["result"])  # the verb's log: {block: 1.0}
    assert removed == ["layers.0"] and all(
        isinstance(first.model.get_submodule(n), Bypass) for n in removed
    )
    shutil.rmtree(tmp_path / "run" / "stage-2")  # as if killed during the last stage
    again = es.run_recipe(path, tmp_path / "run", progress=False)
    assert again.resumed_from == 1
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
