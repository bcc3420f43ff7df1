"""Compressed weights in the C backend: every format against the reference interpreter.

Random layers (fully connected and conv, padded, strided, 1x1 in place) whose int8 weights
are drawn from ``2**bits`` values (bits 2..8) with 0-99% zeros and some all-zero rows, stored
as codebook / relative / runs, compiled and run; outputs must equal the reference's bit for
bit. Plus: packing round trips, the per-layer choice, the planner's scratch, and the
per-tensor scale that keeps k-means-shared layers at <= 2**bits int8 values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.export.c import codegen, compress, export_c, hostbuild, plan_for
from edgeslim.export.int8 import reference
from mcu_helpers import GraphBuilder

pytestmark = pytest.mark.skipif(hostbuild.compiler() is None, reason="no C compiler (gcc)")

FORMATS = ("codebook", "relative", "runs")


def _weights(rng, shape, bits: int, sparsity: float, empty_rows: int = 0) -> np.ndarray:
    """int8 weights of ``shape`` over ``2**bits`` nonzero values, ``sparsity`` zeros."""
    k = 1 << bits
    values = np.unique(rng.integers(-127, 128, k * 4))
    values = values[values != 0][:k]
    w = rng.choice(values, size=shape)
    w[rng.random(shape) < sparsity] = 0
    flat = w.reshape(shape[0], -1)
    flat[rng.choice(shape[0], size=empty_rows, replace=False)] = 0
    return w


def _check(graph, packed, n=3, seed=0):
    """Compile with ``packed`` weights; every op's output (one input, traced) and the
    outputs of ``n`` random inputs must equal the reference's."""
    plan = plan_for(graph, packed=packed)
    sources = codegen.generate(graph, plan, packed)
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (n, *graph[graph.input].shape[1:])).astype(np.int8)
    expected = reference.run_batch(graph, q)
    with hostbuild.Build(sources, trace=True) as build:
        got = build.run(q, graph[graph.output].size)
        _, records = build.run(q[:1], graph[graph.output].size, trace=True)
    assert np.array_equal(got, expected.reshape(got.shape))
    assert hostbuild.check_trace(graph, reference.run(graph, q[:1]), records) == []
    return sources


SPARSITIES = (0.0, 0.3, 0.9, 0.99)
CONV_SPARSITIES = (0.0, 0.6, 0.95)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_packed_fully_connected_layers_are_bit_exact(bits):
    """One chain of 12 layers: each format at each sparsity, with empty rows."""
    rng = np.random.default_rng(100 + bits)
    b = GraphBuilder((1, 64), seed=bits)
    x, forms = b.input, {}
    for fmt in FORMATS:
        for sparsity in SPARSITIES:
            name = f"fc_{fmt}_{int(100 * sparsity)}"
            x = b.fc(name, x, 64 if len(forms) < 11 else 10, act="relu" if len(forms) % 2 else None)
            forms[name] = (fmt, sparsity)
    g = b.graph(x)
    for op in g.ops:
        w = g[op.weight]
        w.data[:] = _weights(rng, w.shape, bits, forms[op.name][1], empty_rows=2)
    packed = compress.choose(g, {name: fmt for name, (fmt, _) in forms.items()})
    assert {p.format for p in packed.values()} == set(FORMATS)
    _check(g, packed)


@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("sparsity", CONV_SPARSITIES)
def test_packed_convs_are_bit_exact(bits, sparsity):
    """Padded 3x3 (im2col), strided with uneven padding, 1x1 expanding and shrinking in
    place, then a fully connected layer; the formats rotate over the layers."""
    rng = np.random.default_rng(200 + bits)
    b = GraphBuilder((1, 9, 8, 3), seed=bits)
    c1 = b.conv("c1", b.input, 12, k=3, stride=1, act="relu")
    c2 = b.conv("c2", c1, 16, k=3, stride=2, pad=(0, 1, 1, 0))
    c3 = b.conv("c3", c2, 24, k=1, pad=(0, 0, 0, 0))
    c4 = b.conv("c4", c3, 8, k=1, pad=(0, 0, 0, 0), act="relu6")
    flat = b.reshape("flat", c4, (1, int(np.prod(b.tensors[c4].shape))))
    g = b.graph(b.fc("fc", flat, 5))
    assert {plan_for(g).inplace.get(2), plan_for(g).inplace.get(3)} == {"pointwise"}
    for op in g.ops:
        if getattr(op, "weight", ""):
            w = g[op.weight]
            w.data[:] = _weights(rng, w.shape, bits, sparsity, empty_rows=1)
    shift = CONV_SPARSITIES.index(sparsity)  # each layer gets each format once
    names = ("c1", "c2", "c3", "c4", "fc")
    packed = compress.choose(g, {n: FORMATS[(j + shift) % 3] for j, n in enumerate(names)})
    sources = _check(g, packed)
    assert "w_c1_w" not in sources["weights.h"]  # stored packed only


def test_planner_holds_the_im2col_patch():
    b = GraphBuilder((1, 6, 6, 4))
    c = b.conv("c", b.input, 8, k=3)
    g = b.graph(b.conv("d", c, 4, k=1, pad=(0, 0, 0, 0)))
    packed = compress.choose(g, {"c": "codebook", "d": "relative"})
    plan = plan_for(g, packed=packed)
    assert plan.buffers[plan.scratch[0]].size == 3 * 3 * 4
    assert 1 not in plan.scratch  # a 1x1 unpadded conv reads its input pixel directly


def test_auto_compresses_only_where_it_saves_flash():
    rng = np.random.default_rng(0)
    b = GraphBuilder((1, 400))
    h = b.fc("big", b.input, 300, act="relu")
    out = b.fc("small", h, 10)
    g = b.graph(out)
    g[g.ops[0].weight].data[:] = _weights(rng, (300, 400), 3, 0.9)
    packed = compress.choose(g, "auto")
    assert set(packed) == {0}  # the dense random 300x10 layer stays int8
    assert packed[0].nbytes < 0.2 * packed[0].dense_bytes
    assert compress.choose(g, "off") == {}
    dense = GraphBuilder((1, 64))
    g2 = dense.graph(dense.fc("fc", dense.input, 32))
    assert compress.choose(g2, "auto") == {}
    with pytest.raises(ExportError, match="no weights that can be packed"):
        b2 = GraphBuilder((1, 4, 4, 2))
        g3 = b2.graph(b2.conv("dw", b2.input, 2, depthwise=True))
        compress.choose(g3, {"dw": "relative"})


def test_export_states_the_choice_and_shared_layers_keep_their_table(tmp_path):
    from edgeslim.share import KMeansShare, share_

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 64)
    )
    with torch.no_grad():
        w = model[3].weight
        w[torch.rand(w.shape) < 0.9] = 0
    share_(model, KMeansShare(bits={"conv": 4, "linear": 3}))
    calib = torch.rand(16, 1, 8, 8)
    result = export_c(model, tmp_path, calib=calib, arm=False)
    g = result.graph
    conv_w = g[g.ops[0].weight]
    assert len(set(conv_w.scale.tolist())) == 1  # one scale: shared values stay shared
    assert len(np.unique(conv_w.data[conv_w.data != 0])) <= 16
    fc = g[g.ops[-1].weight]
    assert len(np.unique(fc.data[fc.data != 0])) <= 8
    assert len(result.packed) >= 1
    text = result.summary()
    assert "compressed (only where it saves flash)" in text
    assert any("compiled C bit-exact" in v for v in result.verified)
