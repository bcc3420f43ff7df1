"""Post-training int8 quantization (PTQ) with calibration, simulated exactly in PyTorch.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", https://arxiv.org/abs/1712.05877 ; Krishnamoorthi 2018,
"Quantizing deep convolutional networks for efficient inference: A whitepaper",
https://arxiv.org/abs/1806.08342 (per-channel weights, BN folding, calibration choices).

    qmodel = quantize(model, Int8PTQ(calibration="mse"), calib=data.calib(256))

Interface (stable; the microcontroller backend and the ONNX exporter build on it)
-------------------------------------------------------------------------------
- ``quantize_`` returns the quantized model. It is ``model`` itself in *module* mode and a
  ``torch.fx.GraphModule`` holding ``model``'s modules in *graph* mode: always use the
  return value. It is an ordinary ``nn.Module`` whose forward simulates integer inference.
- *Graph* mode (any model ``torch.fx.symbolic_trace`` can trace, the zoo CNNs, or else that
  ``torch.export`` captures on the first calibration input, :mod:`edgeslim.core.capture`,
  such as transformers' CNNs): every
  tensor between quantized ops is int8 with its own qparams, as in TFLite. BatchNorm is
  folded into the conv before it; a ReLU / ReLU6 right after a layer is fused into its
  output range; :class:`~.modules.ActQuant` modules named ``<node>_quant`` follow every
  quantized layer and every residual add (replaced by :class:`~.modules.QuantAdd`), after
  their fused ReLU / ReLU6 (the add's output is clamped on the quantizer's grid, as TFLite's
  ADD with a fused activation), every SiLU / Hardswish / Sigmoid and every product of two
  tensors (computed in float, then quantized); global average pooling keeps its input's qparams
  (:class:`~.modules.QuantAvgPool`); max-pool, flatten, reshape and dropout keep qparams.
- *Module* mode (anything else, e.g. transformers): each linear layer (``nn.Linear``, and
  transformers' ``Conv1D``) / ``nn.Conv2d`` is
  replaced in place by a quantized one that quantizes its own input (static, calibrated;
  or dynamic per batch) and outputs float (its dequantized int32 accumulator).
- Per quantized layer (:class:`~.modules.QuantConv2d` / :class:`~.modules.QuantLinear`,
  subclasses of ``nn.Conv2d`` / ``nn.Linear`` keeping the float ``weight`` / ``bias``),
  buffers with fixed names: ``weight_scale`` (C_out,) f32, ``weight_int8`` int8,
  ``bias_int32`` (C_out,) int32 (scale ``s_in * s_w[c]``), ``out_scale`` / ``out_zero_point``
  (1,), ``multiplier`` / ``shift`` (C_out,) int64 (``spec.quantize_multiplier`` of
  ``s_in * s_w[c] / s_out``), ``act_limits`` (2,) int64; child ``input_quant`` (an
  ``ActQuant``: buffers ``scale`` (1,) f32, ``zero_point`` (1,) int64) whose qparams are
  those of the upstream quantizer it is linked to (``input_quant.source``) in graph mode.
- :func:`layer_qparams` returns ``{name: LayerQParams}``: exactly these numbers as numpy
  (``spec.QParams`` for input / weight / output, int arrays for weights and bias).
- Modes (:func:`~.modules.set_mode`): ``"exact"`` (default after PTQ: integer arithmetic,
  equal to the integer reference bit for bit), ``"fake"`` (float32 fake quant, STE; for
  QAT), ``"observe"`` (calibration), ``"export"`` (Q/DQ ops for ONNX).
- First and last layers are quantized unless ``skip_first`` / ``skip_last``; the
  handler's report (``qmodel.quant_info``) always lists the float layers and why.
"""

from __future__ import annotations

import operator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import fx, nn

