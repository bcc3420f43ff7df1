"""BatchNorm folding: conv -> BatchNorm becomes one conv, before quantization.

``w' = w * gamma / sqrt(var + eps)`` per output channel and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` (Jacob et al. 2018, section 3.2;
``torch.nn.utils.fusion.fuse_conv_bn_weights`` does the arithmetic). The BatchNorm is
replaced by ``nn.Identity`` so the model keeps its structure and names. Uses the running
statistics, i.e. eval-mode BatchNorm.
"""

from __future__ import annotations

import itertools

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (conv gains a bias if it had none)."""
    w, b = fuse_conv_bn_weights(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
    )
    conv.weight = nn.Parameter(w.detach().clone())
    conv.bias = nn.Parameter(b.detach().clone())


def fold_bn_sequential_(model: nn.Module) -> list[str]:
    """Fold every ``Conv2d`` directly followed by a BatchNorm inside an ``nn.Sequential``.

    Returns the folded conv names. Works on any model (no tracing needed).
    """
    folded = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold_pair(conv, bn)
                seq._modules[b] = nn.Identity()
                folded.append(f"{prefix}.{a}" if prefix else a)
    return folded


def fold_bn_graph_(gm: fx.GraphModule) -> list[str]:
    """Fold every conv -> BatchNorm pair in a traced graph (the conv's only user is the BN).

    The BN node is removed from the graph and its module replaced by ``nn.Identity``.
    Returns the folded conv names.
    """
    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if not isinstance(conv, (nn.Conv2d, nn.Conv1d)):
            continue
        _fold_pair(conv, modules[node.target])
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        _replace_module(gm, node.target, nn.Identity())
        folded.append(src.target)
    gm.graph.lint()
    gm.recompile()
    return folded


def _replace_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)
