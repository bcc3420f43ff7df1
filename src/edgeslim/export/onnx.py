"""ONNX export, fp32 or int8 QDQ, verified in ONNX Runtime before it counts as done.

    result = export_onnx(model, "m.onnx", example)          # raises ExportError on mismatch

How: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). A float model
exports as is. A model quantized by :mod:`edgeslim.quant` is switched to ``"export"`` mode,
in which every quantized tensor goes through ``quantized_decomposed`` quantize/dequantize
ops that the exporter writes as ONNX ``QuantizeLinear`` / ``DequantizeLinear``; weights are
int8 initializers feeding a per-channel ``DequantizeLinear``. That is the QDQ format ONNX
Runtime's graph optimizer fuses into integer kernels (``QLinearConv``, ``QLinearMatMul``,
``QGemm``, ``QLinearAdd``, ``QLinearGlobalAveragePool``, ``MatMulIntegerToFloat``, ...);
:func:`integer_ops` reads the optimized graph ORT writes to tell which ones it made.

Verification runs the file in ONNX Runtime on ``example`` and compares with PyTorch:

- fp32: ``max |ort - torch| <= 1e-4 + 1e-3 * max |torch|``;
- int8, against the model's exact integer simulation: either every output within 2 steps
  of the int8 output's scale (graph mode; ONNX rounds ties to even where edgeslim rounds them
  away from zero, and ORT requantizes with a float multiplier or runs some layers in float,
  so a value may move by a step here and there), or relative error
  ``||ort - torch||_2 / ||torch||_2`` at most ``max(0.02, e_q)`` where ``e_q`` is the same
  relative error between the integer simulation and the float model: the file must be as
  close to PyTorch's int8 model as that model is to float. Deep nets and float-output models
  (module mode, e.g. transformers) are judged by the second rule. (Through LayerNorm and
  softmax one tie rounded differently, or a float32 sum taken in another order, moves a
  transformer's output by more than an elementwise bound could allow; measured on MiniLM:
  ORT vs PyTorch cosine 0.995, both 0.993 to fp32.)

The file is written under a temporary name, verified, and only then renamed onto ``path``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.core.fileio import atomic_path
from edgeslim.core.hooks import eager_attention, no_kv_cache

# the ONNX exporter builds its op table once: the quantized_decomposed ops must exist first
from edgeslim.quant import modules as _quant_modules  # noqa: F401

INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "QLinearAdd",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "ConvInteger",
)


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well ONNX Runtime agrees with PyTorch."""

    path: Path
    size_bytes: int
    quantized: bool
    max_abs_diff: float | None = None
    rel_l2_error: float | None = None
    metric: str = "max_abs"  # what ``tolerance`` bounds: "max_abs" or "rel_l2"
    tolerance: float | None = None
    integer_ops: dict[str, int] = field(default_factory=dict)


class KeywordInputs(nn.Module):
    """``model`` called with keyword inputs (a tokenizer's output) given as positional tensors
    in the order of ``names``: what is exported for a mapping ``example``, so each tensor
    reaches the parameter it is named for (GPT-2's second positional parameter is
    ``past_key_values``, not ``attention_mask``)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))


def keyword_inputs(model: nn.Module, example: Any) -> tuple[nn.Module, Any, list[str] | None]:
    """``(model, example, names)`` to export: a mapping ``example`` of tensors (e.g. a
    ``BatchEncoding``) becomes a :class:`KeywordInputs` wrapper, a tuple and its keys;
    anything else is returned as it is (``names`` ``None``)."""
    from collections.abc import Mapping

    if not isinstance(example, Mapping):
        return model, example, None
    bad = [k for k, v in example.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad or not example:
        raise ExportError(
            "a mapping example must map input names to tensors (a tokenizer's output); "
            f"got {'no entries' if not example else f'non-tensor entries {bad[:4]}'}"
        )
    names = list(example)
    return KeywordInputs(model, names), tuple(example[k] for k in names), names


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, KeywordInputs) else model


def _inputs(example: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise ExportError(
        f"example must be a tensor or a tuple of tensors, got {type(example).__name__}"
    )


def _first_output(out: Any) -> torch.Tensor:
    """The model's first output tensor (of a tuple, or a dict / ``ModelOutput``: logits)."""
    while isinstance(out, (tuple, list, dict)) and len(out):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the model's first output must be a tensor, got {type(out).__name__}")
    return out