from edgeslim.core.attention import attention_mask, decompose_attention
from edgeslim.core.capture import symbolic_trace_or_capture, torch_leaf
from edgeslim.core.device import model_device
from edgeslim.core.errors import ConfigError, EdgeslimError
from edgeslim.core.fxpatterns import (
    activation,
    is_add,
    is_mul,
    tensor_operands,
    unary_activation,
)
from edgeslim.core.hooks import iter_batches, run_calibration
from edgeslim.core.linear import is_linear
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.core.selection import FilterFn, lookup_layer, matches, unmatched
from edgeslim.quant.fold import _replace_module, fold_bn_graph_, fold_bn_sequential_
from edgeslim.quant.layerview import LayerQParams as LayerQParams
from edgeslim.quant.layerview import layer_qparams as layer_qparams
from edgeslim.quant.modules import (
    ActQuant,
    QuantAdd,
    QuantAvgPool,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantModule,
    WeightQuant,
    set_mode,
)
from edgeslim.quant.observers import Observer
from edgeslim.quant.registry import REGISTRY

QUANTIZABLE = (nn.Conv2d, nn.Linear)
LAYERS = (*QUANTIZABLE, nn.Conv1d)  # what PTQ quantizes (Conv1d: audio nets)


class Int8PTQ(Options):
    """Post-training quantization: int8 activations (per tensor) and weights (per channel).

    ``calibration`` picks the activation observer (min-max, percentile, MSE, KL);
    ``weight_bits`` / ``layer_bits`` (per layer name, glob patterns allowed) give weight bit
    widths other than 8 (mixed precision); ``activations="dynamic"`` quantizes each layer's
    input per batch instead (transformers; module mode only).
    """

    model_config = ConfigDict(extra="forbid")

    calibration: Literal["minmax", "percentile", "mse", "kl"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)
    weight_calibration: Literal["minmax", "mse"] = "minmax"
    weight_bits: int = Field(8, ge=2, le=8)
    layer_bits: dict[str, int] = Field(default_factory=dict)
    activation_bits: int = Field(8, ge=2, le=8)
    activations: Literal["static", "dynamic"] = "static"
    graph: Literal["auto", "fx", "module"] = "auto"
    fold_bn: bool = True
    skip_first: bool = False
    skip_last: bool = False
    exclude: list[str] = Field(default_factory=list)
    embeddings: bool = Field(True, description="module mode: int8 embedding tables (per row)")
    calib_size: int = Field(256, ge=1, description="calibration inputs a pipeline stage uses")
    simulate: Literal["exact", "fake"] = "exact"

    def calib_count(self) -> int:
        return self.calib_size

    def in_place(self) -> bool:
        return self.graph == "module"  # "auto" / "fx" build a torch.fx graph module

    def bits_for(self, name: str) -> int:
        """The weight bit width of layer ``name`` (first matching ``layer_bits`` pattern)."""
        bits = lookup_layer(self.layer_bits, name)
        return self.weight_bits if bits is None else bits


# ---------------------------------------------------------------------------- selection


def _select(
    names: list[str],
    modules: dict[str, nn.Module],
    cfg: Int8PTQ,
    filter_fn: FilterFn | None,
) -> tuple[list[str], dict[str, str]]:
    """Which of ``names`` (quantizable layers in execution order) to quantize, and why not."""
    skipped: dict[str, str] = {}
    for field_name, patterns in (("exclude", cfg.exclude), ("layer_bits", cfg.layer_bits)):
        if unknown := unmatched(patterns, names):
            raise ConfigError(
                f"{field_name} pattern {unknown[0]!r} matches no quantizable layer; layers: {names}"
            )
    for n in names:
        if matches(n, cfg.exclude):
            skipped[n] = "excluded"
        elif filter_fn is not None and not filter_fn(modules[n], n):
            skipped[n] = "filter_fn"
    if names and cfg.skip_first:
        skipped.setdefault(names[0], "skip_first")
    if names and cfg.skip_last:
        skipped.setdefault(names[-1], "skip_last")
    return [n for n in names if n not in skipped], skipped


