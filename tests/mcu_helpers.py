"""Helpers shared by the microcontroller-export tests: hand-built integer graphs, a check that
a memory plan never lets two live tensors overlap, and every-tensor comparisons."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.export.int8 import ir


class GraphBuilder:
    """Build an :class:`ir.Graph` by hand (random weights, chosen qparams)."""

    def __init__(self, input_shape, seed: int = 0, scale: float = 0.05, zp: int = -3):
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, ir.Tensor] = {}
        self.ops: list[ir.Op] = []
        self.input = self.act("input", input_shape, scale, zp)

    def act(self, name, shape, scale=0.05, zp=0):
        s = np.array([np.float32(scale)], np.float64)
        self.tensors[name] = ir.Tensor(name, tuple(shape), "int8", s, np.array([zp]))
        return name

    def const(self, name, data, dtype, scale, axis=None):
        scale = np.atleast_1d(np.asarray(scale, np.float32).astype(np.float64))
        self.tensors[name] = ir.Tensor(
            name,
            data.shape,
            dtype,
            scale,
            np.zeros(len(scale), np.int64),
            np.asarray(data, np.int64),
            axis,
        )
        return name

    def conv(
        self, name, x, cout, k=3, stride=1, pad=None, depthwise=False, act=None, scale=0.04, zp=2
    ):
        xt = self.tensors[x]
        _, h, w, cin = xt.shape
        pad = (k // 2,) * 4 if pad is None else pad
        ho = (h + pad[0] + pad[2] - k) // stride + 1
        wo = (w + pad[1] + pad[3] - k) // stride + 1
        if depthwise:
            wshape, axis, n = (1, k, k, cout), 3, cout
        else:
            wshape, axis, n = (cout, k, k, cin), 0, cout
        wq = self.rng.integers(-127, 128, wshape)
        ws = self.rng.uniform(0.002, 0.01, n)
        weight = self.const(f"{name}_w", wq, "int8", ws, axis)
        bias = self.const(
            f"{name}_b", self.rng.integers(-2000, 2000, n), "int32", xt.qscale * ws, 0
        )
        out = self.act(name, (1, ho, wo, cout), scale, zp)
        self.ops.append(
            ir.Conv2D(
                name,
                [x],
                out,
                weight=weight,
                bias=bias,
                stride=(stride, stride),
                padding=tuple(pad),
                depthwise=depthwise,
                activation=act,
            )
        )
        return out

    def fc(self, name, x, cout, act=None, scale=0.05, zp=0):
        cin = self.tensors[x].size
        weight = self.const(f"{name}_w", self.rng.integers(-127, 128, (cout, cin)), "int8", 0.003)
        bias = self.const(
            f"{name}_b",
            self.rng.integers(-500, 500, cout),
            "int32",
            self.tensors[x].qscale * 0.003,
            0,
        )
        out = self.act(name, (1, cout), scale, zp)
        self.ops.append(ir.FullyConnected(name, [x], out, weight=weight, bias=bias, activation=act))
        return out

    def add(self, name, a, b, act=None, scale=0.06, zp=-1):
        out = self.act(name, self.tensors[a].shape, scale, zp)
        self.ops.append(ir.Add(name, [a, b], out, activation=act))
        return out

    def reshape(self, name, x, shape):
        t = self.tensors[x]
        out = self.act(name, shape, t.qscale, t.qzero)
        self.ops.append(ir.Reshape(name, [x], out))
        return out

    def pool(self, name, x, mode, k, stride):
        t = self.tensors[x]
        _, h, w, c = t.shape
        out = self.act(
            name, (1, (h - k) // stride + 1, (w - k) // stride + 1, c), t.qscale, t.qzero
        )
        self.ops.append(
            ir.Pool2D(name, [x], out, mode=mode, kernel=(k, k), stride=(stride, stride))
        )
        return out

    def softmax(self, name, x):
        out = self.act(name, self.tensors[x].shape, 1 / 256, -128)
        self.ops.append(ir.Softmax(name, [x], out))
        return out

    def graph(self, output: str) -> ir.Graph:
        g = ir.Graph(dict(self.tensors), list(self.ops), self.input, output)
        ir.prepare(g)
        g.validate()
        return g


def check_no_overlap(graph: ir.Graph, plan) -> None:
    """Independent check of a plan: at every op, no two live arena tensors share a byte,
    except tensors of one buffer (reshape aliases, an in-place op's input and output)."""
    live_at: dict[int, list[tuple[str, int, int, int]]] = {}
    for b_index, buf in enumerate(plan.buffers):
        if buf.kind not in ("arena", "scratch"):
            continue
        assert buf.offset >= 0 and buf.offset + buf.size <= plan.arena_size, buf
        for name, m in buf.members.items():
            for i in range(max(m.start, 0), m.end + 1):
                live_at.setdefault(i, []).append((name, b_index, buf.offset + m.rel, m.size))
    for i, items in live_at.items():
        for x in range(len(items)):
            for y in range(x + 1, len(items)):
                n1, b1, o1, s1 = items[x]
                n2, b2, o2, s2 = items[y]
                if b1 != b2 and s1 and s2:
                    assert o1 + s1 <= o2 or o2 + s2 <= o1, f"op {i}: {n1} and {n2} overlap"


def compare_tensors(expected: dict, got: dict, names) -> list[str]:
    """Names of the tensors whose values differ (shapes flattened)."""
    return [
        n
        for n in names
        if not np.array_equal(np.asarray(expected[n]).reshape(-1), np.asarray(got[n]).reshape(-1))
    ]


# ------------------------------------------------------------------- the three nets, lowered once


MODELS = ("lenet5", "mobilenetv2", "ds_cnn")


@functools.cache
def mnist_images(shape: tuple[int, ...], n: int, split: str = "test"):
    """Real MNIST digits (N, *shape) in [0, 1]; resized (bilinear) when ``shape`` is not 28x28."""
    import torch.nn.functional as F

    from edgeslim import load_data

    data = load_data("mnist")
    x = data.train.x[:n] if split == "train" else data.test.x[:n]
    if tuple(x.shape[1:]) != shape:
        x = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
    return x


@functools.cache
def model_and_graph(name: str):
    """(model, int8 graph) of a test net with seeded weights, calibrated on 64 MNIST digits."""
    import torch

    from edgeslim import zoo
    from edgeslim.core.models.kws import ds_cnn
    from edgeslim.export import int8

    torch.manual_seed(0)
    model = ds_cnn() if name == "ds_cnn" else zoo.create(name)
    model.eval()
    calib = mnist_images(tuple(model.input_shape), 64, "train")
    return model, int8.lower(model, calib, name=name)


class AllOps(nn.Module):
    """Every op kind: conv + BN1d-less linear, depthwise, two branches concatenated with
    different ranges (-> requantize), add, max / avg pooling, mean, relu6, softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depth multiplier 2
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(16, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(16, 10)
        self.bn1d = nn.BatchNorm1d(10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)  # (B, 8, 14, 14)
        x = F.hardtanh(self.dw(x), 0.0, 6.0)  # (B, 16, 14, 14)
        y = torch.cat([self.bn(self.a(x)), torch.relu(self.b(x))], 1)  # (B, 16, 14, 14)
        y = F.avg_pool2d(y + x, 2)  # (B, 16, 7, 7)
        y = y.mean((2, 3))  # (B, 16)
        return F.softmax(self.bn1d(self.fc(y)), dim=1)


def check_every_tensor(graph: ir.Graph, q: np.ndarray) -> None:
    """Every tensor of ``graph`` on the int8 inputs ``q``: the reference interpreter, the
    compiled C (when this machine has a C compiler) and TFLite Micro agree bit for bit.
    Skips the TFLite Micro part (after checking C) when tflite-micro is not installed."""
    import pytest

    from edgeslim.export import tflite, tflite_format
    from edgeslim.export.c import codegen, hostbuild, planner
    from edgeslim.export.int8 import reference

    expected = [reference.run(graph, x[None]) for x in q]
    if hostbuild.compiler() is not None:
        with hostbuild.Build(codegen.generate(graph, planner.plan_memory(graph)), trace=True) as b:
            _, trace = b.run(q, graph[graph.output].size, trace=True)
        n = len(trace) // len(q)
        for k in range(len(q)):
            assert hostbuild.check_trace(graph, expected[k], trace[k * n : (k + 1) * n]) == [], k
    if not tflite.tflm_available():
        pytest.skip("tflite-micro is not installed: C checked, TFLite Micro not compared")
    _, tensors = tflite.run_tflm(graph, tflite_format.serialize(graph), q, every_tensor=True)
    for k in range(len(q)):
        assert compare_tensors(expected[k], tensors[k], graph.activations()) == [], k
