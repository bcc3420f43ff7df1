"""Early exits in C: the integer exit rule, the chained int8 graphs, the compiled runner."""

import math

import numpy as np
import pytest
import torch

from edgeslim import ExportError
from edgeslim.core.models import zoo
from edgeslim.dynamic import Exits, add_exits_, set_thresholds
from edgeslim.export.c import hostbuild
from edgeslim.export.exits_c import c_sources, check_exits_c, export_exits_c
from edgeslim.export.exits_int8 import ONE, confident, exit_limit, exp_table, quantize_exits

needs_gcc = pytest.mark.skipif(hostbuild.compiler() is None, reason="no C compiler")


def _lenet_exits(seed: int = 0, pool: int = 6):
    torch.manual_seed(seed)
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1", "conv2"], pool=pool, hidden=16))
    x = torch.rand(48, 1, 28, 28)
    with torch.no_grad():
        outs = em.all_exits(x)
    # thresholds at the median confidence: about half the inputs leave at each exit
    set_thresholds(em, [float(torch.softmax(o, -1).max(-1).values.median()) for o in outs[:-1]])
    return em, x


def test_integer_rule_is_max_probability():
    rng = np.random.default_rng(0)
    for scale in (0.02, 0.1, 0.4):
        table = exp_table(scale)
        assert table[0] == ONE and table.max() <= 65535 and table.min() >= 0
        q = rng.integers(-128, 128, (500, 10))
        p = torch.softmax(torch.from_numpy(q * scale), -1).max(-1).values.numpy()
        for t in (0.3, 0.6, 0.9):
            got = confident(q, table, exit_limit(t))
            clear = np.abs(p - t) > 2e-3  # away from the fixed point's rounding
            assert clear.sum() > 400
            assert np.array_equal(got[clear], (p >= t)[clear])
    assert confident(np.zeros((1, 10)), exp_table(0.1), exit_limit(0.0)).all()


def test_chained_graphs_and_merged_exits():
    em, x = _lenet_exits()
    q = quantize_exits(em, x)
    assert q.exit_index == [0, 1, 2] and len(q.heads) == 2
    for prev, nxt in zip(q.stages, q.stages[1:], strict=False):
        a, b = prev[prev.output], nxt[nxt.input]
        assert np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)
    logits, taken = q.run(x)
    assert set(taken.tolist()) == {0, 1, 2}
    for n, k in enumerate(q.exit_index):  # each input's logits are its exit's
        rows = taken == k
        assert np.array_equal(logits[rows], q.run_at(x, n)[rows])
    set_thresholds(em, [None, 0.5])  # exit 0 off: merged into one stage, no head
    q = quantize_exits(em, x)
    assert q.exit_index == [1, 2] and len(q.stages) == 2 and len(q.heads) == 1


@needs_gcc
def test_export_bit_exact_and_a_wrong_rule_is_caught(tmp_path):
    em, x = _lenet_exits()
    result = export_exits_c(em, tmp_path / "c", calib=x)
    names = {p.name for p in result.files}
    assert {"exits.c", "exits.h", "stage0.c", "head1.c", "stage2_weights.h"} <= names
    assert result.shared_arena and any("bit-exact" in v for v in result.verified)
    assert result.float_agreement > 0.7
    assert (
        "int exits_run(const int8_t *input, int8_t *logits);"
        in (tmp_path / "c" / "exits.h").read_text()
    )
    # the check fails when the C's decision differs from the reference's
    q = result.int8
    files, _ = c_sources(q)
    inputs = q.quantize_input(x.numpy())
    files["exits.c"] = files["exits.c"].replace(
        f"#define LIMIT0 {q.limits[0]}", f"#define LIMIT0 {q.limits[0] // 2}"
    )
    with pytest.raises(ExportError, match="exit differs"):
        check_exits_c(q, files, inputs)
    # no exit enabled: one stage, the static network, still a valid runner
    set_thresholds(em, [None, None])
    static = quantize_exits(em, x)
    check_exits_c(static, c_sources(static)[0], inputs[:8])
    assert static.exit_index == [2] and not static.heads


@needs_gcc
@pytest.mark.slow
def test_single_exit_linear_head_bit_exact(tmp_path):
    """The benchmark's LeNet-5 setting: one exit after conv1, head max-pool + one Linear."""
    torch.manual_seed(2)
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1"], pool=6, hidden=0))
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        scores = torch.softmax(em.all_exits(x)[0], -1).max(-1).values
    set_thresholds(em, [float(scores.median())])
    result = export_exits_c(em, tmp_path / "c", calib=x)
    assert result.int8.exit_index == [0, 1] and len(result.int8.heads) == 1
    assert any("bit-exact" in v for v in result.verified)
    _, taken = result.int8.run(x.numpy())
    assert set(taken.tolist()) == {0, 1}


def test_refusals(tmp_path):
    em, x = _lenet_exits(pool=5)  # 24x24 features, 5x5 windows: a ceil-mode pool
    with pytest.raises(ExportError, match="ceil-mode"):
        quantize_exits(em, x)
    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1"], criterion="entropy"))
    with pytest.raises(ExportError, match="maxprob"):
        export_exits_c(em, tmp_path, calib=x)
    assert not any(tmp_path.iterdir())
    assert math.isinf(float(em.thresholds[0]))


@needs_gcc
@pytest.mark.slow
def test_mobilenetv2_exits_bit_exact(tmp_path):
    """Residual blocks, BN folded, three exits: the C runner still matches the reference."""
    torch.manual_seed(0)
    after = ["blocks.0", "blocks.2", "blocks.4"]
    em = add_exits_(zoo.create("mobilenetv2"), Exits(after=after, pool=7, hidden=32))
    x = torch.rand(48, 1, 28, 28)
    with torch.no_grad():
        outs = em.all_exits(x)
    set_thresholds(
        em, [float(torch.softmax(o, -1).max(-1).values.quantile(0.7)) for o in outs[:-1]]
    )
    result = export_exits_c(em, tmp_path, calib=x)
    assert result.int8.exit_index == [0, 1, 2, 3]
    assert any("bit-exact" in v for v in result.verified)
    _, taken = result.int8.run(x)
    assert len(set(taken.tolist())) >= 3