def _swap(
    root: nn.Module, name: str, cfg: Int8PTQ, bits: int
) -> QuantConv2d | QuantConv1d | QuantLinear:
    """Replace module ``name`` by its quantized version; return the new module."""
    old = root.get_submodule(name)
    aq = ActQuant(
        cfg.activation_bits, cfg.calibration, cfg.percentile, cfg.activations == "dynamic"
    )
    wq = WeightQuant(bits, cfg.weight_calibration)
    cls = (
        QuantConv2d
        if isinstance(old, nn.Conv2d)
        else QuantConv1d
        if isinstance(old, nn.Conv1d)
        else QuantLinear
    )
    new = cls.from_float(old, wq, aq)
    _replace_module(root, name, new)
    return new


# ---------------------------------------------------------------------------- graph mode

_aten = torch.ops.aten
_PRESERVING_FUNCS = {
    torch.flatten,
    torch.reshape,
    F.max_pool2d,
    F.dropout,
    torch.permute,
    torch.transpose,
    _aten.permute.default,
    _aten.transpose.int,
    _aten.select.int,
    _aten.slice.Tensor,
    _aten.unsqueeze.default,
}
_PRESERVING_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose"}
# ops whose int8 output gets its own qparams (transformers): LayerNorm, GELU, matmul
_NEW_RANGE_FUNCS = {
    _aten.layer_norm.default,
    F.layer_norm,
    _aten.gelu.default,
    F.gelu,
    torch.matmul,
    _aten.matmul.default,
    torch.bmm,
    attention_mask,
}
_NEW_RANGE_MODULES = (nn.LayerNorm, nn.GELU)


def _new_range(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A LayerNorm / GELU / matmul, or a cat with a parameter (ViT's class token): its
    output is quantized on its own range, as the int8 backends compute it."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _NEW_RANGE_MODULES)
    if node.op != "call_function":
        return False
    if node.target in _NEW_RANGE_FUNCS:
        return True
    if node.target is torch.cat and node.args:
        return any(_from_params(a) for a in node.args[0])
    return False


def _from_params(node: Any) -> bool:
    """Is ``node`` computed from parameters alone (no graph input)?"""
    if not isinstance(node, fx.Node) or node.op == "placeholder":
        return False
    if node.op == "get_attr":
        return True
    tensors = [a for a in node.all_input_nodes if not _is_size(a)]
    return bool(tensors) and all(_from_params(a) for a in tensors)


def _is_size(node: fx.Node) -> bool:
    """A shape read from a tensor (``x.shape[0]``, ``x.size(0)``, ``sym_size``), not data."""
    if node.op == "call_method":
        return node.target == "size"
    if node.op != "call_function":
        return False
    if node.target is _aten.sym_size.int:
        return True
    if node.target is getattr:
        return node.args[1] == "shape"
    return node.target is operator.getitem and _is_size(node.args[0])


_PRESERVING_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity, QuantAvgPool)


def _preserves_qparams(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _PRESERVING_FUNCS
    if node.op == "call_method":
        return node.target in _PRESERVING_METHODS
    return node.op == "call_module" and isinstance(modules.get(node.target), _PRESERVING_MODULES)


def _upstream_quant(node: Any, modules: dict[str, nn.Module]) -> ActQuant | None:
    """The ActQuant whose qparams ``node``'s value has (through qparam-preserving ops)."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(modules.get(node.target), ActQuant):
            return modules[node.target]
        if not _preserves_qparams(node, modules) or not node.args:
            return None
        node = node.args[0]
    return None


def _insert_quant_after(gm: fx.GraphModule, node: fx.Node, quant: ActQuant) -> fx.Node:
    """Add ``quant`` as submodule ``<node>_quant`` and route ``node``'s users through it."""
    name = f"{node.name}_quant"
    gm.add_submodule(name, quant)
    with gm.graph.inserting_after(node):
        qnode = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
    return qnode


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    mod = modules.get(node.target) if node.op == "call_module" else None
    return isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1))


