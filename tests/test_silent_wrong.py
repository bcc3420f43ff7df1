"""Regressions for silent wrong results on transformers and friends (issue 20, point 4):
GPT-2's ``Conv1D`` layers pruned, tied weights left alone (and said so), low-rank never
making a layer larger, a structured prune that cuts nothing saying so, and every layer left
float listed by ``Int8PTQ``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgeslim as es
from edgeslim.quant import Int8PTQ, quantize
from edgeslim.quant.modules import ActQuant, QuantLinear

transformers = pytest.importorskip("transformers")
VOCAB = 96


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
        vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    return transformers.OPTForCausalLM(cfg).eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv1d(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def test_magnitude_prune_gpt2_prunes_conv1d_and_leaves_the_tied_embedding():
    model = gpt2()
    embedding = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"lm_head left unchanged: .*tied to transformer\.wte"):
        sparsity = es.prune_(model, es.MagnitudePrune(sparsity=0.5))
    layers = _conv1d(model)
    assert len(layers) == 8 and set(layers) <= set(sparsity)
    for name, m in layers.items():
        assert float((m.weight == 0).float().mean()) > 0.2, name  # pruned, not left dense
    assert "lm_head" not in sparsity
    assert torch.equal(model.transformer.wte.weight, embedding)  # not half zeroed
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    model(torch.randint(0, VOCAB, (1, 8)))


def test_magnitude_prune_opt_leaves_the_tied_embedding():
    model = opt()
    embedding = model.model.decoder.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match="lm_head left unchanged"):
        sparsity = es.prune_(model, es.MagnitudePrune(sparsity=0.5))
    assert "lm_head" not in sparsity and "model.decoder.layers.0.fc1" in sparsity
    assert torch.equal(model.model.decoder.embed_tokens.weight, embedding)


def test_svd_never_factorises_a_tied_lm_head_nor_grows_a_model():
    for model, embedding in ((gpt2(), "transformer.wte"), (opt(), "model.decoder.embed_tokens")):
        before = _params(model)
        with pytest.warns(UserWarning, match="lm_head left unchanged"):
            log = es.lowrank_(model, es.SVD(rank=8), calib=torch.randint(0, VOCAB, (2, 8)))
        assert "lm_head" not in log and log
        assert isinstance(model.lm_head, nn.Linear)
        assert model.lm_head.weight is model.get_submodule(embedding).weight
        assert _params(model) < before


def test_svd_factorises_gpt2_conv1d_as_the_linear_layer_it_is():
    model = gpt2()
    layers = _conv1d(model)
    weights = {n: m.weight.detach().t().double() for n, m in layers.items()}  # (out, in)
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.warns(UserWarning, match="tied"):
        log = es.lowrank_(model, es.SVD(rank=8), calib=ids)
    assert set(log) == set(layers)
    for name, w in weights.items():
        pair = model.get_submodule(name)
        assert isinstance(pair, es.lowrank.Factored) and pair.rank == 8, name
        got = pair[1].weight.double() @ pair[0].weight.double()  # (out, in)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = u[:, :8] * s[:8] @ vh[:8]  # Eckart-Young: the closest rank-8 matrix
        assert torch.allclose(got, best, atol=1e-5), name
        assert torch.equal(pair[1].bias, layers[name].bias), name
    model(ids)


def test_svd_of_conv1d_at_full_rank_reproduces_the_layer():
    from edgeslim.lowrank.svd import weight_factors

    layer = gpt2().transformer.h[0].mlp.c_fc  # Conv1D 64 -> 256, weight stored (64, 256)
    factors = weight_factors(layer)
    assert factors.shape == "linear" and factors.max_rank == 64
    pair = factors.build(64)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.allclose(pair(x), layer(x), atol=1e-5)


def test_svd_skips_a_layer_it_would_make_larger_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 256)).eval()
    before = {n: _params(m) for n, m in model.named_children()}
    with pytest.warns(UserWarning, match="0 left as it is"):
        log = es.lowrank_(model, es.SVD(rank=40), calib=torch.randn(4, 64))
    assert "0" not in log and isinstance(model[0], nn.Linear)
    for name, m in model.named_children():
        assert _params(m) <= before[name], name


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


def test_channel_prune_that_cuts_nothing_says_why():
    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    with pytest.warns(UserWarning, match="removed no channel: .*no channel group"):
        out = es.prune_(model, es.ChannelPrune(ratio=0.5), example=torch.randint(0, 50, (2, 7)))
    assert out["removed"] == {}


class FunctionalUse(nn.Module):
    """``head`` is used through its weight, never called: the traced graph has no call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return nn.functional.linear(torch.relu(self.body(x)), self.head.weight, self.head.bias)


