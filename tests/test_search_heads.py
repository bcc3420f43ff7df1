"""The search space on a transformer: attention groups are knobs that keep whole heads."""

import os
import random
import warnings

import pytest
import torch
from torch import nn

from edgeslim.search import SearchSpace
from edgeslim.search.apply import build
from edgeslim.search.cost import layer_units
from edgeslim.search.shapes import ShapeModel

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Classifier(nn.Module):
    """A BERT encoder + mean pooling + a head: ids in, logits out (padding id 0 masked)."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64,
        )  # fmt: skip
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).long()
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(h.mean(1))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return _Classifier().eval(), torch.randint(1, 50, (1, 8))


def test_attention_groups_are_head_knobs(bert):
    model, x = bert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = SearchSpace(techniques=["channel"]).bind(model, x)
    heads = {k: v for k, v in space.info.items() if v["heads"]}
    assert sorted(heads) == ["keep:encoder.encoder.layer.0.attention.self.query"]
    for knob, info in heads.items():
        assert info == {**info, "heads": 4, "channels": 32}
        assert space.knobs[knob] == [1.0, 0.75, 0.5, 0.25]  # whole heads of 4
    ffn = space.knobs["keep:encoder.encoder.layer.0.intermediate.dense"]
    assert ffn[0] == 1.0 and min(ffn) == 0.25 and len(ffn) > 4  # neurons: the fine menu


def test_head_candidates_build_and_shapes_by_arithmetic_match(bert):
    model, x = bert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = SearchSpace(techniques=["channel"]).bind(model, x)
        shapes = ShapeModel(model, space, x)
        rng = random.Random(0)
        cand = space.sample(rng)
        cand["keep:encoder.encoder.layer.0.attention.self.query"] = 0.25
        built = build(model, cand, x, None)
    attention = built.encoder.encoder.layer[0].attention.self
    assert attention.num_attention_heads == 1 and attention.query.out_features == 8
    assert built(x).shape == (1, 3)
    got = [(u.in_shape, u.out) for _, u in layer_units(built, x)]
    assert got == [(u.in_shape, u.out) for u in shapes.units(cand)]