def _prepare_graph(
    model: nn.Module, cfg: Int8PTQ, filter_fn: FilterFn | None, example: Any = None
) -> tuple[fx.GraphModule, dict[str, Any]]:
    gm = symbolic_trace_or_capture(model, example, torch_leaf)
    decompose_attention(gm)  # its scores and probabilities observed (int8 backends)
    for attr in ("input_shape", "num_classes"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    folded = fold_bn_graph_(gm) if cfg.fold_bn else []
    modules = dict(gm.named_modules())
    layer_nodes = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(modules.get(n.target), LAYERS)
    ]
    order = [n.target for n in layer_nodes]
    chosen, skipped = _select(order, modules, cfg, filter_fn)
    layers: dict[str, QuantConv2d | QuantConv1d | QuantLinear] = {}
    for node in layer_nodes:
        if node.target not in chosen:
            continue
        layer = _swap(gm, node.target, cfg, cfg.bits_for(node.target))
        layers[node.target] = layer
        modules = dict(gm.named_modules())
        tail = node
        users = list(node.users)
        if len(users) == 1 and activation(users[0], modules):
            layer.act = activation(users[0], modules)
            tail = users[0]
        out_q = ActQuant(cfg.activation_bits, cfg.calibration, cfg.percentile)
        _insert_quant_after(gm, tail, out_q)
        layer.has_output = True
        layer.link("output_quant", out_q)
    adds = 0
    for node in list(gm.graph.nodes):
        if is_add(node) and tensor_operands(node) is not None:  # a + b of two tensors
            name = f"{node.name}_qadd"
            gm.add_submodule(name, QuantAdd())
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, node.args)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            users = list(new.users)  # a ReLU / ReLU6 right after it: quantized after it
            fused = len(users) == 1 and activation(users[0], dict(gm.named_modules()))
            tail = users[0] if fused else new
            _insert_quant_after(gm, tail, ActQuant(cfg.activation_bits, cfg.calibration))
            adds += 1
        elif _is_global_pool(node, dict(gm.named_modules())):
            _replace_module(gm, node.target, QuantAvgPool(gm.get_submodule(node.target)))
        elif (
            unary_activation(node, dict(gm.named_modules()))
            or (is_mul(node) and tensor_operands(node) is not None)
            or _new_range(node, dict(gm.named_modules()))
        ):  # SiLU / Hardswish / Sigmoid / x * gate / LayerNorm / GELU / matmul: an int8
            # output, as TFLite computes it
            _insert_quant_after(gm, node, ActQuant(cfg.activation_bits, cfg.calibration))
    _requantize_after_preserving_ops(gm, cfg)
    gm.graph.lint()
    gm.recompile()
    _link_graph(gm)
    info = {"graph": "fx", "folded_bn": folded, "adds": adds}
    return gm, {**info, "quantized": list(layers), "float_layers": skipped}


def _requantize_after_preserving_ops(gm: fx.GraphModule, cfg: Int8PTQ) -> None:
    """Put a quantizer sharing the upstream qparams after each max-pool / flatten / reshape.

    Numerically a no-op (the values are already on that grid), but in the exported graph it
    makes ``DQ -> MaxPool -> Q`` and ``DQ -> Reshape -> Q``, which ONNX Runtime runs on int8
    instead of dequantizing around them.
    """
    for node in list(gm.graph.nodes):
        modules = dict(gm.named_modules())
        if not _preserves_qparams(node, modules) or not node.args:
            continue
        if node.op == "call_module" and isinstance(modules.get(node.target), QuantAvgPool):
            continue
        src = _upstream_quant(node.args[0], modules)
        if src is None:
            continue
        users = list(node.users)
        if len(users) == 1 and _preserves_qparams(users[0], modules):
            continue  # the last of a chain of such ops gets it
        shared = ActQuant(cfg.activation_bits, cfg.calibration, cfg.percentile)
        shared.link("source", src)
        _insert_quant_after(gm, node, shared)


