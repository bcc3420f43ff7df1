"""The training, evaluation and distillation loops move every batch, whole, to the model's
device (``core.device``); on CPU the moves cost nothing and change nothing."""

import collections
from collections import UserDict

import pytest
import torch
from torch import nn

import edgeslim as es
from edgeslim.core import device as device_mod
from edgeslim.core import kd, train
from edgeslim.core.device import model_device, to_device


class Encoding(UserDict):
    """Like transformers' BatchEncoding: a mapping built from a dict."""


Pair = collections.namedtuple("Pair", "x y")


def test_to_device_moves_every_tensor_and_keeps_containers():
    batch = (
        torch.zeros(2),
        [torch.ones(1), "label", 3],
        {"a": torch.zeros(1), "b": (torch.ones(2), None)},
        Encoding({"input_ids": torch.zeros(1, 4, dtype=torch.long)}),
        Pair(torch.zeros(1), torch.ones(1)),
    )
    moved = to_device(batch, "meta")
    assert moved[0].is_meta and moved[1][0].is_meta and moved[1][1:] == ["label", 3]
    assert moved[2]["a"].is_meta and moved[2]["b"][0].is_meta and moved[2]["b"][1] is None
    assert isinstance(moved[3], Encoding) and moved[3]["input_ids"].is_meta
    assert isinstance(moved[4], Pair) and moved[4].y.is_meta
    same = torch.zeros(3)
    assert to_device(same, "cpu") is same  # already there: no copy


def test_model_device():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    bn = nn.BatchNorm1d(2, affine=False, device="meta")  # buffers only
    assert model_device(bn) == torch.device("meta")


@pytest.fixture
def moves(monkeypatch):
    """Record every (batch, device) the loops move, checking the device is the model's."""
    seen = []
    real = device_mod.to_device

    def recording(batch, device):
        seen.append((type(batch).__name__, torch.device(device)))
        return real(batch, device)

    monkeypatch.setattr(train, "to_device", recording)
    monkeypatch.setattr(kd, "to_device", recording)
    return seen


def test_fit_and_evaluate_move_each_batch_to_the_models_device(mnist, moves):
    data = mnist.limit(130)
    model = es.load_model("zoo:lenet300")
    es.fit(model, data, epochs=1, batch_size=64, device="cpu", progress=False)
    inputs = [m for m in moves if m[0] == "Tensor"]
    assert inputs and all(d == torch.device("cpu") for _, d in moves)
    # 3 training batches x (inputs, labels) + the val evaluation's batches
    assert len(inputs) >= 6
    moves.clear()
    es.evaluate(model, data, batch_size=250)
    assert len(moves) == 1 + 2 * 4  # the shape probe + (inputs, labels) per batch


def test_distillation_moves_batches_to_the_teacher_and_back(mnist, moves):
    data = mnist.limit(64)
    teacher = es.load_model("zoo:lenet300").eval()
    student = es.load_model("zoo:lenet300")
    es.distill(student, teacher, data, es.KD(hints={"fc1": "fc1"}), epochs=1, progress=False)
    assert moves and all(d == torch.device("cpu") for _, d in moves)
    assert len(moves) > 2 * 1 + 2  # probes, batches, teacher outputs


def test_the_device_argument_gives_the_same_numbers_on_cpu(mnist):
    data = mnist.limit(100)
    a, b = es.load_model("zoo:lenet300"), es.load_model("zoo:lenet300")
    b.load_state_dict(a.state_dict())
    ha = es.fit(a, data, epochs=1, progress=False)
    hb = es.fit(b, data, epochs=1, progress=False, device="cpu")
    assert ha == hb and es.evaluate(a, data) == es.evaluate(b, data, device=torch.device("cpu"))