def test_int8ptq_lists_every_layer_it_leaves_float():
    torch.manual_seed(0)
    model = FunctionalUse().eval()
    q = quantize(model, Int8PTQ(), calib=torch.randn(8, 16))
    info = q.quant_info
    assert info["quantized"] == ["body"]
    assert "head" in info["float_layers"], info


def test_int8ptq_on_gpt2_falls_back_to_modules_and_quantizes_conv1d():
    model = gpt2()
    ids = torch.randint(0, VOCAB, (4, 16))
    q = quantize(model, Int8PTQ(), calib=ids)
    info = q.quant_info
    assert info["graph"] == "module"
    assert set(_conv1d(model)) <= set(info["quantized"]), info
    every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    every |= set(_conv1d(model))
    assert every <= set(info["quantized"]) | set(info["float_layers"])
    for name in _conv1d(model):
        assert isinstance(q.get_submodule(name), QuantLinear), name
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    assert not torch.equal(out, ref)  # really quantized
    err = (out - ref).abs().max()
    assert err < 0.05 * ref.abs().max(), err
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, cos


def test_conv1d_to_linear_keeps_the_outputs():
    from edgeslim.core.linear import conv1d_to_linear_

    model = gpt2()
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    names = set(_conv1d(model))
    assert set(conv1d_to_linear_(model)) == names and len(names) == 8
    assert not _conv1d(model)
    fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (64, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=1e-5)


def test_channel_prune_cuts_gpt2_ffn_and_exports_with_keyword_inputs(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip (use_cache on, as a user's model has it)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8).long()}
    x["attention_mask"][1, -2:] = 0
    with torch.no_grad():
        shape = model(**x).logits.shape
    out = es.prune_(model, es.ChannelPrune(ratio=0.5), example=x)
    assert out["removed"] == {"transformer.h.0.mlp.c_fc": 0.5}
    assert model.transformer.h[0].mlp.c_fc.out_features == 64
    assert model.transformer.h[0].attn.c_attn.out_features == 96  # fused q/k/v kept whole
    with torch.no_grad():
        assert model(**x).logits.shape == shape
    # a dict example reaches forward by keyword (GPT-2's 2nd positional is past_key_values)
    res = es.export_onnx(model, tmp_path / "gpt2.onnx", x, verify=True)
    assert res.max_abs_diff is not None and res.max_abs_diff <= res.tolerance
    import onnx

    names = [i.name for i in onnx.load(str(tmp_path / "gpt2.onnx")).graph.input]
    assert names == ["input_ids", "attention_mask"]


def _dead_middle(kind: str) -> nn.Module:
    """An MLP whose middle layer outputs all zeros (a dead ReLU) or only denormals."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()
    with torch.no_grad():
        if kind == "zero":
            model[2].bias.fill_(-100.0)  # ReLU(-100 + small) == 0 everywhere
        else:
            model[2].weight.mul_(1e-42)  # outputs float32 cannot scale (denormals)
            model[2].bias.fill_(1e-44)
    return model


@pytest.mark.parametrize("kind", ["zero", "denormal"])
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_int8ptq_with_an_all_zero_layer_output_keeps_a_sane_scale(kind, activations):
    model = _dead_middle(kind)
    x = torch.randn(64, 8)
    with torch.no_grad():
        ref = model(x)
        middle = model[:4](x)
    assert middle.abs().max() < 1e-30  # the case: nothing float32 can scale
    q = quantize(model, Int8PTQ(activations=activations), calib=x)
    with torch.no_grad():
        out = q(x)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 1e-2 * ref.abs().max()
    for name, m in q.named_modules():  # every input scale stays usable
        if isinstance(m, ActQuant):
            scale = m._dynamic_params(middle)[0] if m.dynamic else m._params()[0]
            assert torch.isfinite(scale).all(), name
            assert (scale >= torch.finfo(torch.float32).tiny).all(), (name, scale)
