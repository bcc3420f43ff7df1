"""Structured pruning of transformers' models (needs the ``hf`` extra; skipped without it)."""

import os
import warnings

import numpy as np
import pytest
import torch

from edgeslim.core.hooks import output_tensors
from edgeslim.profiling.runtimes import ort_outputs, ort_session
from edgeslim.prune import ChannelPrune, prune_

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _ort_max_abs_diff(model, x) -> float:
    """Largest |ONNX Runtime - PyTorch| over every output of ``model`` on ``x``."""
    session = ort_session(model, x)
    with torch.no_grad():
        reference = list(output_tensors(model(**x) if isinstance(x, dict) else model(x)))
    got = ort_outputs(session, x)
    assert [r.shape for r in reference] == [g.shape for g in got]
    return max(float(np.abs(r.numpy() - g).max()) for r, g in zip(reference, got, strict=True))


def test_bert_heads_and_ffn_are_removed_and_exported():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 9)), "attention_mask": torch.ones(2, 9).long()}
    attention = model.encoder.layer[0].attention.self
    with torch.no_grad():  # head 1 of layer 0 contributes nothing: zero values, zero columns
        attention.value.weight[16:32] = 0
        attention.value.bias[16:32] = 0
        model.encoder.layer[0].attention.output.dense.weight[:, 16:32] = 0
        before = model(**x).last_hidden_state
    cfg = ChannelPrune(layer_ratio={"encoder.layer.0.attention.*": 0.25})
    got = prune_(model, cfg, example=x)["removed"]
    assert got == {"encoder.layer.0.attention.self.query": 0.25}
    assert attention.num_attention_heads == 3 and attention.query.out_features == 48
    torch.testing.assert_close(model(**x).last_hidden_state, before, atol=1e-5, rtol=1e-4)
    prune_(model, ChannelPrune(ratio=0.5), example=x)  # the hidden size (output) is kept
    layer = model.encoder.layer[1]
    assert layer.attention.self.num_attention_heads == 2
    assert layer.intermediate.dense.out_features == 64
    assert model(**x).last_hidden_state.shape == (2, 9, 64)
    assert _ort_max_abs_diff(model, x) < 1e-4


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "vit"])
def test_vision_models_from_configs_prune_by_half_and_agree_in_onnx(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = {
        "resnet": lambda: transformers.ResNetForImageClassification(
            transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])
        ),
        "mobilenetv2": lambda: transformers.MobileNetV2ForImageClassification(
            transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.35)
        ),
        "vit": lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128)
        ),
    }[name]().eval()  # fmt: skip
    shape = model(x).logits.shape
    params = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_(model, ChannelPrune(ratio=0.5), example=x)
    assert sum(p.numel() for p in model.parameters()) < 0.65 * params
    assert model(x).logits.shape == shape
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    if name == "vit":  # its hidden size reaches cls_token / position embeddings: named, kept
        assert len(skipped) == 1 and "cls_token" in skipped[0]
        assert model.vit.layers[0].attention.num_attention_heads == 2
    else:
        assert skipped == []
    assert _ort_max_abs_diff(model, x) < 1e-4
