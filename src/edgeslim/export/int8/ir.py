"""The integer graph: int8 ops on NHWC tensors with TFLite int8 quantization parameters.

This is what every microcontroller backend consumes: the numpy reference interpreter
(:mod:`.reference`), the TFLite flatbuffer writer (:mod:`edgeslim.export.tflite`), the memory
planner (:mod:`edgeslim.export.c.planner`) and the C generator
(:mod:`edgeslim.export.c.codegen`). :func:`edgeslim.export.int8.lower` builds it from a
PyTorch model.

- Tensors are int8 activations (one scale / zero point each), int8 weights (zero point 0,
  per output channel or per tensor) or int32 biases (scale ``s_in * s_w[c]``). Shapes are
  TFLite's: ``(1, H, W, C)`` for feature maps, ``(1, F)`` for vectors; conv weights
  ``(Cout, KH, KW, Cin)``, depthwise weights ``(1, KH, KW, C)``, FC weights ``(Cout, Cin)``.
- Scales are float32 values (held as float64), because a ``.tflite`` stores float32 and
  TFLite Micro derives its fixed-point multipliers from those; each op carries the
  multipliers, shifts and clamping range computed once, by the rules of
  :mod:`edgeslim.quant.spec`, so all backends share them.
- Ops run in list order (a topological order). A graph has one or more inputs and one or
  more outputs (``inputs`` / ``outputs``, in the model's argument and return order);
  ``input`` / ``output`` are the first of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.quant import spec, spec_nonlinear


@dataclass
class Tensor:
    """One tensor: shape, dtype, quantization and (for constants) data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "int8" or "int32"
    scale: np.ndarray  # float64 holding float32 values, (1,) or (C,)
    zero_point: np.ndarray  # int64, same length as scale
    data: np.ndarray | None = None  # int64 values of a constant; None for activations
    axis: int | None = None  # quantized dimension of a per-channel tensor

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes it occupies in memory (int8: 1, int32 / float32: 4 per element)."""
        return self.size * (4 if self.dtype in ("int32", "float32") else 1)

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def qscale(self) -> float:
        """The scale of a per-tensor tensor."""
        return float(self.scale[0])

    @property
    def qzero(self) -> int:
        """The zero point of a per-tensor tensor."""
        return int(self.zero_point[0])


@dataclass
class Op:
    """Base of all ops: ``inputs`` are activation tensors, ``output`` the one result.

    ``name`` says where the op came from (the PyTorch module path or graph node), for
    messages and generated comments.
    """

    name: str
    inputs: list[str]
    output: str

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass
class Layer(Op):
    """What conv and fully connected ops share: int8 weights, an int32 bias, requantization
    by ``multiplier`` / ``shift`` (per output channel, or one for the tensor) into the
    clamping range of the fused ``activation``."""

    weight: str = ""
    bias: str = ""
    activation: str | None = None
    multiplier: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    shift: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    act_min: int = spec.INT8_MIN
    act_max: int = spec.INT8_MAX


@dataclass
class Conv2D(Layer):
    """Convolution (``depthwise=False``) or depthwise convolution.

    ``padding`` is explicit ``(top, left, bottom, right)``; taps outside the input are skipped
    (as TFLite does: they count as the input's zero point).
    """

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    depthwise: bool = False


@dataclass
class FullyConnected(Layer):
    """``out = W @ x + b`` with per-tensor (TFLite's default) or per-channel weight scales."""


@dataclass
class Add(Op):
    """Elementwise add of two tensors of the same shape, with fused activation."""

    params: spec.AddParams | None = None
    activation: str | None = None
    act_min: int = spec.INT8_MIN
    act_max: int = spec.INT8_MAX


@dataclass
class Pool2D(Op):
    """Max or average pooling over in-bounds taps; output qparams equal the input's."""

    mode: str = "max"  # "max" or "avg"
    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    act_min: int = spec.INT8_MIN
    act_max: int = spec.INT8_MAX


@dataclass
class Reshape(Op):
    """Same bytes, new shape (flatten); output qparams equal the input's."""


@dataclass
class Concat(Op):
    """Concatenation along ``axis``; all inputs share the output's qparams (TFLite's rule)."""

    axis: int = 3


@dataclass
class Softmax(Op):
    """Softmax over the last axis; output scale 1/256, zero point -128."""

    beta: float = 1.0
    params: spec_nonlinear.SoftmaxParams | None = None


@dataclass
class Requantize(Op):
    """int8 -> int8 with new qparams (TFLite QUANTIZE): ``MBQM(q - zp_in) + zp_out``."""

    multiplier: int = 0
    shift: int = 0


@dataclass
class Logistic(Op):
    """Sigmoid (TFLite LOGISTIC); output scale 1/256, zero point -128."""

    params: spec_nonlinear.LogisticParams | None = None


@dataclass
class HardSwish(Op):
    """``x * relu6(x + 3) / 6`` (TFLite HARD_SWISH), 16-bit fixed point inside."""

    params: spec_nonlinear.HardSwishParams | None = None


@dataclass
class Mul(Op):
    """Elementwise multiply of two tensors (TFLite MUL): the same shape, or the second
    broadcast over H and W (``(1, 1, 1, C)``, a squeeze-and-excite gate); SiLU is
    ``x * logistic(x)``."""

    params: spec.MulParams | None = None
    act_min: int = spec.INT8_MIN
    act_max: int = spec.INT8_MAX


UNARY_LUT_OPS = (Logistic, HardSwish)  # int8 -> int8 functions: a 256-entry table in C

OP_TYPES = (
    Conv2D,
    FullyConnected,
    Add,
    Pool2D,
    Reshape,
    Concat,
    Softmax,
    Requantize,
    Logistic,
    HardSwish,
    Mul,
)


@dataclass
class Graph:
    """Tensors by name (in creation order), ops in execution order, inputs and outputs.

    ``input`` / ``output`` name the first input and output; ``inputs`` / ``outputs`` all of
    them in order (left empty, they are ``[input]`` / ``[output]``).
    """

    tensors: dict[str, Tensor]
    ops: list[Op]
    input: str
    output: str
    name: str = "model"
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inputs = list(self.inputs) or [self.input]
        self.outputs = list(self.outputs) or [self.output]
        if (self.inputs[0], self.outputs[0]) != (self.input, self.output):
            raise ExportError("Graph: input / output must be the first of inputs / outputs")

    @property
    def multi_io(self) -> bool:
        """Does the graph have more than one input or more than one output?"""
        return len(self.inputs) > 1 or len(self.outputs) > 1

    def io_bytes(self) -> int:
        """Bytes of the caller's buffers: every input and every output."""
        return sum(self.tensors[n].nbytes for n in (*self.inputs, *self.outputs))

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def producer(self, name: str) -> int | None:
        """Index of the op that writes tensor ``name`` (None for the graph input)."""
        for i, op in enumerate(self.ops):
            if op.output == name:
                return i
        return None

    def consumers(self, name: str) -> list[int]:
        """Indices of the ops that read activation tensor ``name``."""
        return [i for i, op in enumerate(self.ops) if name in op.inputs]

    def activations(self) -> list[str]:
        """Names of the non-constant tensors, inputs first, in execution order."""
        names = list(self.inputs)
        for op in self.ops:
            if op.output not in names:
                names.append(op.output)
        return names

    def constants(self) -> list[str]:
        """Names of the constant tensors (weights, biases) in first-use order."""
        names: list[str] = []
        for op in self.ops:
            for attr in ("weight", "bias"):
                name = getattr(op, attr, None)
                if name and name not in names:
                    names.append(name)
        return names

    def weight_bytes(self) -> int:
        """Bytes of all constant tensors (int8 weights, int32 biases)."""
        return sum(self.tensors[n].nbytes for n in self.constants())

    def constant_bytes(self) -> int:
        """Bytes of every constant a backend stores: weights, biases and the int32
        requantization multipliers and shifts of conv / FC layers."""
        fixed = sum(8 * len(op.multiplier) for op in self.ops if isinstance(op, Layer))
        return self.weight_bytes() + fixed

    def macs(self) -> int:
        """Multiply-accumulates of one inference (conv, depthwise, FC)."""
        return sum(self.macs_of(op) for op in self.ops)

    def macs_of(self, op: Op) -> int:
        """Multiply-accumulates of one op (0 for ops without weights)."""
        if isinstance(op, Conv2D):
            w = self.tensors[op.weight].shape
            per_output = w[1] * w[2] * (1 if op.depthwise else w[3])
            return self.tensors[op.output].size * per_output
        if isinstance(op, FullyConnected):
            return int(np.prod(self.tensors[op.weight].shape))
        if hasattr(op, "macs"):  # .ops_seq's BatchMatMul
            return op.macs(self)
        return 0

    def kernel_of(self, op: Op) -> tuple[int, int]:
        """``(KH, KW)`` of a conv or pool."""
        if isinstance(op, Conv2D):
            return tuple(self.tensors[op.weight].shape[1:3])
        if isinstance(op, Pool2D):
            return op.kernel
        raise TypeError(f"{op.kind} has no kernel")

    def validate(self) -> None:
        """Check the invariants every backend relies on; raise :class:`ExportError` if broken."""
        seen = set(self.inputs)
        if len(seen) != len(self.inputs) or len(set(self.outputs)) != len(self.outputs):
            raise ExportError(f"graph inputs {self.inputs} / outputs {self.outputs} repeat")
        for i, op in enumerate(self.ops):
            where = f"op {i} ({op.kind} from {op.name!r})"
            for name in op.inputs:
                if name not in seen:
                    raise ExportError(f"{where} reads {name!r} before it is written")
                if self.tensors[name].dtype != "int8" or self.tensors[name].is_const:
                    raise ExportError(f"{where}: input {name!r} must be an int8 activation")
            if op.output in seen:
                raise ExportError(f"{where} writes {op.output!r} a second time")
            seen.add(op.output)
            out = self.tensors[op.output]
            if len(out.scale) != 1:
                raise ExportError(f"{where}: activation {op.output!r} must be per-tensor")
        for name in self.outputs:
            if name not in seen or name in self.inputs:
                raise ExportError(f"graph output {name!r} is never written by an op")


# --------------------------------------------------------------------------------------
# Fixed-point parameters, computed once from the qparams by TFLite Micro's rules
# --------------------------------------------------------------------------------------


def prepare(graph: Graph) -> Graph:
    """Fill every op's multipliers, shifts and clamping range from the tensors' qparams."""
    t = graph.tensors
    for op in graph.ops:
        out = t[op.output]
        if isinstance(op, Layer):
            s_in = t[op.inputs[0]].qscale
            w_scale = t[op.weight].scale
            if isinstance(op, FullyConnected) and len(w_scale) == 1:
                m, s = spec.fc_multiplier(s_in, w_scale[0], out.qscale)
                op.multiplier, op.shift = np.array([m]), np.array([s])
            else:
                op.multiplier, op.shift = spec.conv_multipliers(s_in, w_scale, out.qscale)
        if isinstance(op, (Conv2D, FullyConnected, Add)):
            op.act_min, op.act_max = spec.tflite_activation_range(
                op.activation, out.qscale, out.qzero
            )
        if isinstance(op, Add):
            a, b = (t[n] for n in op.inputs)
            op.params = spec.add_params(a.qscale, b.qscale, out.qscale)
        if isinstance(op, Softmax):
            op.params = spec_nonlinear.softmax_params(t[op.inputs[0]].qscale, op.beta)
        if isinstance(op, Requantize):
            op.multiplier, op.shift = spec.requantize_params(t[op.inputs[0]].qscale, out.qscale)
        if hasattr(op, "prepare"):  # the ops of .ops_seq compute their own
            op.prepare(t)
            continue
        try:
            _prepare_elementwise(t, op, out)
        except ValueError as exc:
            raise ExportError(f"{op.kind} {op.name!r}: {exc}") from exc
    return graph


def _prepare_elementwise(t: dict[str, Tensor], op: Op, out: Tensor) -> None:
    x = t[op.inputs[0]]
    if isinstance(op, Logistic):
        if (out.qscale, out.qzero) != (
            spec_nonlinear.LOGISTIC_OUTPUT_SCALE,
            spec_nonlinear.LOGISTIC_OUTPUT_ZERO_POINT,
        ):
            raise ValueError("the output of an int8 logistic must have scale 1/256, zp -128")
        op.params = spec_nonlinear.logistic_params(x.qscale, x.qzero)
    if isinstance(op, HardSwish):
        op.params = spec_nonlinear.hard_swish_params(x.qscale, x.qzero, out.qscale, out.qzero)
    if isinstance(op, Mul):
        op.params = spec.mul_params(x.qscale, t[op.inputs[1]].qscale, out.qscale)
