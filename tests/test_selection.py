"""core/selection: choosing layers by names, globs, types and filter_fn."""

from torch import nn

import edgeslim as es
from edgeslim.core.selection import (
    layer_filter,
    lookup_layer,
    matches,
    select_layers,
    unmatched,
)


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),  # "0", "0.0", "0.1"
        nn.Flatten(),  # "1"
        nn.Linear(4, 8),  # "2"
        nn.Linear(8, 2),  # "3"
    )


def test_matches_exact_and_glob():
    assert matches("fc1", ["fc1"])
    assert matches("fc1", ["conv*", "fc?"])
    assert matches("layers.0.attn", ["layers.*.attn"])
    assert not matches("fc1", ["conv*"]) and not matches("fc1", [])
    assert not matches("FC1", ["fc*"])  # case-sensitive
    assert matches("a[0]", ["a[0]"])  # an exact name matches even if it reads as a glob


def test_unmatched_keeps_pattern_order():
    names = ["conv1", "conv2", "fc"]
    assert unmatched(["conv*", "head", "fc", "x?"], names) == ["head", "x?"]
    assert unmatched({"conv1": 0.5, "nope": 0.1}, {n: None for n in names}) == ["nope"]
    assert unmatched([], names) == [] and unmatched(["a"], []) == ["a"]
    assert unmatched(["conv*"], iter(names)) == []  # any iterable of names, read once


def test_lookup_layer_exact_name_wins_then_first_glob():
    table = {"conv*": 8, "fc*": 5, "conv2": 4}
    assert lookup_layer(table, "conv2") == 4  # exact key beats the earlier pattern
    assert lookup_layer(table, "conv1") == 8 and lookup_layer(table, "fc3") == 5
    assert lookup_layer(table, "head") is None and lookup_layer({}, "conv1") is None
    assert es.Int8PTQ(weight_bits=8, layer_bits={"fc*": 4, "fc2": 6}).bits_for("fc2") == 6


def test_select_layers_by_type():
    model = net()
    assert list(select_layers(model, nn.Linear)) == ["2", "3"]
    assert list(select_layers(model, (nn.Conv2d, nn.Linear))) == ["0.0", "2", "3"]
    assert select_layers(model, nn.Linear)["2"] is model[2]
    every = select_layers(model)
    assert list(every) == [n for n, _ in model.named_modules()] and "" in every
    assert select_layers(model, nn.Embedding) == {}


def test_select_layers_exclude_and_filter_fn():
    model = net()
    assert list(select_layers(model, nn.Linear, exclude=["3"])) == ["2"]
    assert list(select_layers(model, (nn.Conv2d, nn.Linear), exclude=["0.*"])) == ["2", "3"]
    asked = []

    def only_wide(m: nn.Module, name: str) -> bool:
        asked.append(name)
        return m.weight.shape[0] > 2

    chosen = select_layers(model, (nn.Conv2d, nn.Linear), exclude=["0.0"], filter_fn=only_wide)
    assert list(chosen) == ["2"]
    assert asked == ["2", "3"]  # excluded layers are not offered to filter_fn


def test_layer_filter():
    keep = layer_filter(["fc*"], None)
    assert not keep(nn.Identity(), "fc1") and keep(nn.Identity(), "conv1")
    keep = layer_filter([], lambda m, n: isinstance(m, nn.Linear))
    assert keep(nn.Linear(1, 1), "x") and not keep(nn.Identity(), "x")
    keep = layer_filter(iter(["a"]), lambda m, n: True)  # patterns may be any iterable
    assert not keep(nn.Identity(), "a") and not keep(nn.Identity(), "a")
