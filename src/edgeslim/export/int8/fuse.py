"""Fuse the traced float ops into the ops the int8 graph has.

:func:`fuse` gives every conv / linear its float weights and bias (or, for a layer of a
quantized model, its frozen integer ones), folds BatchNorm into the conv / linear before it
(``torch.nn.utils.fusion``), fuses ReLU / ReLU6 into the conv, linear or add that produces
their input, and zero padding (``nn.ZeroPad2d``, ``F.pad``) into the conv that reads it.
What cannot be fused (a BatchNorm or activation elsewhere) is refused, all at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from edgeslim.core.errors import LoweringError
from edgeslim.export.int8.trace import FloatOp, conv_pair


def fuse(ops: list[FloatOp], outputs: Sequence[str] = ()) -> list[FloatOp]:
    """Fold BatchNorm, fuse activations and zero padding; refuse what is left over.

    Conv / linear ops get ``attrs["weight"]`` / ``attrs["bias"]`` (float64 numpy, folded).
    ``outputs`` (the values the model returns) count as uses: a value that is returned is
    never fused away into the op after it.
    """
    for o in ops:
        if o.kind not in ("conv", "linear"):
            continue
        if o.kind == "conv":
            o.attrs["padding"] = _conv_padding(o.module)
        if hasattr(o.module, "weight_int8"):
            _read_quantized_layer(o)
        else:
            o.attrs["weight"] = o.module.weight.detach().double().numpy().copy()
            bias = o.module.bias
            o.attrs["bias"] = (
                np.zeros(o.module.weight.shape[0])
                if bias is None
                else bias.detach().double().numpy().copy()
            )
    uses = _use_counts(ops, outputs)
    producers = {o.value: o for o in ops}
    kept: list[FloatOp] = []
    problems: list[str] = []
    for o in ops:
        src = producers.get(o.inputs[0]) if o.inputs else None
        sole = src is not None and uses[src.value] == 1
        if o.kind == "bn":
            if src is not None and "weight_int" in src.attrs:
                problems.append(f"{o.name}: BatchNorm after a quantized layer (fold it first)")
                continue
            if not (sole and src.kind in ("conv", "linear") and "activation" not in src.attrs):
                problems.append(f"{o.name}: BatchNorm must directly follow a conv or linear")
                continue
            _fold_bn(src, o.module)
            _rename(src, o, producers)
        elif o.kind == "act":
            if not (sole and src.kind in ("conv", "linear", "add")):
                problems.append(f"{o.name}: ReLU/ReLU6 must directly follow a conv, linear or add")
                continue
            if "activation" in src.attrs:
                problems.append(f"{o.name}: two activations in a row")
                continue
            src.attrs["activation"] = o.attrs["activation"]
            _rename(src, o, producers)
        else:
            kept.append(o)
    # zero padding folds into the conv that reads it
    uses = _use_counts(kept, outputs)
    pads = {o.value: o for o in kept if o.kind == "pad"}
    for o in kept:
        if o.kind == "conv" and o.inputs[0] in pads and uses[o.inputs[0]] == 1:
            pad = pads.pop(o.inputs[0])
            if len(pad.attrs["pad"]) != 4:
                problems.append(f"{pad.name}: padding must give (left, right, top, bottom)")
                continue
            left, right, top, bottom = pad.attrs["pad"]
            t, lft, b, r = o.attrs["padding"]
            o.attrs["padding"] = (t + top, lft + left, b + bottom, r + right)
            o.inputs = list(pad.inputs)
    problems += [f"{p.name}: zero padding must be read only by a conv" for p in pads.values()]
    if problems:
        raise LoweringError("cannot lower to the int8 graph:\n  " + "\n  ".join(problems))
    return [o for o in kept if o.kind != "pad"]


def _read_quantized_layer(o: FloatOp) -> None:
    """The frozen integer form of a quantized conv / linear (``edgeslim.quant`` modules)."""
    layer = o.module
    if layer.input_quant.dynamic or not layer.has_output or layer.input_quant.bits != 8:
        raise LoweringError(
            f"{o.name}: quantized layer without a static int8 output (dynamic or float "
            "output, or activations not 8-bit); quantize with Int8PTQ in graph mode"
        )
    layer.freeze()
    o.attrs["weight_int"] = layer.weight_int8.numpy().astype(np.int64)
    o.attrs["weight_scale"] = layer.weight_scale.detach().double().numpy().copy()
    c = layer.weight_int8.shape[0]
    bias = layer.bias_int32.numpy().astype(np.int64) if layer.bias is not None else np.zeros(c)
    o.attrs["bias_int"] = bias.astype(np.int64)
    o.attrs["bias"] = np.zeros(c)  # unused: the integer bias is taken as it is


def _use_counts(ops: list[FloatOp], outputs: Sequence[str] = ()) -> dict[str, int]:
    uses: dict[str, int] = {}
    for name in [n for o in ops for n in o.inputs] + list(outputs):
        uses[name] = uses.get(name, 0) + 1
    return uses


def _rename(src: FloatOp, fused: FloatOp, producers: dict[str, FloatOp]) -> None:
    """``src`` now produces what ``fused`` produced (its value, shape)."""
    del producers[src.value]
    src.value = fused.value
    src.shape = fused.shape
    producers[src.value] = src


def _conv_padding(conv: nn.Conv2d | nn.Conv1d) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of a conv (a Conv1d pads only left and right)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # PyTorch: the extra row/column (even kernels) goes at the end
        kh, kw = conv_pair(conv, conv.kernel_size)
        return ((kh - 1) // 2, (kw - 1) // 2, kh // 2, kw // 2)
    ph, pw = conv_pair(conv, conv.padding)
    if isinstance(conv, nn.Conv1d):
        ph = 0
    return (ph, pw, ph, pw)


def _fold_bn(o: FloatOp, bn: nn.Module) -> None:
    w = torch.from_numpy(o.attrs["weight"])
    b = torch.from_numpy(o.attrs["bias"])
    stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    stats = tuple(s.double() if isinstance(s, torch.Tensor) else s for s in stats)
    with torch.no_grad():
        if o.kind == "conv":
            fw, fb = fuse_conv_bn_weights(w, b, *stats)
        else:
            fw, fb = fuse_linear_bn_weights(w, b, *stats)
    o.attrs["weight"] = fw.detach().numpy().copy()
    o.attrs["bias"] = fb.detach().numpy().copy()
