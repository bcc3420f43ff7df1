"""Hardware-aware NAS: supernet, extraction, sandwich training, space optimisation,
evolution under the device's constraints, the API's budget check, the CLI, and the
deployed sub-network bit-exact in C and TFLite Micro. A tiny space keeps it fast."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import edgeslim as es
from edgeslim.core.data.datasets import DataSplits, Split
from edgeslim.core.errors import CheckpointError, ConfigError, RunDirError
from edgeslim.export.c import hostbuild
from edgeslim.nas.cost import BudgetError, SubnetCost
from edgeslim.nas.evolve import estimate_se, evolve, rank_finalists, spread_over_cells
from edgeslim.nas.extract import extract, recalibrate_bn
from edgeslim.nas.space_opt import SpaceChoice, optimize_space
from edgeslim.nas.supernet import SubnetConfig, Supernet, SupernetSpec, resize
from edgeslim.nas.train import SandwichTraining, train_supernet
from edgeslim.search.budget import Budget
from edgeslim.search.store import RunStore

TINY = SupernetSpec(
    stem=4,
    stages=((4, 1, 1), (8, 2, 2)),
    head=16,
    expands=(2, 4),
    widths=(0.5, 1.0),
    resolutions=(12, 16),
)
CLI_SPEC = ["--stages", "4:1:1,8:2:2", "--stem", "4", "--head", "8"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared, busy machine PyTorch's thread pool makes tiny ops slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _net(seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    net = Supernet(TINY).train()
    with torch.no_grad():  # BatchNorm statistics away from their initial values
        for _ in range(2):
            net(torch.rand(8, 1, 16, 16), TINY.largest())
    return net.eval()


def _data(n: int = 96) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 16, 16, generator=g)
    y = (x[:, 0, :8].mean((1, 2)) > x[:, 0, 8:].mean((1, 2))).long()  # a learnable rule
    s = Split(x, y)
    return DataSplits("tiny", s, Split(x[:32], y[:32]), Split(x[:32], y[:32]), 10)


def _configs() -> list[SubnetConfig]:
    rng = random.Random(3)
    return [TINY.largest(), TINY.smallest()] + [TINY.sample(rng) for _ in range(3)]


# ----------------------------------------------------------------------------- supernet


def test_extract_gives_plain_modules_with_the_right_shapes_and_weights():
    net = _net()
    plain = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.AdaptiveAvgPool2d, nn.Linear)
    for cfg in _configs():
        sub = extract(net, cfg).eval()
        leaves = [m for m in sub.modules() if not list(m.children())]
        assert all(isinstance(m, plain) for m in leaves), {type(m) for m in leaves}
        layers = TINY.layers(cfg)
        weights = [m.weight.numel() for m in sub.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        want = [la["cout"] * la["cin"] // la["groups"] * la["k"] ** 2 for la in layers]
        assert weights == want
        assert sub.input_shape == (1, cfg.resolution, cfg.resolution)
        assert sub(torch.rand(2, *sub.input_shape)).shape == (2, 10)


def test_extracted_subnet_equals_the_supernet_at_its_config():
    net = _net()
    for cfg in _configs():
        x = torch.rand(4, 1, cfg.resolution, cfg.resolution)
        with torch.no_grad():
            assert torch.equal(extract(net, cfg).eval()(x), net(x, cfg)), cfg.key()


def test_kernels_are_centre_crops_of_the_largest():
    net = _net()
    cfg = TINY.smallest(width=1.0)  # kernel 3 everywhere
    sub = extract(net, cfg)
    dw_small = sub.blocks[0].block[1][0].weight
    dw_full = net.stages[0][0].dw.weight  # (C, 1, 7, 7)
    assert dw_small.shape[-1] == 3
    assert torch.equal(dw_small, dw_full[: dw_small.shape[0], :, 2:5, 2:5])
    big = extract(net, TINY.largest())
    assert torch.equal(big.blocks[0].block[1][0].weight, dw_full)


FUSED = SupernetSpec(
    stem=4,
    stages=((4, 2, 1), (8, 1, 2), (8, 1, 1)),
    head=8,
    expands=(2, 4),
    fused_stages=2,
    widths=(0.5, 1.0),
    resolutions=(12, 16),
)


def _fused_net() -> Supernet:
    torch.manual_seed(1)
    net = Supernet(FUSED).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand(8, 1, 16, 16), FUSED.largest())
    return net.eval()


def test_fused_stages_extract_to_plain_fused_blocks_equal_to_the_supernet():
    from edgeslim.nas.extract import FusedInvertedResidual

    net = _fused_net()
    rng = random.Random(4)
    cfgs = [FUSED.largest(), FUSED.smallest()] + [FUSED.sample(rng) for _ in range(4)]
    for cfg in cfgs:
        sub = extract(net, cfg).eval()
        kinds = [type(b).__name__ for b in sub.blocks]
        want = ["FusedInvertedResidual"] * (cfg.depths[0] + cfg.depths[1]) + ["InvertedResidual"]
        assert kinds == want, cfg.key()
        weights = [m.weight.numel() for m in sub.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        layers = FUSED.layers(cfg)
        assert weights == [la["cout"] * la["cin"] // la["groups"] * la["k"] ** 2 for la in layers]
        x = torch.rand(3, 1, cfg.resolution, cfg.resolution)
        with torch.no_grad():
            assert torch.equal(sub(x), net(x, cfg)), cfg.key()
    # a fused block's kxk conv is the centre crop of the supernet's largest kernel
    small = extract(net, FUSED.smallest(width=1.0))
    assert isinstance(small.blocks[0], FusedInvertedResidual)
    full = net.stages[0][0].conv.weight  # (4 x 3, 4, 5, 5): fused expands 1..3, kernels 3/5
    assert full.shape == (12, 4, 5, 5)
    assert torch.equal(small.blocks[0].block[0][0].weight, full[:4, :, 1:4, 1:4])
    # the fused stages draw from their own choices; the others from expands / kernels
    for cfg in cfgs:
        FUSED.check(cfg)
        assert set(cfg.expands[0]) <= {1, 2, 3} and set(cfg.kernels[1]) <= {3, 5}
        assert set(cfg.expands[2]) <= {2, 4}
    mutated = FUSED.mutate(FUSED.largest(), random.Random(0), p=1.0)
    FUSED.check(mutated)
    bad = FUSED.canonical(FUSED.smallest())
    bad = SubnetConfig(
        bad.resolution, bad.width, bad.depths, ((4, 1), (1,), (2,)), bad.kernels
    )  # expand 4 is not a fused stage's choice
    with pytest.raises(ConfigError, match="stage 0 block 0 expand 4"):
        FUSED.check(bad)
    with pytest.raises(ConfigError, match="fused_stages"):
        SupernetSpec(fused_stages=9)
    # the spec round-trips; without fused stages its dict is the one before they existed
    assert SupernetSpec.from_dict(FUSED.to_dict()) == FUSED
    assert "fused_stages" not in TINY.to_dict()


def _export_int8_c(net, cfg, tmp_path):
    """The sub-network at ``cfg``, BN re-calibrated, Int8PTQ, exported to C for the F446 and
    checked (host build): ``export_checked``'s (verified, measured)."""
    from edgeslim.nas.api import export_checked

    sub = recalibrate_bn(extract(net, cfg), torch.rand(32, 1, 16, 16))
    calib = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    qmodel = es.quantize(sub, es.Int8PTQ(calibration="minmax"), calib=calib)
    return export_checked(
        qmodel, calib, "stm32f446", tmp_path / "c", tmp_path / "m.tflite", arm=False
    )


