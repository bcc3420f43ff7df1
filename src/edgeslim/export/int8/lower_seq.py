"""Lowering of transformer-style float ops (:mod:`.trace_seq`) into the integer graph.

A PyTorch value maps onto an IR tensor through a *layout* ``perm``: the IR tensor's bytes
are ``torch_value.permute(perm)`` in row-major order (its IR shape is that shape, with
leading dimensions merged to four, or padded: ``(1, T, D)`` is ``(1, 1, T, D)``). The
layouts of the CNN ops (:mod:`.build`) are the standard ones: NCHW -> NHWC is
``(0, 2, 3, 1)``, ``(N, C, L)`` -> ``(1, 1, L, C)`` is ``(0, 2, 1)``. So ``permute`` and
``transpose`` move no data (they change the layout), ``reshape`` moves none when the
bytes already are in order, and data moves (a TRANSPOSE op) only where an op needs a
layout the value does not have: a linear layer, LayerNorm or softmax their axis last,
a batch matmul its operands in order.

LayerNorm is :class:`.ops_seq.Normalize` then ``gamma * sqrt(D)`` and ``beta`` as a 1x1
depthwise convolution (its epsilon is dropped: TFLite's L2_NORMALIZATION has none; it only
matters for rows of all but equal values); a linear layer on the last axis is a 1x1
convolution; GELU a 256-entry table. A multiply by a positive number is pending on the value
(``factor``): a softmax takes it as its ``beta``, any other op reads the same integers on a
scale times it (a RESHAPE that only relabels the scale: exact). Swin's windows become the
IR tensors' first dimension (a batch of windows); ops that need ``(1, H, W, C)`` view it as
``(1, 1, rows, C)``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from edgeslim.core.errors import LoweringError
from edgeslim.export.int8 import ir, ops_seq
from edgeslim.export.int8.trace import FloatOp
from edgeslim.quant import spec, spec_nonlinear

STANDARD = {4: (0, 2, 3, 1), 3: (0, 2, 1), 2: (0, 1)}  # the CNN ops' layouts
SEQ_KINDS = frozenset(
    {
        "permute",
        "reshape",
        "select",
        "gather",
        "layernorm",
        "gelu",
        "scale",
        "mul_const",
        "add_const",
        "cat_const",
        "matmul",
    }
)  # the kinds this module lowers
LAYOUT_AWARE = ("add", "mul", "linear", "softmax", "quant", "cat")  # CNN kinds with a layout path


def canonical_shape(torch_shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[int, ...]:
    """The IR shape of a value of ``torch_shape`` in layout ``perm``."""
    moved = [int(torch_shape[p]) for p in perm]
    if len(moved) == 2:
        return tuple(moved)
    if len(moved) == 3:
        return (moved[0], 1, moved[1], moved[2])
    if len(moved) == 4:
        return tuple(moved)
    return (moved[0], int(np.prod(moved[1:-2])), moved[-2], moved[-1])


def _simplify(shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[tuple, tuple]:
    """Drop size-1 axes and merge axes that stay adjacent: the smallest equivalent
    ``(shape, perm)`` of a transpose (TFLite's TRANSPOSE takes at most 6 dimensions)."""
    keep = [i for i in range(len(shape)) if shape[i] != 1]
    if not keep:
        return (1,), (0,)
    perm = [p for p in perm if p in keep]
    groups: list[list[int]] = []
    for p in perm:
        if groups and p == groups[-1][-1] + 1 and groups[-1][-1] in keep:
            nxt = keep.index(groups[-1][-1]) + 1
            if nxt < len(keep) and keep[nxt] == p:
                groups[-1].append(p)
                continue
        groups.append([p])
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    new_shape = tuple(int(np.prod([shape[a] for a in groups[g]])) for g in order)
    new_perm = tuple(order.index(g) for g in range(len(groups)))
    return new_shape, new_perm


class SeqLowering:
    """Mixin of :class:`.build._Builder`: the ``_lower_<kind>`` of :mod:`.trace_seq`'s ops
    and the layout-aware forms of the CNN ops add, mul, linear, softmax and quantizers."""

    # ---- layouts

    def _perm(self, v) -> tuple[int, ...]:
        if v.perm is not None:
            return v.perm
        rank = len(v.torch_shape)
        if rank not in STANDARD:
            raise LoweringError(f"tensors of rank {rank} are not supported ({v.torch_shape})")
        return STANDARD[rank]

    def _view(self, tensor: str, shape: tuple[int, ...], why: str) -> str:
        """``tensor`` with IR shape ``shape`` (a RESHAPE when it has another shape)."""
        t = self.tensors[tensor]
        if tuple(t.shape) == tuple(shape):
            return tensor
        if int(np.prod(shape)) != t.size:
            raise LoweringError(f"{why}: cannot view {t.shape} as {shape}")
        out = self.same_qparams_as(f"{tensor}_as", tensor, tuple(shape))
        self.ops.append(ir.Reshape(why, [tensor], out))
        return out

    def _layout(self, v, perm: tuple[int, ...], why: str):
        """``v`` in layout ``perm``: a TRANSPOSE when its layout is another."""
        from edgeslim.export.int8.build import _Value

        have = self._perm(v)
        if have == tuple(perm):
            return v
        src_shape = tuple(int(v.torch_shape[p]) for p in have)
        inv = {p: i for i, p in enumerate(have)}
        q = tuple(inv[p] for p in perm)
        in_shape, small = _simplify(src_shape, q)
        if len(in_shape) > 6:
            raise LoweringError(f"{why}: a transpose of more than 6 dimensions")
        out_shape = canonical_shape(v.torch_shape, perm)
        out = self.same_qparams_as(f"{v.tensor}_t", v.tensor, out_shape)
        self.ops.append(ops_seq.Transpose(why, [v.tensor], out, perm=small, in_shape=in_shape))
        return _Value(out, v.torch_shape, perm=tuple(perm), factor=v.factor)

    def _legacy(self, v, why: str):
        """``v`` in the CNN ops' layout (their inputs)."""
        from edgeslim.export.int8.build import _nhwc, _Value

        if v.perm is None and v.factor == 1.0:
            return v
        if v.factor != 1.0:
            v = self._unscaled(why, v)
        rank = len(v.torch_shape)
        if rank not in STANDARD:
            raise LoweringError(f"{why}: tensors of rank {rank} are not supported here")
        w = self._layout(v, STANDARD[rank], why)
        tensor = self._view(w.tensor, _nhwc(v.torch_shape), why)
        return _Value(tensor, v.torch_shape, v.nchw_flatten)

    def _set(self, o: FloatOp, tensor: str, perm: tuple[int, ...], factor: float = 1.0) -> None:
        """Record ``o``'s output: IR ``tensor`` in layout ``perm`` (the CNN layout where it is
        one, so that CNN ops read it as they are)."""
        from edgeslim.export.int8.build import _nhwc, _Value

        rank = len(o.shape)
        if factor == 1.0 and rank in (2, 4) and tuple(perm) == STANDARD[rank]:
            self.values[o.value] = _Value(self._view(tensor, _nhwc(o.shape), o.name), o.shape)
            return
        tensor = self._view(tensor, canonical_shape(o.shape, perm), o.name)
        self.values[o.value] = _Value(tensor, o.shape, perm=tuple(perm), factor=factor)

    def _seq_in(self, o: FloatOp, i: int = 0):
        return self.values[o.inputs[i]]

    def _last_axis(self, o: FloatOp, v):
        """``v`` in a layout with its last dimension last (transposed if it is not)."""
        perm = self._perm(v)
        rank = len(perm)
        if perm[-1] == rank - 1:
            return v
        return self._layout(v, tuple(range(rank)), o.name)

    def _as4d(self, tensor: str, why: str) -> str:
        """``tensor`` as a (1, H, W, C) feature map (rows of a batch of windows: (1, 1, M, C))."""
        shape = self.tensors[tensor].shape
        if len(shape) == 4 and shape[0] == 1:
            return tensor
        return self._view(tensor, (1, 1, int(np.prod(shape[:-1])), shape[-1]), why)

    def _unscaled(self, why: str, v):
        """``v`` with its pending multiply applied: the same integers on a scale times it
        (a RESHAPE that only relabels the scale: exact, no data moves)."""
        if v.factor == 1.0:
            return v
        t = self.tensors[v.tensor]
        scaled = spec.QParams(np.array([t.qscale * v.factor]), t.zero_point.copy())
        name = self.act(f"{v.tensor}_scaled", t.shape, scaled)
        self.ops.append(ir.Reshape(f"{why} (x {v.factor:g})", [v.tensor], name))
        return type(v)(name, v.torch_shape, perm=self._perm(v))

    def _channel_affine(self, o: FloatOp, x: str, w: np.ndarray, b: np.ndarray) -> str:
        """``x * w + b`` per channel of the last axis: a 1x1 depthwise conv; its output."""
        x4 = self._as4d(x, o.name)
        s_in = self.tensors[x4].qscale
        w = np.asarray(w, np.float64).reshape(1, 1, 1, -1)
        wq = spec.weight_qparams(w, axis=3)
        w_scale = spec.to_float32(wq.scale)
        w_int = spec.quantize(
            w, spec.QParams(w_scale, wq.zero_point, spec.WEIGHT_MIN, spec.WEIGHT_MAX, 3)
        )
        b_int = spec.quantize_bias(np.asarray(b, np.float64).reshape(-1), s_in, w_scale)
        weight = self.const(f"{o.name}.scale", w_int, "int8", w_scale, 3)
        bias = self.const(f"{o.name}.shift", b_int, "int32", spec.to_float32(s_in * w_scale), 0)
        out = self.act(o.value, self.tensors[x4].shape, self.source.activation(o.value))
        self.ops.append(ir.Conv2D(o.name, [x4], out, weight=weight, bias=bias, depthwise=True))
        return out

    # ---- layout ops

    def _lower_permute(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        have = self._perm(v)
        dims = o.attrs["dims"]
        inv = {d: i for i, d in enumerate(dims)}
        self._set(o, v.tensor, tuple(inv[p] for p in have), v.factor)

    def _lower_reshape(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        have = self._perm(v)
        src, dst = tuple(v.torch_shape), tuple(o.shape)
        n = int(np.prod(src))
        order = np.arange(n).reshape(src).transpose(have).ravel()
        target = np.arange(n).reshape(dst)
        candidates = [tuple(range(len(dst)))]
        if len(dst) in STANDARD:
            candidates.append(STANDARD[len(dst)])
        if len(dst) <= 5:
            candidates += list(itertools.permutations(range(len(dst))))
        for cand in candidates:
            if cand[0] == 0 and np.array_equal(target.transpose(cand).ravel(), order):
                self._set(o, v.tensor, cand, v.factor)
                return
        # one transpose: the source layout whose bytes are the output in a layout it can
        # have (the CNN ops' first: a channel shuffle lands back in NHWC)
        outs = [STANDARD[len(dst)]] if len(dst) in STANDARD else []
        outs.append(tuple(range(len(dst))))
        srcs = itertools.permutations(range(len(src))) if len(src) <= 5 else []
        srcs = [q for q in srcs if q[0] == 0]
        source = np.arange(n).reshape(src)
        for out_perm in outs:
            needed = target.transpose(out_perm).ravel()
            for q in srcs:
                if np.array_equal(source.transpose(q).ravel(), needed):
                    w = self._layout(v, q, o.name)
                    self._set(o, w.tensor, out_perm, v.factor)
                    return
        w = self._layout(v, tuple(range(len(src))), o.name)  # bytes in PyTorch's order
        self._set(o, w.tensor, tuple(range(len(dst))), v.factor)

    def _axis(self, o: FloatOp, perm: tuple[int, ...], dim: int) -> int:
        if len(perm) > 4:
            raise LoweringError(f"{o.name}: joining tensors of rank {len(perm)}")
        return perm.index(dim) + (1 if len(perm) == 3 else 0)

    def _lower_select(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        perm = self._perm(v)
        dim = o.attrs["dim"] % len(perm)
        out = self._gather(o, v, perm, dim, (o.attrs["index"] % v.torch_shape[dim],))
        rest = tuple(p - (p > dim) for p in perm if p != dim)
        self._set(o, out, rest, v.factor)

    def _lower_gather(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        perm = self._perm(v)
        out = self._gather(o, v, perm, o.attrs["dim"], tuple(o.attrs["indices"]))
        self._set(o, out, perm, v.factor)

    def _gather(self, o: FloatOp, v, perm, dim: int, indices: tuple[int, ...]) -> str:
        """GATHER along PyTorch dim ``dim``, on the IR tensor viewed unmerged (the value's
        shape permuted by its layout)."""
        moved = [int(v.torch_shape[p]) for p in perm]
        if len(perm) == 3:  # the CNN layout of (N, C, L): (1, 1, L, C)
            moved = [moved[0], 1, *moved[1:]]
        x = self._view(v.tensor, tuple(moved), o.name)
        axis = perm.index(dim) + (1 if len(perm) == 3 else 0)
        moved[axis] = len(indices)
        out = self.same_qparams_as(o.value, x, tuple(moved))
        self.ops.append(ops_seq.Gather(o.name, [x], out, axis=axis, indices=indices))
        return out

    # ---- LayerNorm, GELU, constants

    def _lower_layernorm(self, o: FloatOp) -> None:
        v = self._last_axis(o, self._seq_in(o))
        v = self._unscaled(o.name, v)
        x = self.tensors[v.tensor]
        depth = x.shape[-1]
        qp = spec.QParams(
            np.array([ops_seq.L2NORM_OUTPUT_SCALE]), np.array([ops_seq.L2NORM_OUTPUT_ZERO_POINT])
        )
        normed = self.act(f"{o.value}_normalized", x.shape, qp)
        self.ops.append(ops_seq.Normalize(o.name, [v.tensor], normed))
        gamma = o.attrs["weight"] if o.attrs["weight"] is not None else np.ones(depth)
        beta = o.attrs["bias"] if o.attrs["bias"] is not None else np.zeros(depth)
        out = self._channel_affine(o, normed, gamma * math.sqrt(depth), beta)
        self._set(o, out, self._perm(v))

    def _lower_gelu(self, o: FloatOp) -> None:
        import torch

        v = self._seq_in(o)
        v = self._unscaled(o.name, v)
        x = self.tensors[v.tensor]
        qp = self.source.activation(o.value)
        q = np.arange(spec.INT8_MIN, spec.INT8_MAX + 1)
        real = torch.tensor(x.qscale * (q - x.qzero), dtype=torch.float64)
        y = torch.nn.functional.gelu(real, approximate=o.attrs["approximate"]).numpy()
        out = self.act(o.value, x.shape, qp)
        t = self.tensors[out]
        table = spec.quantize(y, spec.QParams(t.scale, t.zero_point))
        self.ops.append(ops_seq.Lut(o.name, [v.tensor], out, table=table, function="gelu"))
        self._set(o, out, self._perm(v))

    def _lower_scale(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        self._set(o, v.tensor, self._perm(v), v.factor * o.attrs["factor"])

    def _lower_mul_const(self, o: FloatOp) -> None:
        v = self._last_axis(o, self._seq_in(o))
        c = np.asarray(o.attrs["const"], np.float64)
        depth = o.shape[-1]
        if c.size not in (1, depth) or (c.size == depth and c.shape[-1:] != (depth,)):
            raise LoweringError(
                f"{o.name}: only a multiply by a number or a vector over the last dimension "
                f"is supported (got a constant of shape {c.shape})"
            )
        w = np.broadcast_to(c.reshape(-1), (depth,)) * v.factor
        out = self._channel_affine(o, v.tensor, w, np.zeros(depth))
        self._set(o, out, self._perm(v))

    def _constant(self, o: FloatOp, data: np.ndarray, perm, qp: spec.QParams) -> str:
        """An IR Constant of ``data`` (PyTorch layout, ``o``'s batch) in layout ``perm``."""
        ir_data = np.asarray(data, np.float64).transpose(perm)
        shape = canonical_shape(data.shape, perm)
        name = self.act(f"{o.value}_const", shape, qp)
        t = self.tensors[name]
        q = spec.quantize(ir_data.reshape(shape), spec.QParams(t.scale, t.zero_point))
        self.ops.append(ops_seq.Constant(o.name, [], name, data=q))
        return name

    def _lower_add_const(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        v = self._unscaled(o.name, v)
        perm = self._perm(v)
        c = np.broadcast_to(np.asarray(o.attrs["const"], np.float64), o.shape)
        qp = spec.activation_qparams(float(c.min()), float(c.max()))
        const = self._as4d(self._constant(o, c, perm, qp), o.name)
        x = self._view(v.tensor, self.tensors[const].shape, o.name)
        out = self.act(o.value, self.tensors[x].shape, self.source.activation(o.value))
        self.ops.append(ir.Add(o.name, [x, const], out))
        self._set(o, out, perm)

    def _lower_cat_const(self, o: FloatOp) -> None:
        values = [self.values[n] for n in o.inputs]
        perm = self._perm(values[0])
        rank = len(perm)
        dim = o.attrs["dim"] % rank
        axis = self._axis(o, perm, dim)
        qp = self.source.activation(o.value)
        out = self.act(o.value, canonical_shape(o.shape, perm), qp)
        inputs = []
        given = iter(values)
        for kind, item in o.attrs["parts"]:
            if kind == "const":
                inputs.append(self._constant(o, np.asarray(item), perm, qp))
                continue
            w = self._layout(next(given), perm, o.name)
            w = self._unscaled(o.name, w)
            t = self.tensors[w.tensor]
            name = w.tensor
            if (t.qscale, t.qzero) != (self.tensors[out].qscale, self.tensors[out].qzero):
                name = self.same_qparams_as(f"{w.tensor}_requant", out, t.shape)
                self.ops.append(ir.Requantize(f"{o.name} (input)", [w.tensor], name))
            inputs.append(name)
        self.ops.append(ir.Concat(o.name, inputs, out, axis=axis))
        self._set(o, out, perm)

    # ---- matmul and the layout-aware CNN ops

    def _lower_matmul(self, o: FloatOp) -> None:
        a, b = self._seq_in(o, 0), self._seq_in(o, 1)
        a = self._unscaled(o.name, a)
        b = self._unscaled(o.name, b)
        rank = len(o.shape)
        if rank < 3 or len(a.torch_shape) != rank or len(b.torch_shape) != rank:
            raise LoweringError(f"{o.name}: matmul needs two batched matrices of rank >= 3")
        if a.torch_shape[:-2] != b.torch_shape[:-2]:
            raise LoweringError(f"{o.name}: matmul with broadcast batch dimensions")
        ident = tuple(range(rank))
        swapped = (*ident[:-2], rank - 1, rank - 2)
        a = self._layout(a, ident, o.name)
        adj = self._perm(b) == swapped
        if not adj:
            b = self._layout(b, ident, o.name)
        out = self.act(o.value, canonical_shape(o.shape, ident), self.source.activation(o.value))
        self.ops.append(ops_seq.BatchMatMul(o.name, [a.tensor, b.tensor], out, adj_y=adj))
        self._set(o, out, ident)

    def _seq_softmax(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        rank = len(o.shape)
        dim = o.attrs["dim"]
        if dim is None or dim % rank != rank - 1:
            raise LoweringError(f"{o.name}: softmax must be over the last dimension")
        v = self._last_axis(o, v)
        qp = spec.QParams(
            np.array([spec_nonlinear.SOFTMAX_OUTPUT_SCALE]),
            np.array([spec_nonlinear.SOFTMAX_OUTPUT_ZERO_POINT]),
        )
        out = self.act(o.value, self.tensors[v.tensor].shape, qp)
        self.ops.append(ir.Softmax(o.name, [v.tensor], out, beta=float(v.factor)))
        self._set(o, out, self._perm(v))

    def _seq_linear(self, o: FloatOp) -> None:
        v = self._last_axis(o, self._seq_in(o))
        v = self._unscaled(o.name, v)
        if "weight_int" in o.attrs:  # a quantized layer reads its input on its own qparams
            qp = o.module.input_quant.qparams()
            t = self.tensors[v.tensor]
            if (spec.to_float32(qp.scale[0]), int(qp.zero_point[0])) != (t.qscale, t.qzero):
                req = self.act(f"{v.tensor}_requant", t.shape, qp)
                self.ops.append(ir.Requantize(f"{o.name} (input)", [v.tensor], req))
                v = type(v)(req, v.torch_shape, perm=v.perm)
        x4 = self._as4d(v.tensor, o.name)
        x4v = type(v)(x4, v.torch_shape, perm=v.perm)
        weight, bias = self._weights(o, lambda w: w[:, None, None, :], 0, x4v)
        shape = (*self.tensors[x4].shape[:-1], o.shape[-1])
        out = self.act(o.value, shape, self.source.activation(o.value))
        self.ops.append(
            ir.Conv2D(
                o.name,
                [x4],
                out,
                weight=weight,
                bias=bias,
                activation=o.attrs.get("activation"),
            )
        )
        self._set(o, out, self._perm(v))

    def _seq_add(self, o: FloatOp, cls=ir.Add) -> None:
        a, b = self._seq_in(o, 0), self._seq_in(o, 1)
        a = self._unscaled(o.name, a)
        b = self._unscaled(o.name, b)
        if tuple(a.torch_shape) != tuple(b.torch_shape):
            raise LoweringError(f"{o.name}: only tensors of the same shape are supported")
        perm = self._perm(a)
        b = self._layout(b, perm, o.name)
        at = self._as4d(a.tensor, o.name)
        shape = self.tensors[at].shape
        bt = self._view(b.tensor, shape, o.name)
        out = self.act(o.value, shape, self.source.activation(o.value))
        extra = {"activation": o.attrs.get("activation")} if cls is ir.Add else {}
        self.ops.append(cls(o.name, [at, bt], out, **extra))
        self._set(o, out, perm)

    def _seq_cat(self, o: FloatOp) -> None:
        o.attrs["parts"] = [("value", n) for n in o.inputs]
        self._lower_cat_const(o)

    def _seq_mul(self, o: FloatOp) -> None:
        self._seq_add(o, ir.Mul)

    def _seq_quant(self, o: FloatOp) -> None:
        v = self._seq_in(o)
        qp = self.source.activation(o.value)
        v = self._unscaled(o.name, v)
        t = self.tensors[v.tensor]
        if (spec.to_float32(qp.scale[0]), int(qp.zero_point[0])) == (t.qscale, t.qzero):
            self.values[o.value] = v
            return
        out = self.act(o.value, t.shape, qp)
        self.ops.append(ir.Requantize(o.name, [v.tensor], out))
        self._set(o, out, self._perm(v), v.factor)

    def seq_dispatch(self, o: FloatOp) -> bool:
        """Lower a CNN op in its layout-aware form when an input has a layout of its own;
        False when the CNN form applies."""
        if o.kind not in LAYOUT_AWARE:
            return False
        ins = [self.values[n] for n in o.inputs]
        softmax_last = (
            o.kind == "softmax"
            and len(o.shape) >= 3
            and o.attrs.get("dim") is not None
            and o.attrs["dim"] % len(o.shape) == len(o.shape) - 1
        )
        if not softmax_last and all(v.perm is None and v.factor == 1.0 for v in ins):
            return False
        getattr(self, f"_seq_{o.kind}")(o)
        return True
