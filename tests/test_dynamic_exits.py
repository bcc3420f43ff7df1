"""Early exits: shapes, real stopping, threshold calibration, ONNX runner, errors."""

import math

import pytest
import torch

from edgeslim import ConfigError, EdgeslimError, ShapeError
from edgeslim.core.models import zoo
from edgeslim.core.train import fit
from edgeslim.dynamic import (
    ExitCalibration,
    Exits,
    ExitTraining,
    add_exits_,
    calibrate_exits,
    count_macs,
    exit_costs,
    get_thresholds,
    set_thresholds,
    train_exits,
)


@pytest.fixture(scope="module")
def trained(mnist):
    torch.manual_seed(0)
    data = mnist.limit(1000)
    model = zoo.create("lenet5")
    fit(model, data, epochs=1, progress=False)
    em = add_exits_(model, Exits(after=["conv1", "conv2"], pool=4, hidden=32))
    train_exits(em, data, ExitTraining(epochs=1), progress=False)
    return em, data


def test_shapes_and_static_equivalence():
    model = zoo.create("lenet5").eval()
    x = torch.randn(5, 1, 28, 28)
    ref = model(x)
    em = add_exits_(model, Exits(after=["conv1", "conv2"]))
    outs = em.all_exits(x)
    assert [tuple(o.shape) for o in outs] == [(5, 10)] * 3
    assert torch.allclose(outs[-1], ref)
    assert get_thresholds(em) == [None, None]
    y = em(x)  # no threshold set: every sample takes the final exit
    assert torch.allclose(y, ref) and em.last_exit.tolist() == [2] * 5


def test_exits_really_stop():
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1", "conv2"]))
    x = torch.randn(4, 1, 28, 28)
    costs = exit_costs(em, x)
    calls = []
    handle = em.segments[1].register_forward_hook(lambda *a: calls.append(1))
    set_thresholds(em, [0.0, None])  # max prob >= 0: everyone leaves at exit 0
    assert count_macs(em, x) == 4 * (costs["segments"][0] + costs["heads"][0])
    assert count_macs(em, x[:1]) == costs["segments"][0] + costs["heads"][0]
    assert em.last_exit.tolist() == [0] and not calls
    handle.remove()
    # a threshold half of the batch passes: the batch shrinks, the rest pays for more
    with torch.no_grad():
        scores = torch.softmax(em.all_exits(x)[0], -1).max(-1).values
    t = float(scores.median())
    set_thresholds(em, [t, None])
    with torch.no_grad():
        em(x)
    taken = em.last_exit
    per_exit = [costs["segments"][0] + costs["heads"][0], sum(costs["segments"][:3])]
    per_exit[1] += costs["heads"][0]
    expected = sum(per_exit[0] if k == 0 else per_exit[1] for k in taken.tolist())
    assert 0 < int((taken == 0).sum()) < 4
    assert count_macs(em, x) == expected


def test_batch_and_single_agree(trained):
    em, data = trained
    set_thresholds(em, [0.9, 0.9])
    x = data.test.x[:20]
    with torch.no_grad():
        batched, taken = em.infer(x)
        single = [em.infer(x[i : i + 1]) for i in range(20)]
    assert torch.allclose(batched, torch.cat([s[0] for s in single]), atol=1e-5)
    assert taken.tolist() == [int(s[1]) for s in single]


def test_calibration_meets_target_on_val(trained):
    em, data = trained
    log = calibrate_exits(em, data, ExitCalibration(max_loss=0.01))
    em.eval()
    with torch.no_grad():
        pred = em(data.val.x).argmax(1)
    acc = float((pred == data.val.y).double().mean())
    assert acc >= log["static_accuracy"] - 0.01 - 1e-9
    assert math.isclose(acc, log["accuracy"], abs_tol=1e-6)
    assert log["macs"] <= log["static_macs"]
    macs = count_macs(em, data.val.x) / len(data.val)
    assert math.isclose(macs, log["macs"], rel_tol=1e-6)
    assert len(log["curve"]) > 2
    budget = calibrate_exits(em, data, ExitCalibration(budget=0.6))
    assert budget["macs"] <= 0.6 * budget["static_macs"] + 1e-6
    with pytest.raises(ConfigError, match="budget"):
        calibrate_exits(em, data, ExitCalibration(budget=0.01))