@pytest.mark.skipif(hostbuild.compiler() is None, reason="needs a C compiler")
def test_a_fused_subnetwork_exports_to_int8_c_bit_exact(tmp_path):
    net = _fused_net()
    cfg = FUSED.largest(resolution=16, width=1.0)
    verified, measured = _export_int8_c(net, cfg, tmp_path)
    assert "compiled C bit-exact on 32 inputs" in verified
    assert 0 < measured["sram_kb"] < 128 and measured["latency_ms"] > 0
    cost = SubnetCost(net, "stm32f446", code_bytes=0).predict(cfg)
    assert cost["macs"] == FUSED.macs(cfg)


def test_configs_outside_the_space_are_config_errors():
    good = TINY.largest()
    with pytest.raises(ConfigError, match="resolution 20"):
        TINY.check(SubnetConfig(20, 1.0, good.depths, good.expands, good.kernels))
    with pytest.raises(ConfigError, match="kernel 9"):
        TINY.check(SubnetConfig(16, 1.0, good.depths, good.expands, ((9,), (3, 3))))
    with pytest.raises(ConfigError, match="depth 3"):
        TINY.check(SubnetConfig(16, 1.0, (1, 3), good.expands, good.kernels))
    with pytest.raises(ConfigError, match="kernels must be odd"):
        SupernetSpec(kernels=(3, 4))
    assert SubnetConfig.from_dict(good.to_dict()) == good


def test_mutation_and_crossover_stay_in_the_space():
    rng = random.Random(0)
    a, b = TINY.sample(rng), TINY.sample(rng)
    for _ in range(50):
        TINY.check(TINY.mutate(a, rng, 0.5))
        c = TINY.crossover(a, b, rng)
        TINY.check(c)
        assert (c.resolution, c.width) == (a.resolution, a.width)