def _link_graph(gm: fx.GraphModule) -> None:
    """Share qparams: each layer input / add operand / pool takes its upstream quantizer's."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if isinstance(mod, (QuantConv2d, QuantConv1d, QuantLinear)):
            src = _upstream_quant(node.args[0], modules)
            mod.input_quant.link("source", src)
            arg = node.args[0]
            mod.input_quant.direct = (
                src is not None and arg.op == "call_module" and modules.get(arg.target) is src
            )
        elif isinstance(mod, QuantAvgPool):
            mod.link("source", _upstream_quant(node.args[0], modules))
        elif isinstance(mod, QuantAdd):
            srcs = [_upstream_quant(a, modules) for a in node.args]
            users = list(node.users)
            if len(users) == 1 and activation(users[0], modules):  # through a fused ReLU
                users = list(users[0].users)
            out = modules.get(users[0].target) if len(users) == 1 else None
            ok = all(s is not None for s in srcs) and isinstance(out, ActQuant)
            mod.link("sources", tuple(srcs) if ok else None)
            mod.link("output_quant", out if ok else None)


# ---------------------------------------------------------------------------- module mode


def _prepare_modules(
    model: nn.Module, cfg: Int8PTQ, filter_fn: FilterFn | None
) -> tuple[nn.Module, dict[str, Any]]:
    folded = fold_bn_sequential_(model) if cfg.fold_bn else []
    modules = dict(model.named_modules())
    order = [n for n, m in modules.items() if n and (isinstance(m, LAYERS) or is_linear(m))]
    chosen, skipped = _select(order, modules, cfg, filter_fn)  # is_linear: Conv1D (GPT-2)
    for name in chosen:
        _swap(model, name, cfg, cfg.bits_for(name))
    embeddings = []
    if cfg.embeddings:
        for name, mod in modules.items():
            if not isinstance(mod, nn.Embedding) or matches(name, cfg.exclude):
                continue
            if type(mod).forward is not nn.Embedding.forward:  # e.g. OPT's positions
                skipped[name] = "embedding with its own forward (left float)"
                continue
            _replace_module(model, name, QuantEmbedding(mod))
            embeddings.append(name)
    info = {"graph": "module", "folded_bn": folded, "embeddings": embeddings}
    return model, {**info, "quantized": chosen, "float_layers": skipped}


# ---------------------------------------------------------------------------- the steps


def _left_float(model: nn.Module, qmodel: nn.Module, info: dict[str, Any]) -> dict[str, str]:
    """Every Conv2d / linear layer of ``model`` that ``qmodel`` did not quantize and ``info``
    does not list yet, with the reason: nothing may stay float without
    ``quant_info['float_layers']`` saying so."""
    inside = [n for n, m in qmodel.named_modules() if n and isinstance(m, QuantModule)]
    done = set(info["quantized"]) | set(info["float_layers"])
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not name or name in done or isinstance(m, QuantModule):
            continue
        if any(name.startswith(q + ".") for q in inside):
            continue  # the float parts a quantized module holds
        if isinstance(m, LAYERS):
            out[name] = (
                "not called as a layer in the traced graph (used through its weight?)"
                if info.get("graph") == "fx"
                else "not quantized"
            )
        elif is_linear(m):
            out[name] = f"{type(m).__name__} layers are not quantized"
    return out


def prepare(
    model: nn.Module, cfg: Int8PTQ, filter_fn: FilterFn | None = None, example: Any = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Fold BN and insert quantized modules (no calibration yet); return ``(qmodel, info)``.

    ``info`` lists the quantized layers, the float ones with the reason, the folded convs.
    The quantized model is on ``model``'s device (the modules it adds are moved there).
    """
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} is already quantized; quantize a float model")
    device = model_device(model)
    model.eval()
    if cfg.graph in ("auto", "fx") and cfg.activations == "static":
        try:
            qmodel, info = _prepare_graph(model, cfg, filter_fn, example)
        except Exception as exc:  # torch.fx fails in many ways (ValueError on bytecode...)
            if cfg.graph == "fx":
                raise ConfigError(
                    f"{type(model).__name__} cannot be traced by torch.fx ({exc}); use "
                    "graph='module' (each layer quantizes its own input, float outputs)"
                ) from exc
            qmodel, info = _prepare_modules(model, cfg, filter_fn)
    elif cfg.graph == "fx":
        raise ConfigError("graph='fx' needs activations='static'")
    else:
        qmodel, info = _prepare_modules(model, cfg, filter_fn)
    info["float_layers"] = {**info["float_layers"], **_left_float(model, qmodel, info)}
    if not info["quantized"]:
        raise ConfigError(
            f"no layer of {type(model).__name__} was quantized (float: {info['float_layers']}); "
            "check exclude / skip_first / skip_last / filter_fn"
        )
    qmodel.to(device)  # the quantizers and layers built above start on the CPU
    set_mode(qmodel, "fake")
    return qmodel, info


