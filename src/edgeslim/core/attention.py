"""Scaled dot-product attention as the ops it is made of, for the int8 backends.

``torch.export`` records ``scaled_dot_product_attention`` as one ATen op; an int8 backend
needs its intermediates (the scores, the probabilities) as graph values a quantizer can
observe. :func:`decompose_attention` rewrites each call as ``softmax(q @ k^T * scale
[masked]) @ v`` (:func:`attention_mask` applies the mask as the fused op does).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten


def attention_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` with an attention mask applied as ``scaled_dot_product_attention`` does:
    a boolean mask keeps the True positions, a float mask is added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def head_dim_scale(scores: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``scores / sqrt(d)`` for queries ``q`` of head size ``d`` (the default scale)."""
    return scores * q.shape[-1] ** -0.5


LEAF_FUNCTIONS = (attention_mask, head_dim_scale)  # torch.fx tracers keep them as calls


def decompose_attention(gm: fx.GraphModule) -> int:
    """Replace each ``scaled_dot_product_attention`` call of ``gm`` (without dropout or a
    causal flag) by its ops: ``softmax(q @ k^T * scale [masked]) @ v``, so that each
    intermediate is a graph value a quantizer can observe. Returns how many were replaced."""
    targets = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        a = dict(zip(names, node.args, strict=False))
        a.update({k: v for k, v in node.kwargs.items() if k in names})
        if a.get("dropout_p", 0.0) or a.get("is_causal", False) or node.kwargs.get("enable_gqa"):
            continue
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        meta = q.meta.get("val", q.meta.get("tensor_meta"))
        scale = a.get("scale")
        if scale is None and meta is not None:
            scale = 1.0 / math.sqrt(int(meta.shape[-1]))
        g = gm.graph
        with g.inserting_before(node):
            kt = g.call_function(torch.transpose, (k, -2, -1))
            scores = g.call_function(torch.matmul, (q, kt))
            if scale is None:  # a torch.fx graph: the head size is known when it runs
                scores = g.call_function(head_dim_scale, (scores, q))
            else:
                scores = g.call_function(operator.mul, (scores, float(scale)))
            if mask is not None:
                scores = g.call_function(attention_mask, (scores, mask))
            probs = g.call_function(torch.softmax, (scores, -1))
            out = g.call_function(torch.matmul, (probs, v))
        node.replace_all_uses_with(out)
        g.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