def test_bn_recalibration_sets_the_statistics_of_the_data():
    sub = extract(_net(), TINY.largest())
    x = torch.rand(64, 1, 16, 16) * 3 + 1
    recalibrate_bn(sub, x, batch_size=64)
    bn = sub.stem[1]
    with torch.no_grad():
        conv_out = sub.stem[0](x)
    assert torch.allclose(bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    assert not sub.training


# ----------------------------------------------------------------------------- training


def test_sandwich_training_learns_and_resumes_bit_for_bit(tmp_path):
    data = _data()
    cfg = SandwichTraining(epochs=3, batch_size=32, lr=1e-2)
    torch.manual_seed(0)
    full = Supernet(TINY)
    hist = train_supernet(full, data, cfg, checkpoint=tmp_path / "a.pt", progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    torch.manual_seed(0)
    part = Supernet(TINY)
    train_supernet(part, data, cfg, checkpoint=tmp_path / "b.pt", stop_after=1, progress=False)
    torch.manual_seed(1)  # a fresh process would start from other weights: the file decides
    resumed = Supernet(TINY)
    again = train_supernet(resumed, data, cfg, checkpoint=tmp_path / "b.pt", progress=False)
    assert [h["loss"] for h in again] == [h["loss"] for h in hist]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RunDirError, match="another supernet training"):
        train_supernet(Supernet(TINY), data, cfg.model_copy(update={"lr": 0.1}),
                       checkpoint=tmp_path / "b.pt", progress=False)  # fmt: skip


class _Payload:
    """A pickle that runs code when loaded with the full unpickler."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(PWNED).write_text('ran')".replace(
            "PWNED", repr(os.environ["EDGESLIM_PWNED"])),))  # fmt: skip


def test_a_hostile_or_corrupt_supernet_checkpoint_is_refused_and_never_run(tmp_path, monkeypatch):
    data = _data()
    cfg = SandwichTraining(epochs=1, batch_size=32)
    flag = tmp_path / "pwned"
    monkeypatch.setenv("EDGESLIM_PWNED", str(flag))
    hostile = tmp_path / "hostile.pt"
    torch.save({"meta": _Payload(), "state": {}}, hostile)
    with pytest.raises(CheckpointError, match="cannot read the supernet checkpoint"):
        train_supernet(Supernet(TINY), data, cfg, checkpoint=hostile, progress=False)
    assert not flag.exists()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt\.pt"):
        train_supernet(Supernet(TINY), data, cfg, checkpoint=corrupt, progress=False)


# ----------------------------------------------------------------------------- space, search


CELL_MACS = {(0.5, 12): 100, (0.5, 16): 200, (1.0, 12): 300, (1.0, 16): 400}


def cell_cost(cfg):
    """Costs per width x resolution cell: (1.0, 16) has the most MACs but never fits."""
    fits = (cfg.width, cfg.resolution) != (1.0, 16)
    return {"macs": CELL_MACS[(cfg.width, cfg.resolution)], "sram_kb": 1.0 if fits else 9.0}


def test_space_optimisation_picks_the_cell_with_the_most_mean_macs_that_fits():
    budget = Budget(max_sram_kb=2.0, target="stm32f446")
    choice = optimize_space(TINY, cell_cost, budget, samples=3)
    assert (choice.width, choice.resolution) == (1.0, 12)
    fit = {(r["width"], r["resolution"]): r["fit"] for r in choice.rows}
    assert fit == {(0.5, 12): 3, (0.5, 16): 3, (1.0, 12): 3, (1.0, 16): 0}
    assert "**chosen**" in choice.markdown()


def test_space_optimisation_keeps_the_top_cells_where_something_fits():
    budget = Budget(max_sram_kb=2.0, target="stm32f446")
    choice = optimize_space(TINY, cell_cost, budget, samples=2, top=4)
    assert choice.cells == [(1.0, 12), (0.5, 16), (0.5, 12)]  # best first, none that never fits
    assert (choice.width, choice.resolution) == (1.0, 12)
    assert optimize_space(TINY, cell_cost, budget, samples=2, top=2).cells == [(1.0, 12), (0.5, 16)]
    assert optimize_space(TINY, cell_cost, budget, samples=2).cells == [(1.0, 12)]  # top=1: TinyNAS
    text = choice.markdown()
    assert "| 1 | 12 **chosen** |" in text and "| 0.5 | 16 **searched (2)** |" in text
    assert "| 1 | 16 |" in text  # not searched: unmarked
    again = SpaceChoice.from_dict(json.loads(json.dumps(choice.to_dict())))
    assert again.cells == choice.cells and again.rows == choice.rows
    old = {"width": 1.0, "resolution": 12, "rows": choice.rows}  # a space.json before cells
    assert SpaceChoice.from_dict(old).cells == [(1.0, 12)]
    with pytest.raises(ConfigError, match="top must be >= 1"):
        optimize_space(TINY, cell_cost, budget, samples=2, top=0)


def test_evolution_searches_several_cells_together_deterministically(monkeypatch):
    net = _net()
    costs = SubnetCost(net, "stm32f446", code_bytes=0)
    budget = Budget(max_sram_kb=512, target="stm32f446")
    data = _data()
    state = {
        "spec": TINY.to_dict(),
        "weights": net.state_dict(),
        "bn_x": data.train.x[:32],
        "val": (data.val.x, data.val.y),
    }
    kw = dict(population=4, generations=3, parents=2, mutation=0.5, seed=0)
    cells = [(0.5, 12), (1.0, 16)]

    def run(**k):
        return evolve(TINY, lambda c: costs.cost(c, budget), budget, state, **kw, **k)

    evo = run(cells=cells)
    where = [(r["candidate"]["width"], r["candidate"]["resolution"]) for r in evo.records]
    assert set(where) == set(cells)  # both searched, nothing outside them
    assert where[:4] == [(0.5, 12), (1.0, 16), (0.5, 12), (1.0, 16)]  # first population: in turn
    assert set(where[4:]) == set(cells)  # the children too
    assert [r["key"] for r in run(cells=cells).records] == [r["key"] for r in evo.records]
    one = run(cells=[(1.0, 16)])  # one cell is the plain width / resolution search
    assert [r["key"] for r in one.records] == [
        r["key"] for r in run(width=1.0, resolution=16).records
    ]
    assert {(r["candidate"]["width"], r["candidate"]["resolution"]) for r in one.records} == {
        (1.0, 16)
    }
    with pytest.raises(ConfigError, match="width and resolution, or cells"):
        run()

    # parents only ever from the first cell (scored 1, the other 0): a child in the second
    # cell got there by a mutation that moved it
    import edgeslim.nas.evolve as ev

    def by_cell(state, job):
        return {"number": job["number"], "accuracy": float(job["config"]["width"] == 0.5)}

    monkeypatch.setattr(ev, "accuracy_job", by_cell)
    moved = evolve(TINY, lambda c: costs.cost(c, budget), budget, state, cells=cells,
                   **{**kw, "generations": 8}).records[4:]  # fmt: skip
    assert {(r["candidate"]["width"], r["candidate"]["resolution"]) for r in moved} == set(cells)


def test_evolution_keeps_to_the_budget_and_resumes_from_its_store(tmp_path):
    net = _net()
    costs = SubnetCost(net, "stm32f446", code_bytes=0)
    small, large = costs.predict(TINY.smallest(16, 1.0)), costs.predict(TINY.largest())
    limit = (small["sram_plain_kb"] + large["sram_plain_kb"]) / 2
    budget = Budget(max_sram_kb=limit, target="stm32f446")
    data = _data()
    state = {
        "spec": TINY.to_dict(),
        "weights": net.state_dict(),
        "bn_x": data.train.x[:32],
        "val": (data.val.x, data.val.y),
    }
    kwargs = dict(width=1.0, resolution=16, population=4, generations=2, parents=2, seed=0)
    store = RunStore(tmp_path, {"test": 1})
    evo = evolve(TINY, lambda c: costs.cost(c, budget), budget, state, store=store, **kwargs)
    scored = [r for r in evo.records if r["accuracy"] is not None]
    assert scored and all(r["cost"]["sram_kb"] <= limit for r in scored)
    assert any(not r["feasible"] for r in evo.records)  # some were refused by the planner
    assert all(r["accuracy"] is None for r in evo.records if not r["feasible"])
    assert evo.best()["feasible"]

    def boom(*_a):
        raise AssertionError("a resumed search re-evaluated a stored sub-network")

    import edgeslim.nas.evolve as ev

    saved, ev.accuracy_job = ev.accuracy_job, boom
    try:
        again = evolve(TINY, lambda c: costs.cost(c, budget), budget, state, store=store, **kwargs)
    finally:
        ev.accuracy_job = saved
    assert [(r["key"], r["accuracy"]) for r in again.records] == [
        (r["key"], r["accuracy"]) for r in evo.records
    ]


def test_a_latency_bound_refuses_without_planning():
    costs = SubnetCost(_net(), "stm32f446", code_bytes=0)
    cfg = TINY.largest()
    bound = costs.bounds(cfg)["latency_ms"]
    tight = Budget(max_latency_ms=bound / 2, max_sram_kb=128, target="stm32f446")
    cost = costs.cost(cfg, tight)
    assert cost["tier"] == 1 and costs.lowered == 0 and not tight.feasible(cost)
    # the bound counts every MAC at the cheapest op type's rate and nothing else: the planned
    # latency (taps, requantization, pooling...) is several times it on a small net
    loose = Budget(max_latency_ms=bound * 10, max_sram_kb=128, target="stm32f446")
    cost = costs.cost(cfg, loose)
    assert cost["tier"] == 2 and costs.lowered == 1 and loose.feasible(cost)
    assert cost["latency_ms"] >= bound  # the bound is a lower bound of the planned latency


def test_a_budget_nothing_fits_states_the_smallest_subnetworks_needs(tmp_path):
    with pytest.raises(BudgetError, match=r"smallest sub-network .* needs SRAM [\d.]+ KB"):
        es.nas(_data(), "stm32f446", out=tmp_path, spec=TINY, max_sram_kb=0.1, progress=False)
    assert not (tmp_path / "supernet.pt").exists()  # refused before any training


def test_nas_runs_end_to_end_without_export_and_resumes(tmp_path):
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              population=3, generations=1, parents=2, bn_samples=32, val_samples=32,
              finalists=1, export=False, progress=False)  # fmt: skip
    first = es.nas(_data(), "stm32f446", out=tmp_path, **kw)
    assert first.config is not None and first.front
    assert first.finalists[0]["fits"] and first.finalists[0]["measured"]["sram_kb"] > 0
    assert (tmp_path / "report.md").exists()
    again = es.nas(_data(), "stm32f446", out=tmp_path, **kw)
    assert again.config == first.config
    assert [r["key"] for r in again.trials] == [r["key"] for r in first.trials]
    with pytest.raises(RunDirError):
        es.nas(_data(), "stm32f746", out=tmp_path, **kw)


def test_finalists_order_gives_a_tie_to_the_most_macs_and_skips_what_does_not_fit():
    def rec(n, acc, macs, feasible=True):
        return {"number": n, "key": f"s{n}", "accuracy": acc, "feasible": feasible,
                "cost": {"macs": macs}}  # fmt: skip

    records = [rec(0, 0.80, 100), rec(1, 0.79, 300), rec(2, 0.81, 500, feasible=False),
               rec(3, 0.70, 900), rec(4, 0.75, 50), rec(5, None, 700),
               rec(6, 0.80, 200)]  # fmt: skip
    # within 0.02 of the best feasible estimate (0.80): tied, the most MACs first; then the
    # rest by estimate; the infeasible (more accurate) and the unscored are left out
    assert [r["number"] for r in rank_finalists(records, 0.02)] == [1, 6, 0, 4, 3]
    # no tolerance: by the estimate, an exact tie to the most MACs
    assert [r["number"] for r in rank_finalists(records, 0.0)] == [6, 0, 1, 4, 3]
    assert rank_finalists([records[2], records[5]], 0.02) == []
    with pytest.raises(ConfigError, match="tolerance"):
        rank_finalists(records, -0.01)
    assert estimate_se(0.8, 400) == pytest.approx(0.02)


def test_spread_over_cells_takes_the_best_of_each_cell_first():
    def rec(n, width, res):
        return {"number": n, "candidate": {"width": width, "resolution": res}}

    ranked = [rec(0, 1.0, 24), rec(1, 1.0, 24), rec(2, 0.75, 28), rec(3, 1.0, 24),
              rec(4, 0.75, 28), rec(5, 1.0, 28)]  # fmt: skip
    assert [r["number"] for r in spread_over_cells(ranked)] == [0, 2, 5, 1, 3, 4]
    assert spread_over_cells([]) == []


def test_tuned_finalists_are_fine_tuned_and_the_best_on_validation_is_deployed(
    tmp_path, monkeypatch
):
    """tune_finalists=2: two finalists that fit, from two cells, each fine-tuned like the
    deployment; the one with the higher validation accuracy is deployed with its tuned
    weights (no third fine-tune); a rerun fine-tunes nothing; bad values refused."""
    import edgeslim.nas.api as api
    from edgeslim.core.train import evaluate

    def fake_export(model, calib, device, c_dir, tflite, **kw):  # the C toolchain not needed
        c_dir.mkdir(parents=True)
        return ["fake"], {"sram_kb": 1.0, "flash_kb": 2.0, "latency_ms": 3.0}

    tuned_keys = []
    real_finetune = api.finetune_subnet

    def counting(supernet, cfg, *a, **k):
        tuned_keys.append(cfg.key())
        return real_finetune(supernet, cfg, *a, **k)

    monkeypatch.setattr(api, "export_checked", fake_export)
    monkeypatch.setattr(api, "finetune_subnet", counting)
    data = _data()
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              space_top=4, population=6, generations=1, parents=2, bn_samples=32,
              val_samples=32, finalists=3, tune_finalists=2, finetune_epochs=1,
              progress=False)  # fmt: skip
    res = es.nas(data, "stm32f446", out=tmp_path, **kw)
    tuned = res.selection["tuned"]
    assert [t["key"] for t in tuned] == tuned_keys  # fine-tuned once each, nothing else
    assert len(tuned) == 2 and tuned[0]["key"] != tuned[1]["key"]
    first_two = [f for f in res.finalists if f["fits"]][:2]
    cells = {(f["candidate"]["width"], f["candidate"]["resolution"]) for f in first_two}
    assert len(cells) == 2  # from two cells (the space searched four)
    best = max(tuned, key=lambda t: t["val_accuracy"])
    assert res.config.key() == best["key"]
    # the deployed float weights are the tuned ones, and score what was recorded
    sub = extract(res.supernet, res.config)
    sub.load_state_dict(torch.load(tmp_path / "final" / "float.pt", weights_only=True))
    rdata = api.resize_data(data, res.config.resolution)
    assert evaluate(sub.eval(), rdata, "val") == best["val_accuracy"]
    assert "Fine-tuned and compared" in (tmp_path / "report.md").read_text()
    tuned_keys.clear()
    again = es.nas(data, "stm32f446", out=tmp_path, **kw)
    assert tuned_keys == [] and again.config == res.config
    assert again.selection["tuned"] == tuned
    for bad in (0, 4):
        with pytest.raises(ConfigError, match="tune_finalists"):
            es.nas(data, "stm32f446", out=tmp_path / "bad", **{**kw, "tune_finalists": bad})


def test_nas_gives_a_tie_to_the_most_macs_within_the_budget(tmp_path):
    costs = SubnetCost(_net(), "stm32f446", code_bytes=0)
    small, large = costs.predict(TINY.smallest(12, 0.5)), costs.predict(TINY.largest())
    limit = (small["sram_plain_kb"] + large["sram_plain_kb"]) / 2
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              space_top=4, population=4, generations=1, parents=2, bn_samples=32,
              val_samples=32, finalists=1, export=False, progress=False, max_sram_kb=limit,
              supernet_checkpoint=tmp_path / "supernet.pt")  # fmt: skip
    tied = es.nas(_data(), "stm32f446", out=tmp_path / "tied", tie_tolerance=0.99, **kw)
    scored = [r for r in tied.trials if r["accuracy"] is not None]
    assert all(r["feasible"] for r in scored) and any(not r["feasible"] for r in tied.trials)
    assert len({r["cost"]["macs"] for r in scored}) > 1  # a real choice
    assert tied.selection["tied"] == len(scored)  # everything within 0.99: one tie
    assert tied.config.key() == max(scored, key=lambda r: r["cost"]["macs"])["key"]
    fin = tied.finalists[0]
    assert fin["fits"] and fin["measured"]["sram_kb"] <= limit  # confirmed by the export
    strict = es.nas(_data(), "stm32f446", out=tmp_path / "strict", tie_tolerance=0.0, **kw)
    assert [r["key"] for r in strict.trials] == [r["key"] for r in tied.trials]
    assert strict.estimated_accuracy == max(r["accuracy"] for r in scored)
    assert strict.config.key() == strict.selection["most_accurate"]
    with pytest.raises(ConfigError, match="tie_tolerance"):
        es.nas(_data(), "stm32f446", out=tmp_path / "bad", tie_tolerance=-0.1, **kw)


def test_a_finished_run_is_not_quantized_or_exported_again(tmp_path, monkeypatch):
    import edgeslim.nas.api as api
    import edgeslim.quant as quant

    calls = {"export": 0, "quantize": 0}
    real_quantize = quant.quantize

    def fake_export(model, calib, device, c_dir, tflite, **kw):  # the C toolchain not needed
        calls["export"] += 1
        c_dir.mkdir(parents=True)
        return ["fake"], {"sram_kb": 1.0, "flash_kb": 2.0, "latency_ms": 3.0}

    def counting_quantize(*args, **kw):
        calls["quantize"] += 1
        return real_quantize(*args, **kw)

    monkeypatch.setattr(api, "export_checked", fake_export)
    monkeypatch.setattr(quant, "quantize", counting_quantize)
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              population=2, generations=1, parents=2, bn_samples=32, val_samples=32,
              finalists=1, finetune_epochs=0, progress=False)  # fmt: skip
    first = es.nas(_data(), "stm32f446", out=tmp_path, **kw)
    assert calls == {"export": 1, "quantize": 1} and first.measured["flash_kb"] == 2.0
    x = _data().test.x[:4]
    expected = first.model(x)
    again = es.nas(_data(), "stm32f446", out=tmp_path, **kw)
    assert calls == {"export": 1, "quantize": 1}  # resumed: no quantization, no export
    assert (again.accuracy, again.measured, again.verified) == (
        first.accuracy, first.measured, first.verified)  # fmt: skip
    assert again.timings["supernet_train_s"] == first.timings["supernet_train_s"]
    assert torch.equal(again.model(x), expected)  # quantized when asked for, identically
    assert calls == {"export": 1, "quantize": 2}


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_the_winner_is_fine_tuned_on_labels_and_soft_targets_by_finetune_alpha(
    tmp_path, monkeypatch, alpha
):
    import edgeslim.core.train as train
    import edgeslim.nas.api as api

    def fake_export(model, calib, device, c_dir, tflite, **kw):  # the C toolchain not needed
        c_dir.mkdir(parents=True)
        return ["fake"], {"sram_kb": 1.0, "flash_kb": 2.0, "latency_ms": 3.0}

    fits = []
    real_fit = train.fit

    def recording_fit(model, data, cfg, **kw):
        fits.append((cfg, kw.get("teacher")))
        return real_fit(model, data, cfg, **kw)

    monkeypatch.setattr(api, "export_checked", fake_export)
    monkeypatch.setattr(train, "fit", recording_fit)
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              population=2, generations=1, parents=2, bn_samples=32, val_samples=32,
              finalists=1, finetune_epochs=1, progress=False)  # fmt: skip
    es.nas(_data(), "stm32f446", out=tmp_path, finetune_alpha=alpha, **kw)
    assert len(fits) == 1
    cfg, teacher = fits[0]
    assert cfg.epochs == 1
    if alpha == 0:  # labels only: no teacher
        assert cfg.distill is None and teacher is None
    else:
        assert cfg.distill.alpha == alpha and teacher is not None
    with pytest.raises(ConfigError, match="finetune_alpha"):
        es.nas(_data(), "stm32f446", out=tmp_path / "bad", finetune_alpha=1.5, **kw)


def test_a_given_teacher_replaces_the_largest_subnetwork_in_the_fine_tuning(tmp_path, monkeypatch):
    import edgeslim.core.train as train
    import edgeslim.nas.api as api

    def fake_export(model, calib, device, c_dir, tflite, **kw):
        c_dir.mkdir(parents=True)
        return ["fake"], {"sram_kb": 1.0, "flash_kb": 2.0, "latency_ms": 3.0}

    fits = []
    real_fit = train.fit

    def recording_fit(model, data, cfg, **kw):
        fits.append((cfg, kw.get("teacher"), model, data))
        return real_fit(model, data, cfg, **kw)

    monkeypatch.setattr(api, "export_checked", fake_export)
    monkeypatch.setattr(train, "fit", recording_fit)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))  # takes 1 x 16 x 16 only
    teacher.input_shape = (1, 16, 16)
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              population=2, generations=1, parents=2, bn_samples=32, val_samples=32,
              finalists=1, finetune_epochs=1, progress=False)  # fmt: skip
    es.nas(_data(), "stm32f446", out=tmp_path, finetune_teacher=teacher, **kw)
    (cfg, used, student, seen), = fits  # fmt: skip
    assert cfg.distill.alpha == 0.7 and used is teacher
    # the teacher sees the images as they are; the winner, inside the student, resized
    assert seen.train.x.shape[1:] == (1, 16, 16) and student.input_shape == (1, 16, 16)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(student(x), student.model(resize(x, student.resolution)))
    meta = json.loads((tmp_path / "search" / "meta.json").read_text())
    assert meta["search"]["finetune_teacher"].startswith("Sequential:")
    bad = nn.Linear(2, 2)
    bad.input_shape = (1, 28, 28)
    with pytest.raises(ConfigError, match="finetune_teacher takes inputs of shape"):
        es.nas(_data(), "stm32f446", out=tmp_path / "bad", finetune_teacher=bad, **kw)


# ----------------------------------------------------------------------------- deployment


@pytest.mark.skipif(hostbuild.compiler() is None, reason="needs a C compiler")
def test_a_subnetwork_quantized_runs_bit_exact_in_c_and_tflite_micro(tmp_path):
    from edgeslim.export.tflite import tflm_available

    net = _net()
    cfg = TINY.sample(random.Random(5), resolution=16, width=1.0)
    verified, measured = _export_int8_c(net, cfg, tmp_path)
    assert "compiled C bit-exact on 32 inputs" in verified
    assert (tmp_path / "c" / "model.c").exists()
    assert 0 < measured["sram_kb"] < 128 and measured["flash_kb"] > 0
    if not tflm_available():
        pytest.skip("tflite-micro is not installed: C checked, TFLite Micro not compared")
    assert "compiled C == TFLite Micro bit for bit on 32 inputs" in verified


def test_resize_keeps_a_matching_input_and_resizes_others():
    x = torch.rand(2, 1, 16, 16)
    assert resize(x, 16) is x
    assert resize(x, 12).shape == (2, 1, 12, 12)


# ----------------------------------------------------------------------------- CLI

EDGESLIM = shutil.which("edgeslim")


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [EDGESLIM] if EDGESLIM else [sys.executable, "-m", "edgeslim.cli"]
    env = {**os.environ, "EDGESLIM_QUIET": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_nas_searches_and_reports_and_refuses_an_impossible_budget(tmp_path):
    common = ["nas", "--device", "stm32f446", "--data", "mnist", "--limit-train", "64",
              "--epochs", "1", *CLI_SPEC, "--widths", "0.5,1.0", "--resolutions", "12,16",
              "--space-samples", "1", "--population", "2", "--generations", "1",
              "--finalists", "1"]  # fmt: skip
    proc = _cli(*common, "--out", str(tmp_path / "run"), "--no-export")
    assert proc.returncode == 0, proc.stderr
    assert "report:" in proc.stdout and (tmp_path / "run" / "report.md").exists()
    spec = json.loads((tmp_path / "run" / "search" / "meta.json").read_text())["spec"]
    assert spec["stages"] == [[4, 1, 1], [8, 2, 2]] and spec["stem_stride"] == 2
    full = _cli(*common, "--stem-stride", "1", "--tune-finalists", "1",
                "--out", str(tmp_path / "full"), "--no-export")  # fmt: skip
    assert full.returncode == 0, full.stderr
    spec = json.loads((tmp_path / "full" / "search" / "meta.json").read_text())["spec"]
    assert spec["stem_stride"] == 1
    bad = _cli(*common, "--out", str(tmp_path / "bad"), "--max-flash-kb", "0.5")
    assert bad.returncode == 2
    assert "smallest sub-network" in bad.stderr and "needs SRAM" in bad.stderr
    bad = _cli(*common, "--out", str(tmp_path / "bad2"), "--tune-finalists", "2")
    assert bad.returncode == 2 and "tune_finalists must be in 1..finalists (1)" in bad.stderr


def test_finetune_subnet_repeats_the_deployment_and_other_seeds_differ(tmp_path, monkeypatch):
    """The benchmark's extra seeds: finetune_subnet with seed 0 on sample_indices' images is
    the deployment's fine-tuning, weight for weight; seed 1 trains another order."""
    import edgeslim.nas.api as api

    def fake_export(model, calib, device, c_dir, tflite, **kw):  # the C toolchain not needed
        c_dir.mkdir(parents=True)
        return ["fake"], {"sram_kb": 1.0, "flash_kb": 2.0, "latency_ms": 3.0}

    monkeypatch.setattr(api, "export_checked", fake_export)
    data = _data()
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              population=2, generations=1, parents=2, bn_samples=32, val_samples=32,
              finalists=1, finetune_epochs=1, progress=False)  # fmt: skip
    res = es.nas(data, "stm32f446", out=tmp_path, **kw)
    deployed = torch.load(tmp_path / "final" / "float.pt", weights_only=True)
    bn_idx, calib_idx = api.sample_indices(len(data.train), 32)
    assert len(bn_idx) == 32 and len(calib_idx) == 96

    def tuned(seed):
        return api.finetune_subnet(res.supernet, res.config, data, data.train.x[bn_idx],
                                   epochs=1, seed=seed).state_dict()  # fmt: skip

    again, other = tuned(0), tuned(1)
    assert again.keys() == deployed.keys()
    assert all(torch.equal(again[k], deployed[k]) for k in deployed)
    assert any(not torch.equal(other[k], deployed[k]) for k in deployed if k.endswith("weight"))


