"""The rule for verbs, over every registered config (docs/architecture.md):

- a verb ending in ``_`` changes its argument in place and returns a log (a dict);
- ``quantize`` returns a new model and leaves its argument untouched, bit for bit;
- ``quantize_`` refuses, before touching the model, a config that must build a new graph.
"""

import copy

import pytest
import torch
from torch import nn

import edgeslim as es
from edgeslim import lowrank, prune, quant, share
from edgeslim.core.errors import ConfigError


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _changed(before: nn.Module, after: nn.Module) -> bool:
    """Structure or any tensor differs."""
    if [type(m) for m in before.modules()] != [type(m) for m in after.modules()]:
        return True
    return not _same(_state(before), _state(after))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    return es.load_model(f"zoo:{name}").eval()


# config -> (model factory, keyword arguments given the mnist fixture)
def _cases(mnist):
    calib = mnist.calib(32)
    tokens = torch.randn(32, 16)
    x = mnist.example(2)
    return {
        es.MagnitudePrune: (lambda: _zoo("lenet300"), es.MagnitudePrune(sparsity=0.5), {}),
        es.OBDPrune: (
            lambda: _zoo("lenet300"),
            es.OBDPrune(sparsity=0.5, samples=32),
            {"data": mnist},
        ),
        es.OBSPrune: (lambda: _zoo("lenet300"), es.OBSPrune(sparsity=0.5), {"calib": calib}),
        es.NMPrune: (lambda: _zoo("lenet300"), es.NMPrune(n=2, m=4), {}),
        es.ChannelPrune: (lambda: _zoo("lenet5"), es.ChannelPrune(ratio=0.5), {"example": x}),
        es.DepthPrune: (lambda: _zoo("resnet8"), es.DepthPrune(blocks=1), {"example": x}),
        es.Wanda: (_mlp, es.Wanda(sparsity=0.5), {"calib": tokens, "progress": False}),
        es.SparseGPT: (_mlp, es.SparseGPT(sparsity=0.5), {"calib": tokens, "progress": False}),
        es.KMeansShare: (lambda: _zoo("lenet300"), es.KMeansShare(bits=3), {}),
        es.HashShare: (lambda: _zoo("lenet300"), es.HashShare(ratio=1 / 8), {}),
        es.SVD: (lambda: _zoo("lenet300"), es.SVD(rank=8), {}),
        es.ConvDecompose: (lambda: _zoo("lenet5"), es.ConvDecompose(rank=4, solver="svd"), {}),
        es.Int8PTQ: (lambda: _zoo("lenet5"), es.Int8PTQ(), {"calib": calib}),
        es.QAT: (lambda: _zoo("lenet300"), es.QAT(epochs=0), {"calib": calib, "data": mnist}),
        es.LSQ: (lambda: _zoo("lenet300"), es.LSQ(epochs=0), {"calib": calib, "data": mnist}),
        es.MixedPrecision: (
            lambda: _zoo("lenet300"),
            es.MixedPrecision(budget_bytes=120_000, calib_size=32),
            {"calib": calib},
        ),
        es.DynamicFixedPoint: (lambda: _zoo("lenet300"), es.DynamicFixedPoint(), {"calib": calib}),
        es.BWN: (lambda: _zoo("lenet300"), es.BWN(epochs=0), {}),
        es.TWN: (lambda: _zoo("lenet300"), es.TWN(epochs=0), {}),
        es.TTQ: (lambda: _zoo("lenet300"), es.TTQ(epochs=0), {}),
        es.GPTQ: (_mlp, es.GPTQ(bits=4, group_size=16), {"calib": tokens, "progress": False}),
        es.RTN: (_mlp, es.RTN(bits=4, group_size=16), {}),
        es.SmoothQuant: (_mlp, es.SmoothQuant(), {"calib": tokens, "progress": False}),
    }


IN_PLACE = {"prune_": prune.prune_, "share_": share.share_, "lowrank_": lowrank.lowrank_}


def test_every_registered_config_has_a_case(mnist):
    registered = {
        *prune.REGISTRY.handlers,
        *share.REGISTRY.handlers,
        *lowrank.REGISTRY.handlers,
        *quant.REGISTRY.handlers,
    }
    assert registered == set(_cases(mnist)), "add the new config to _cases"