def test_entropy_criterion(trained):
    em, data = trained
    em.criterion = "entropy"
    try:
        log = calibrate_exits(em, data, ExitCalibration(max_loss=0.02))
        assert all(t is None or t >= 0 for t in log["thresholds"])
    finally:
        em.criterion = "maxprob"


def test_onnx_runner_equals_pytorch(trained, tmp_path):
    from edgeslim.export.exits import export_exits, load_runner

    em, data = trained
    x = data.test.x[:32]
    with torch.no_grad():
        scores = torch.softmax(em.all_exits(x)[0], -1).max(-1).values
    set_thresholds(em, [float(scores.median()) + 1e-4, None])
    result = export_exits(em, tmp_path, x)
    assert result.exits_match and result.files == ["exit-0.onnx", "exit-1.onnx"]
    logits, taken = load_runner(tmp_path).run(x.numpy())
    with torch.no_grad():
        ref, ref_taken = em.infer(x)
    assert taken.tolist() == ref_taken.tolist()
    assert 0 < int((ref_taken == 0).sum()) < 32  # some leave early, some do not
    assert abs(logits - ref.numpy()).max() < 1e-4
    # batch 1: one file, the exit an If node; the same exits and logits, one sample at a time
    import onnx

    joined = onnx.load(str(tmp_path / "exits-b1.onnx"))
    assert [n.op_type for n in joined.graph.node].count("If") == 1
    runner = load_runner(tmp_path)
    for i in range(8):
        one, k = runner.run(x[i : i + 1].numpy())
        assert int(k[0]) == int(ref_taken[i]) and abs(one - ref[i].numpy()).max() < 1e-4


def test_static_under_export():
    from edgeslim.profiling import profile

    model = zoo.create("lenet5")
    em = add_exits_(model, Exits(after=["conv1"]))
    set_thresholds(em, [0.0])
    assert (
        profile(em, torch.randn(1, 1, 28, 28)).macs
        == profile(model, torch.zeros(1, 1, 28, 28)).macs
    )


def test_errors():
    model = zoo.create("lenet5")
    with pytest.raises(ConfigError, match="no module 'nope'"):
        add_exits_(model, Exits(after=["nope"]))
    with pytest.raises(ConfigError, match="order"):
        add_exits_(model, Exits(after=["conv2", "conv1"]))
    with pytest.raises(ConfigError, match="after"):
        Exits(after=[])
    with pytest.raises(ConfigError, match="cross"):
        add_exits_(zoo.create("mobilenetv2"), Exits(after=["blocks.2.block.0"]))
    em = add_exits_(model, Exits(after=["conv1", "conv2"]))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        set_thresholds(em, [1.5, None])
    with pytest.raises(ConfigError, match="2 early exits"):
        set_thresholds(em, [0.5])
    em.criterion = "entropy"
    with pytest.raises(ConfigError, match=">= 0"):
        set_thresholds(em, [-0.1, None])
    with pytest.raises(ConfigError, match="exactly one"):
        ExitCalibration(max_loss=0.01, budget=0.5)
    with pytest.raises(ConfigError, match="weights"):
        train_exits(em, None, ExitTraining(weights=[1.0]))  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        add_exits_(zoo.create("lenet5"), Exits(after=["fc1"]), example=torch.zeros(1, 5))
    assert issubclass(ConfigError, EdgeslimError)


def test_head_without_hidden_layer():
    """hidden=0: max-pool, flatten, one Linear to the classes (LeNet-5 after conv1: 6x6x20
    features, 7,210 parameters); exits at batch 1 and batched agree; hidden < 0 is refused."""
    torch.manual_seed(0)
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1"], pool=6, hidden=0))
    head = em.heads[0]
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(720, 10)]
    assert sum(p.numel() for p in head.parameters()) == 7210
    x = torch.randn(24, 1, 28, 28) * 3
    with torch.no_grad():
        scores = torch.softmax(em.all_exits(x)[0], -1).max(-1).values.sort().values
    set_thresholds(em, [float(scores[11] + scores[12]) / 2])  # half leave, none on the line
    with torch.no_grad():
        batched, taken = em.infer(x)
        single = [em.infer(x[i : i + 1]) for i in range(len(x))]
    assert taken.tolist() == [int(s[1]) for s in single] and set(taken.tolist()) == {0, 1}
    assert (torch.cat([s[0] for s in single]) - batched).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="hidden"):
        Exits(after=["conv1"], hidden=-1)