@contextmanager
def _quiet_exporter():
    """Silence the exporter's log lines (e.g. about torchvision ops it skips)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _export_mode(model: nn.Module, quantized: bool):
    from edgeslim.quant.modules import QuantModule, set_mode

    modes = {m: m.mode for m in model.modules() if isinstance(m, QuantModule)}
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    if quantized:
        set_mode(model, "export")
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.mode = mode
        for m, training in flags:
            m.training = training


def _reference_mode(model: nn.Module) -> None:
    """Quantized models are compared in their exact integer simulation."""
    from edgeslim.quant.modules import set_mode

    set_mode(model, "exact")


def _output_step(model: nn.Module) -> float | None:
    """The scale of the model's final int8 output, if its last op is an activation quantizer."""
    from edgeslim.quant.modules import ActQuant

    if not isinstance(model, torch.fx.GraphModule):
        return None
    out = next(n for n in model.graph.nodes if n.op == "output")
    arg = out.args[0]
    while isinstance(arg, (tuple, list)):
        arg = arg[0]
    if isinstance(arg, torch.fx.Node) and arg.op == "call_module":
        mod = model.get_submodule(arg.target)
        if isinstance(mod, ActQuant):
            return float(mod.qparams().scale[0])
    return None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: Any,
    *,
    verify: bool = True,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
) -> ExportResult:
    """Write ``model`` as ONNX to ``path``; with ``verify``, check it in ONNX Runtime first.

    ``example`` is an input batch: a tensor, a tuple of tensors (positional inputs) or a
    mapping of input names to tensors (keyword inputs, e.g. a tokenizer's output; the ONNX
    inputs then carry those names unless ``input_names`` says otherwise). A model quantized by
    ``edgeslim.quant`` becomes an int8 QDQ graph. Raises :class:`ExportError` when export
    fails or ORT's output is further from PyTorch's than the tolerance (module docstring);
    then nothing is written at ``path``.
    """
    from edgeslim.quant.modules import is_quantized

    quantized = is_quantized(model)
    what = type(model).__name__
    model, example, keys = keyword_inputs(model, example)
    inputs = _inputs(example)
    path = Path(path)
    names = input_names or keys or [f"input_{i}" if i else "input" for i in range(len(inputs))]
    dyn = tuple({0: torch.export.Dim("batch", min=1)} for _ in inputs) if dynamic_batch else None
    if dyn is not None and keys:
        dyn = (dyn,)  # KeywordInputs takes *args: one entry holding each tensor's shape
    with atomic_path(path) as tmp:
        with (
            _export_mode(model, quantized),
            no_kv_cache(model),
            warnings.catch_warnings(),
            _quiet_exporter(),
        ):
            warnings.simplefilter("ignore")
            try:
                program = _torch_onnx_export(model, inputs, dyn, names)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ExportError(
                    f"torch.onnx.export failed for {what}: {type(exc).__name__}: {first}"
                ) from exc
            program.save(str(tmp))
        _strip_debug_info(tmp)
        result = ExportResult(path, tmp.stat().st_size, quantized)
        if verify:
            with no_kv_cache(model):
                _verify(model, tmp, inputs, names, quantized, result)
            result.integer_ops = integer_ops(tmp) if quantized else {}
    return result