@pytest.mark.parametrize(
    ("registry", "verb"),
    [
        (prune.REGISTRY, prune.prune_),
        (share.REGISTRY, share.share_),
        (lowrank.REGISTRY, lowrank.lowrank_),
    ],
)
def test_trailing_underscore_verbs_change_their_argument_in_place(mnist, registry, verb):
    cases = _cases(mnist)
    for cfg_type in registry.handlers:
        make, cfg, kwargs = cases[cfg_type]
        model = make()
        before = copy.deepcopy(model)
        log = verb(model, cfg, **kwargs)
        assert isinstance(log, dict), cfg_type.__name__
        assert _changed(before, model), f"{cfg_type.__name__}: the argument was not changed"


def test_quantize_returns_a_new_model_and_leaves_the_argument_untouched(mnist):
    cases = _cases(mnist)
    for cfg_type in quant.REGISTRY.handlers:
        make, cfg, kwargs = cases[cfg_type]
        model = make()
        state, types = _state(model), [type(m) for m in model.modules()]
        result = quant.quantize(model, cfg, **kwargs)
        assert result is not model, cfg_type.__name__
        assert _same(_state(model), state), f"{cfg_type.__name__} changed its argument"
        assert [type(m) for m in model.modules()] == types, cfg_type.__name__


def test_quantize_underscore_changes_in_place_or_refuses_before_touching(mnist):
    cases = _cases(mnist)
    for cfg_type in quant.REGISTRY.handlers:
        make, cfg, kwargs = cases[cfg_type]
        model = make()
        before = copy.deepcopy(model)
        if cfg.builds_graph or getattr(cfg, "graph", None) == "fx":
            with pytest.raises(ConfigError, match=r"use model = edgeslim\.quantize"):
                quant.quantize_(model, cfg, **kwargs)
            assert not _changed(before, model), cfg_type.__name__
            continue
        log = quant.quantize_(model, cfg, **kwargs)
        assert isinstance(log, dict), cfg_type.__name__
        assert _changed(before, model), f"{cfg_type.__name__}: the argument was not changed"


def test_verbs_refuse_keywords_their_method_does_not_take():
    model = _zoo("lenet300")
    with pytest.raises(ConfigError, match=r"MagnitudePrune takes no argument\(s\) \['example'\]"):
        es.prune_(model, es.MagnitudePrune(sparsity=0.5), example=torch.zeros(1, 1, 28, 28))
    with pytest.raises(ConfigError, match=r"KMeansShare takes no argument\(s\) \['calib'\]"):
        es.share_(model, es.KMeansShare(bits=3), calib=torch.zeros(1, 1, 28, 28))
    with pytest.raises(ConfigError, match="no handler for config SVD"):
        es.prune_(model, es.SVD(rank=2))
    with pytest.raises(ConfigError, match="no handler for config Module"):
        es.quantize(model, nn.Module())


def test_quantize_refuses_keywords_its_method_does_not_take():
    """Regression: the quantize handlers took ``**_`` and silently ignored any keyword
    (a ``teacher=`` given to post-training quantization did nothing)."""
    model = _zoo("lenet300")
    x = torch.rand(8, 1, 28, 28)
    with pytest.raises(ConfigError, match=r"Int8PTQ takes no argument\(s\) \['teacher'\]"):
        es.quantize_(model, es.Int8PTQ(), calib=x, teacher=_zoo("lenet300"))
    with pytest.raises(ConfigError, match=r"MixedPrecision takes no argument\(s\) \['data'\]"):
        es.quantize(model, es.MixedPrecision(avg_bits=6), calib=x, data=object())
    with pytest.raises(ConfigError, match=r"it takes \['calib', 'filter_fn', 'progress'\]"):
        es.quantize(model, es.RTN(bits=4), seed=1)


def test_registering_a_handler_with_an_unknown_context_field_fails():
    from edgeslim.core.registry import Context, Registry

    registry = Registry("demo_")
    with pytest.raises(ValueError, match=r"takes= names no Context field\(s\) \['calibration'\]"):
        registry.register("x", es.MagnitudePrune, lambda m, c, ctx: {}, takes=("calibration",))
    seen = []
    registry.register("y", es.MagnitudePrune, lambda m, c, ctx: seen.append(ctx), takes=("seed",))
    registry.call(nn.Linear(2, 2), es.MagnitudePrune(sparsity=0.5), seed=3)
    assert seen == [Context(seed=3)]