def test_a_resume_refuses_fine_tuned_weights_that_are_not_the_chosen_subnetworks(
    tmp_path, monkeypatch
):
    import edgeslim.nas.api as api

    def fake_export(model, calib, device, c_dir, tflite, **kw):  # the C toolchain not needed
        c_dir.mkdir(parents=True, exist_ok=True)
        return ["fake"], {"sram_kb": 1.0, "flash_kb": 2.0, "latency_ms": 3.0}

    monkeypatch.setattr(api, "export_checked", fake_export)
    kw = dict(spec=TINY, training=SandwichTraining(epochs=1, batch_size=32), space_samples=2,
              population=2, generations=1, parents=2, bn_samples=32, val_samples=32,
              finalists=1, finetune_epochs=1, progress=False)  # fmt: skip
    first = es.nas(_data(), "stm32f446", out=tmp_path, **kw)
    weights = tmp_path / "final" / "float.pt"
    again = es.nas(_data(), "stm32f446", out=tmp_path, **kw)  # the saved weights are reused
    assert again.config == first.config and again.accuracy == first.accuracy
    torch.save({"other.weight": torch.zeros(2)}, weights)  # another network's weights
    with pytest.raises(RunDirError, match="does not hold the fine-tuned weights"):
        es.nas(_data(), "stm32f446", out=tmp_path, **kw)
    weights.write_bytes(b"PK\x03\x04 cut short")  # a torn or corrupt file
    with pytest.raises(RunDirError, match="delete it to fine-tune again"):
        es.nas(_data(), "stm32f446", out=tmp_path, **kw)