def _reference_exits(em, x):
    """The exit rule written out plainly: every exit's logits per sample, the first exit
    whose confidence reaches its threshold (an ``inf`` threshold is never reached)."""
    from edgeslim.dynamic.exits import confidence

    logits, taken = [], []
    with torch.no_grad():
        for i in range(len(x)):
            outs = em.all_exits(x[i : i + 1])
            k = next(
                (
                    k
                    for k, t in enumerate(em.thresholds.tolist())
                    if t != math.inf and float(confidence(outs[k], em.criterion)) >= t
                ),
                len(outs) - 1,
            )
            logits.append(outs[k])
            taken.append(k)
    return torch.cat(logits), taken


@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
def test_infer_equals_reference(criterion):
    from edgeslim.dynamic.exits import confidence

    torch.manual_seed(1)
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1", "conv2"], hidden=16))
    em.criterion = criterion
    x = torch.randn(40, 1, 28, 28) * 3
    with torch.no_grad():
        outs = em.all_exits(x)
        conf = [confidence(o, criterion) for o in outs[:2]]
    # thresholds at quantiles of each exit's confidence: every exit is taken by someone
    for thresholds in ([conf[0].quantile(0.6), conf[1].quantile(0.4)], [math.inf, 0.0]):
        em.thresholds.copy_(torch.tensor([float(t) for t in thresholds]))
        ref, ref_taken = _reference_exits(em, x)
        with torch.no_grad():
            batched, taken = em.infer(x)
            single = [em.infer(x[i : i + 1]) for i in range(len(x))]
        assert taken.tolist() == ref_taken == [int(s[1]) for s in single]
        assert (batched - ref).abs().max() <= 1e-6
        assert (torch.cat([s[0] for s in single]) - ref).abs().max() <= 1e-6
        if thresholds[0] != math.inf:
            assert {0, 1, 2} <= set(ref_taken)


def test_batch1_path_keeps_hooks():
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1", "conv2"]))
    set_thresholds(em, [0.0, None])
    seen = []
    hooks = [
        em.segments[0].register_forward_hook(lambda m, i, o: seen.append("segment")),
        em.heads[0].register_forward_pre_hook(lambda m, i: seen.append("head")),
    ]
    with torch.no_grad():
        em(torch.randn(1, 1, 28, 28))
    assert seen == ["segment", "head"] and em.last_exit.tolist() == [0]
    for h in hooks:
        h.remove()
    seen.clear()
    with torch.no_grad():
        em(torch.randn(1, 1, 28, 28))
    assert seen == []
    # a global hook sees every module the batch-1 path runs
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    try:
        with torch.no_grad():
            em(torch.randn(1, 1, 28, 28))
    finally:
        handle.remove()
    # conv1's segment, then the head (pool, flatten, hidden layer, classes); nothing after
    head = ["MaxPool2d", "Flatten", "Linear", "ReLU", "Linear", "Sequential"]
    assert seen == ["Conv2d", "GraphModule", *head, "ExitModel"]
    assert em.last_exit.tolist() == [0]


def test_batch1_last_exit_is_a_fresh_tensor_per_pass():
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1", "conv2"])).eval()
    x = torch.randn(1, 1, 28, 28)
    set_thresholds(em, [0.0, None])
    with torch.no_grad():
        em(x)
    first = em.last_exit
    set_thresholds(em, [None, None])  # now every sample runs to the final exit
    with torch.no_grad():
        em(x)
    assert first.tolist() == [0] and em.last_exit.tolist() == [2]
    assert em.last_exit is em.last_exit  # made once per pass, not on every read