def _example_of(calib: Any) -> torch.Tensor | None:
    """One float input (images, audio) from ``calib`` without consuming it: what
    ``torch.export`` captures the graph on when ``torch.fx`` cannot trace the model; None if
    there is none (token ids, keyword batches: language models stay in module mode)."""
    try:
        if calib is None or iter(calib) is calib:  # an iterator would lose its first batch
            return None
        first = next(iter_batches(calib, batch_size=1), None)
    except (TypeError, EdgeslimError):
        return None
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or not first.is_floating_point():
        return None  # token ids: language models stay in module mode
    return first[:1]


def calibrate_(model: nn.Module, calib: Any, *, batch_size: int = 64) -> int:
    """Run ``calib`` through ``model`` in observe mode and set every quantizer's qparams.

    Quantizers that share an upstream one (``source``) and dynamic ones observe nothing.
    Returns the number of batches.
    """
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    for q in quants:
        q.observer = (
            None
            if (q.source is not None or q.dynamic)
            else Observer(q.method, percentile=q.percentile)
        )
    set_mode(model, "observe")
    n = run_calibration(model, calib, layers={}, callback=lambda *a: None, batch_size=batch_size)
    unseen = [q for q in quants if q.observer is not None and not q.observer.seen]
    for q in quants:
        q.calibrate()
    if unseen:
        raise ConfigError(
            f"{len(unseen)} activation quantizer(s) saw no calibration data (a branch the "
            "calibration inputs never reach?)"
        )
    return n


def int8_ptq_(model: nn.Module, cfg: Int8PTQ, ctx: Context) -> nn.Module:
    """Quantize ``model`` post-training; returns the quantized model (see module docstring).

    ``calib`` (a tensor ``(N, ...)`` or iterable of batches) is required unless
    ``activations="dynamic"``. The returned model is in ``cfg.simulate`` mode and carries
    ``quant_info`` (layers quantized, float layers and why, folded BNs, batches).
    """
    calib, filter_fn, batch_size = ctx.calib, ctx.filter_fn, ctx.batch_size
    if calib is None and cfg.activations == "static":
        raise ConfigError(
            "Int8PTQ needs calibration data: quantize_(model, Int8PTQ(...), calib=data.calib(256))"
        )
    qmodel, info = prepare(model, cfg, filter_fn, example=_example_of(calib))
    info["batches"] = calibrate_(qmodel, calib, batch_size=batch_size) if calib is not None else 0
    set_mode(qmodel, cfg.simulate)
    qmodel.quant_info = info
    return qmodel


REGISTRY.register("int8_ptq", Int8PTQ, int8_ptq_, takes=("calib", "filter_fn", "batch_size"))
