"""C emitters of the sequence / transformer ops (:mod:`edgeslim.export.int8.ops_seq`).

A mixin of :class:`.codegen._Writer`: one method per op kind, each filling a ``static
const`` parameter struct and calling its kernel from ``templates/kernels_seq.c``.
"""

from __future__ import annotations

import numpy as np

from edgeslim.export.int8 import ops_seq


def _c_ints(values) -> str:
    return ", ".join(str(int(v)) for v in values)


class SeqEmitters:
    """``_Transpose``, ``_Normalize``, ``_Lut``, ``_BatchMatMul``, ``_Constant``, ``_Gather``."""

    def _Transpose(self, i: int, op: ops_seq.Transpose, indent: str) -> None:
        nd = len(op.in_shape)
        shape = list(op.in_shape) + [1] * (6 - nd)
        perm = list(op.perm) + list(range(nd, 6))
        self.params.append(
            f"static const transpose_params_t OP{i} = {{{nd}, {{{_c_ints(shape)}}}, "
            f"{{{_c_ints(perm)}}}}};"
        )
        self.call("transpose", f"&OP{i}, {self.ptr(op.inputs[0])}, {self.ptr(op.output)}", indent)

    def _Normalize(self, i: int, op: ops_seq.Normalize, indent: str) -> None:
        x = self.g[op.inputs[0]]
        depth = x.shape[-1]
        fields = [x.size // depth, depth, x.qzero, op.mean_multiplier, op.mean_shift]
        fields += op.sub.values()
        self.params.append(f"static const normalize_params_t OP{i} = {{{_c_ints(fields)}}};")
        self.call("normalize", f"&OP{i}, {self.ptr(op.inputs[0])}, {self.ptr(op.output)}", indent)

    def _Lut(self, i: int, op: ops_seq.Lut, indent: str) -> None:
        self._lut(i, op, indent)

    def _BatchMatMul(self, i: int, op: ops_seq.BatchMatMul, indent: str) -> None:
        a, b = (self.g[n] for n in op.inputs)
        out = self.g[op.output]
        m, k = a.shape[-2], a.shape[-1]
        n = out.shape[-1]
        fields = [
            a.size // (m * k),
            m,
            k,
            n,
            int(op.adj_y),
            a.qzero,
            b.qzero,
            out.qzero,
            op.multiplier,
            op.shift,
        ]
        self.params.append(f"static const bmm_params_t OP{i} = {{{_c_ints(fields)}}};")
        args = f"&OP{i}, {self.ptr(op.inputs[0])}, {self.ptr(op.inputs[1])}, {self.ptr(op.output)}"
        self.call("batch_matmul", args, indent)

    def _Constant(self, i: int, op: ops_seq.Constant, indent: str) -> None:
        from edgeslim.export.c.codegen import _c_array

        self.arrays.append(_c_array("int8_t", f"op{i}_data", np.asarray(op.data).reshape(-1)))
        size = self.g[op.output].size
        self.call("constant", f"op{i}_data, {self.ptr(op.output)}, {size}", indent)

    def _Gather(self, i: int, op: ops_seq.Gather, indent: str) -> None:
        from edgeslim.export.c.codegen import _c_array

        shape = self.g[op.inputs[0]].shape
        outer = int(np.prod(shape[: op.axis]))
        inner = int(np.prod(shape[op.axis + 1 :]))
        self.arrays.append(_c_array("int32_t", f"op{i}_index", np.array(op.indices)))
        args = (
            f"{self.ptr(op.inputs[0])}, {outer}, {shape[op.axis]}, {inner}, op{i}_index, "
            f"{len(op.indices)}, {self.ptr(op.output)}"
        )
        self.call("gather", args, indent)
