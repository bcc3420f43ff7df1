"""What the generated C does per inference, per op type: the device latency model's input.

    work = workload(graph, packed, plan)     # a profiling.devices.Workload
    device.latency_ms(work)

Conv / depthwise / fully connected MACs with dense int8 weights are counted apart; a layer
stored compressed (:mod:`.compress`) counts the MACs over the weights it stores (every
weight for ``"codebook"``, the nonzeros for ``"relative"`` / ``"runs"``: the kernels skip
the rest), and a dense convolution also its taps (output values x KH x KW: the kernels
check the padding and set up the channel loop per tap). Each conv / FC output value is
requantized once (``outputs``); every other op writes ``elements`` values (pooling reads
``kernel`` taps per output, counted as taps).
With patch-based execution the MAC counts grow by the plan's recompute overhead.
"""

from __future__ import annotations

import numpy as np

from edgeslim.export.c import compress
from edgeslim.export.c.planner import MemoryPlan
from edgeslim.export.int8 import ir
from edgeslim.profiling.devices import Workload

__all__ = ["workload"]


def workload(
    graph: ir.Graph,
    packed: dict[int, compress.Packed] | None = None,
    plan: MemoryPlan | None = None,
) -> Workload:
    """The :class:`~edgeslim.profiling.devices.Workload` of ``graph`` as the C backend runs
    it: ``packed`` layers compressed, ``plan``'s patches (if any) recomputing MACs."""
    packed = packed or {}
    counts = dict.fromkeys(("conv", "taps", "dw", "fc", "packed", "outputs", "elements"), 0)
    for i, op in enumerate(graph.ops):
        out = graph[op.output].size
        macs = graph.macs_of(op)
        if isinstance(op, ir.Layer):
            counts["outputs"] += out
            if i in packed:
                p = packed[i]
                stored = p.rows * p.cols
                if p.format in ("relative", "runs"):
                    stored = int(np.count_nonzero(compress.weight_matrix(graph, op)))
                counts["packed"] += round(macs * stored / max(p.rows * p.cols, 1))
            elif isinstance(op, ir.FullyConnected):
                counts["fc"] += macs
            elif op.depthwise:
                counts["dw"] += macs
            else:
                counts["conv"] += macs
                counts["taps"] += out * int(np.prod(graph.kernel_of(op)))
        elif isinstance(op, ir.Pool2D):
            counts["elements"] += out * op.kernel[0] * op.kernel[1]
        elif macs:  # a batch matmul (attention): MACs as a fully connected layer's
            counts["fc"] += macs
            counts["outputs"] += out
        else:
            counts["elements"] += out
    work = Workload(
        conv_macs=counts["conv"],
        conv_taps=counts["taps"],
        dw_macs=counts["dw"],
        fc_macs=counts["fc"],
        packed_macs=counts["packed"],
        outputs=counts["outputs"],
        elements=counts["elements"],
        ops=len(graph.ops),
    )
    if plan is not None and plan.patch is not None:
        work = work.scaled_macs(1 + plan.patch.mac_overhead)
    return work