def _torch_onnx_export(model: nn.Module, inputs: tuple, dyn: Any, names: list[str]) -> Any:
    """``torch.onnx.export`` (dynamo); when it fails and the model's attention runs
    ``scaled_dot_product_attention``, once more with transformers' eager attention (the
    same function in plain matmul / softmax ops: the exporter's decomposition of SDPA with
    a mask fails on Swin's windowed attention)."""

    def export() -> Any:
        return torch.onnx.export(
            model,
            inputs,
            dynamo=True,
            dynamic_shapes=dyn,
            input_names=names,
            verbose=False,
            report=False,
        )

    try:
        return export()
    except Exception:
        with eager_attention(model) as changed, _math_attention(model) as rewritten:
            if not changed and not rewritten:
                raise
            return export()


def attention_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` (inference: no dropout) as matmul, softmax, matmul."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device)
        scores = scores.masked_fill(~keep.tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


@contextmanager
def _math_attention(model: nn.Module):
    """In every ``torch.fx`` graph of ``model`` (a captured int8 graph), calls of
    ``scaled_dot_product_attention`` temporarily call :func:`attention_math`; yields
    whether any did. (The graph was captured with the fused kernel, whose output strides
    differ from its decomposition's, so the exporter fails to decompose a later view.)"""
    sdpa = {torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
    swapped = []
    for gm in (m for m in model.modules() if isinstance(m, torch.fx.GraphModule)):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in sdpa]
        for n in nodes:
            swapped.append((n, n.target))
            n.target = attention_math
        if nodes:
            gm.recompile()
    try:
        yield bool(swapped)
    finally:
        for n, target in swapped:
            n.target = target
        for gm in {id(n.graph.owning_module): n.graph.owning_module for n, _ in swapped}.values():
            gm.recompile()


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX node text): it can be
    half of a small model's file and no runtime reads it."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    for info in model.graph.value_info:
        del info.metadata_props[:]
    _unique_dequantize(model.graph)
    onnx.save(model, str(path))


def _unique_dequantize(graph) -> int:
    """Give every consumer of a shared DequantizeLinear its own copy; return copies made.

    The exporter merges identical Q/DQ pairs (the query, key and value projections read one
    tensor), but ONNX Runtime only fuses a DequantizeLinear into an integer kernel when that
    kernel is its sole consumer, and only turns an int8 Q/DQ pair into the faster uint8 one
    when the pair is private. So a shared ``Q -> DQ`` pair is copied whole per consumer
    (with its own scale / zero-point initializers, which ORT would otherwise merge back).
    """
    import onnx

    consumers: dict[str, list] = {}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    inits = {t.name: t for t in graph.initializer}
    copies = 0

    def clone(node, new_input: str, suffix: str):
        args = [new_input]
        for name in node.input[1:]:
            if name in inits:
                t = onnx.TensorProto()
                t.CopyFrom(inits[name])
                t.name = f"{name}{suffix}"
                graph.initializer.append(t)
                args.append(t.name)
            else:
                args.append(name)
        out = f"{node.output[0]}{suffix}"
        new = onnx.helper.make_node(node.op_type, args, [out], name=f"{node.name}{suffix}")
        new.attribute.extend(node.attribute)
        return new

    extra: dict[int, list] = {}  # position in graph.node -> nodes to insert after it
    position = {id(n): i for i, n in enumerate(graph.node)}
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        if len(users) < 2:
            continue
        q = producer.get(node.input[0])
        private_q = (
            q is not None
            and q.op_type == "QuantizeLinear"
            and len(consumers.get(q.output[0], [])) == 1
        )
        for user in users[1:]:
            suffix = f"_dup{copies}"
            added = []
            source = node.input[0]
            if private_q:
                q_copy = clone(q, q.input[0], suffix)
                added.append((position[id(q)], q_copy))
                source = q_copy.output[0]
            dq_copy = clone(node, source, suffix)
            added.append((position[id(node)], dq_copy))
            for k, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[k] = dq_copy.output[0]
            for pos, new in added:
                extra.setdefault(pos, []).append(new)
            copies += 1
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(extra.get(i, []))
    # a Q copy is inserted after the original Q, its DQ copy after the original DQ: the DQ
    # comes after the Q in the original order, so the result stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    return copies


def _session(path: Path, optimized: Path | None = None, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _verify(
    model: nn.Module,
    onnx_path: Path,
    inputs: tuple[torch.Tensor, ...],
    names: list[str],
    quantized: bool,
    result: ExportResult,
) -> None:
    ref, ref_float = reference_outputs(model, inputs, quantized)
    try:
        sess = _session(onnx_path)
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        got = sess.run(None, feeds)[0]
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the exported {onnx_path.name}: {exc}") from exc
    check_agreement(model, got, ref, ref_float, result, runtime="ONNX", short="ort")


def reference_outputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], quantized: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """PyTorch's first output on ``inputs`` that an exported file is compared with, and for a
    quantized model also the float model's (``None`` otherwise).

    A quantized model answers in its exact integer simulation. The model's modes and
    training flags are restored afterwards.
    """
    from edgeslim.quant.modules import QuantModule, set_mode

    modes = {m: m.mode for m in model.modules() if isinstance(m, QuantModule)}
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    ref_float = None
    try:
        if quantized:
            _reference_mode(model)
        with torch.no_grad():
            ref = _first_output(model(*inputs)).float().numpy()
            if quantized:
                set_mode(model, "float")
                ref_float = _first_output(model(*inputs)).float().numpy()
    finally:
        for m, mode in modes.items():
            m.mode = mode
        for m, training in flags:
            m.training = training
    return ref, ref_float


def check_agreement(
    model: nn.Module,
    got: np.ndarray,
    ref: np.ndarray,
    ref_float: np.ndarray | None,
    result: ExportResult,
    *,
    runtime: str = "ONNX",
    short: str = "ort",
) -> None:
    """Judge a runtime's output ``got`` against PyTorch's ``ref`` by the rules of the module
    docstring (fp32: max abs; int8: two output steps or relative L2 within ``max(0.02,
    e_q)``), record the numbers in ``result`` and raise :class:`ExportError` on a mismatch.

    ``ref_float`` is the float model's output for a quantized model, ``None`` for a float
    one; ``runtime`` / ``short`` name the format and the runtime in the message.
    """
    quantized = ref_float is not None
    if got.shape != ref.shape:
        raise ExportError(f"{runtime} output shape {got.shape} differs from PyTorch's {ref.shape}")
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-12))
    step = _output_step(model) if quantized else None
    if not quantized:
        metric, value, tol = "max_abs", diff, 1e-4 + 1e-3 * scale
    else:
        e_q = float(np.linalg.norm(ref - ref_float) / max(float(np.linalg.norm(ref)), 1e-12))
        metric, value, tol = "rel_l2", rel, max(0.02, e_q)
        if step is not None and diff <= 2.0 * step + 1e-6:  # within two output steps
            metric, value, tol = "max_abs", diff, 2.0 * step + 1e-6
    result.max_abs_diff, result.rel_l2_error = diff, rel
    result.metric, result.tolerance = metric, tol
    if not np.isfinite(value) or value > tol:
        kind = "int8" if quantized else "fp32"
        what = f"max |{short} - torch|"
        if metric == "rel_l2":
            what = f"||{short} - torch|| / ||torch||"
        raise ExportError(
            f"{kind} {runtime} export of {type(_unwrapped(model)).__name__} disagrees with "
            f"PyTorch: "
            f"{what} = {value:.3g} > tolerance {tol:.3g}; the file was not written"
        )


def integer_ops(path: str | os.PathLike) -> dict[str, int]:
    """Counts of integer kernels in the graph ONNX Runtime optimizes ``path`` into."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        _session(Path(path), optimized=opt)
        graph = onnx.load(str(opt)).graph
    counts = Counter(n.op_type for n in graph.node)
    return {op: counts[op] for op in INTEGER_OPS if counts[op]}
