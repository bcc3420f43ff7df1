"""Static memory planner: every activation of the integer graph gets an offset in one arena.

1. **Lifetimes.** A tensor is live from the op that writes it to the last op that reads it
   (ops are numbered in execution order). The graph input is read in place from the
   caller's buffer and the output is written straight into the caller's buffer: neither
   takes arena space (``model_run(const int8_t *input, int8_t *output)``). A graph with
   several inputs and outputs has one caller's buffer for each (``Buffer.port``); inputs
   are never written, outputs live to the end (never overwritten, never in place).
2. **In-place rules** (tensors that share one buffer):

   - a reshape's output *is* its input (same bytes);
   - an add writes into one of its inputs when that input dies at the add (elementwise: each
     output byte is written after the input bytes it depends on were read);
   - a depthwise conv (depth multiplier 1) writes into its input when the input dies there:
     channel by channel, the input channel is first copied to a per-channel scratch buffer of
     ``H x W`` bytes; in NHWC the output of channel ``c`` only lands on bytes of input
     channel ``c``, which have been copied already;
   - a pointwise (1x1, stride 1) conv writes into its input when the input dies there, one
     output pixel at a time through a ``Cout``-byte pixel buffer, starting where the input
     starts: shrinking (``Cout <= Cin``) pixels run forward, expanding they run backward, so
     a pixel's output never lands on input pixels not yet read.

   Every in-place output starts where its input starts, so a chain of in-place ops needs
   no more than its largest tensor.

3. **Placement**, greedy: buffers by decreasing size (ties: earlier first), each at the lowest
   offset where it overlaps no placed buffer whose lifetime intersects its own (first fit).
4. The **lower bound** reported beside the arena is the largest total size of buffers live at
   once (after the in-place rules): no placement can do better with these buffers.

**Patch-based execution** (MCUNetV2: Lin et al. 2021, "MCUNetV2: Memory-Efficient
Patch-based Inference for Tiny Deep Learning", https://arxiv.org/abs/2110.15352): the first
``stage_ops`` ops, whose large early feature maps usually set the peak, run once per spatial
patch of the stage's output. For each patch the region every stage tensor must cover is
derived backwards through the receptive fields; stage tensors then only need the largest
patch region, at the price of recomputing overlapping halos. :func:`search_patch` picks the
stage and grid with the smallest arena within a MAC-overhead budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from edgeslim.core.errors import ExportError
from edgeslim.export.int8 import ir


@dataclass(frozen=True)
class Region:
    """Rows ``[y0, y0 + h)`` and columns ``[x0, x0 + w)`` of a feature map."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def area(self) -> int:
        return self.h * self.w

    def union(self, other: Region | None) -> Region:
        """Bounding box of both regions."""
        if other is None:
            return self
        y0, x0 = min(self.y0, other.y0), min(self.x0, other.x0)
        y1 = max(self.y0 + self.h, other.y0 + other.h)
        x1 = max(self.x0 + self.w, other.x0 + other.w)
        return Region(y0, x0, y1 - y0, x1 - x0)


def full_region(t: ir.Tensor) -> Region:
    """The whole feature map of a (1, H, W, C) tensor; (1, 1) for a vector."""
    if len(t.shape) == 4:
        return Region(0, 0, t.shape[1], t.shape[2])
    return Region(0, 0, 1, 1)


@dataclass
class PatchPlan:
    """Ops ``[0, stage_ops)`` run once per patch of a ``grid`` over the stage's output.

    ``regions[p][tensor]`` is what patch ``p`` computes of each stage tensor (for the stage
    output: the patch itself) and reads of the graph input.
    """

    stage_ops: int
    grid: tuple[int, int]
    regions: list[dict[str, Region]]
    mac_overhead: float  # extra MACs of the whole graph, as a fraction (0.1 = +10%)

    @property
    def output(self) -> str:
        """Name of the stage's output tensor (the only stage tensor held in full)."""
        return next(reversed(self.regions[0]))


@dataclass
class Member:
    """One tensor of a buffer: where in the buffer it sits and when it is live."""

    rel: int  # offset inside the buffer
    size: int
    start: int  # op that writes it (-1: before the first op)
    end: int  # last op that reads it

    def overlaps(self, other: Member, shift: int) -> bool:
        """Do the two intersect in time and (with ``other`` moved by ``shift``) in address?"""
        if self.end < other.start or other.end < self.start:
            return False
        lo, hi = other.rel + shift, other.rel + shift + other.size
        return self.rel < hi and lo < self.rel + self.size


@dataclass
class Buffer:
    """Tensors that share memory (a reshape and its input, an in-place op's input and
    output), placed together: each member keeps its offset relative to the buffer."""

    members: dict[str, Member]
    kind: str = "arena"  # "arena", "scratch", "input" (caller's), "output" (caller's)
    offset: int = -1
    port: int = 0  # which input / output of the graph a caller's buffer holds

    @property
    def tensors(self) -> list[str]:
        return list(self.members)

    @property
    def size(self) -> int:
        return max(m.rel + m.size for m in self.members.values())

    @property
    def start(self) -> int:
        return min(m.start for m in self.members.values())

    @property
    def end(self) -> int:
        return max(m.end for m in self.members.values())

    def live_bytes(self, i: int) -> int:
        """Bytes of this buffer in use during op ``i`` (overlapping members counted once)."""
        spans = sorted(
            (m.rel, m.rel + m.size) for m in self.members.values() if m.start <= i <= m.end
        )
        total, reach = 0, 0
        for lo, hi in spans:
            total += max(0, hi - max(lo, reach))
            reach = max(reach, hi)
        return total

    def conflicts(self, other: Buffer, offset: int) -> bool:
        """Would this buffer at ``offset`` collide with placed buffer ``other``?"""
        shift = offset - other.offset
        return any(
            o.overlaps(m, shift) for m in self.members.values() for o in other.members.values()
        )


@dataclass
class MemoryPlan:
    """Where every activation lives; which ops run in place; arena size and lower bound."""

    buffers: list[Buffer]
    buffer_of: dict[str, int]  # tensor -> index in buffers
    inplace: dict[int, str] = field(default_factory=dict)  # op -> "add"/"depthwise"/"pointwise"
    scratch: dict[int, int] = field(default_factory=dict)  # op index -> scratch buffer index
    arena_size: int = 0
    lower_bound: int = 0
    alignment: int = 4
    patch: PatchPlan | None = None

    def buffer(self, tensor: str) -> Buffer:
        return self.buffers[self.buffer_of[tensor]]

    def offset(self, tensor: str) -> int:
        """Arena offset of an arena tensor."""
        buf = self.buffer(tensor)
        if buf.kind != "arena":
            raise KeyError(f"{tensor} is in the caller's {buf.kind} buffer, not in the arena")
        return buf.offset + buf.members[tensor].rel

    def summary(self) -> str:
        text = f"arena {self.arena_size:,} B (lower bound {self.lower_bound:,} B)"
        if self.inplace:
            text += f", {len(self.inplace)} ops in place"
        if self.patch is not None:
            p = self.patch
            text += (
                f", first {p.stage_ops} ops in {p.grid[0]}x{p.grid[1]} patches "
                f"(+{100 * p.mac_overhead:.1f}% MACs)"
            )
        return text


# --------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------


class _Groups:
    """Tensors that share a buffer, each at an offset relative to the buffer's start."""

    def __init__(self, names: list[str]) -> None:
        self.group = {n: i for i, n in enumerate(names)}
        self.rel: dict[int, dict[str, int]] = {i: {n: 0} for i, n in enumerate(names)}

    def members(self, n: str) -> dict[str, int]:
        return self.rel[self.group[n]]

    def join(self, keep: str, other: str) -> None:
        """Put ``other``'s group into ``keep``'s, ``other`` starting where ``keep`` starts."""
        g_keep, g_other = self.group[keep], self.group[other]
        if g_keep == g_other:
            return
        shift = self.rel[g_keep][keep] - self.rel[g_other][other]
        for m, r in self.rel.pop(g_other).items():
            self.rel[g_keep][m] = r + shift
            self.group[m] = g_keep


def _lifetimes(graph: ir.Graph, patch: PatchPlan | None) -> tuple[dict, dict]:
    """First and last op index of each activation (input: -1; output: one past the end)."""
    start: dict[str, int] = dict.fromkeys(graph.inputs, -1)
    end: dict[str, int] = dict.fromkeys(graph.inputs, -1)
    for i, op in enumerate(graph.ops):
        start[op.output] = end[op.output] = i
        for name in op.inputs:
            end[name] = max(end[name], i)
    for name in graph.outputs:
        end[name] = len(graph.ops)
    if patch is not None:  # the stage output is filled patch by patch from the first op on
        start[patch.output] = 0
    return start, end


def _sizes(graph: ir.Graph, patch: PatchPlan | None) -> dict[str, int]:
    """Bytes of each activation; a stage tensor of a patch plan needs its largest region."""
    sizes = {name: graph[name].nbytes for name in graph.activations()}
    if patch is not None:
        for name in patch.regions[0]:
            if name == patch.output or name in graph.inputs:
                continue
            channels = graph[name].shape[3]
            sizes[name] = max(r[name].area for r in patch.regions) * channels
    return sizes


def plan_memory(
    graph: ir.Graph,
    *,
    inplace: bool = True,
    patch: PatchPlan | None = None,
    alignment: int = 4,
    scratch: dict[int, int] | None = None,
) -> MemoryPlan:
    """Plan the arena of ``graph``: lifetimes, in-place rules, greedy first-fit placement.

    ``scratch`` asks for bytes of scratch that an op's kernel needs while it runs (``{op
    index: bytes}``, e.g. the im2col patch of a conv with packed weights).
    """
    names = graph.activations()
    start, end = _lifetimes(graph, patch)
    sizes = _sizes(graph, patch)
    groups = _Groups(names)
    for op in graph.ops:
        if isinstance(op, ir.Reshape):
            groups.join(op.inputs[0], op.output)
    input_groups = {groups.group[name]: k for k, name in enumerate(graph.inputs)}
    output_groups = {groups.group[name]: k for k, name in enumerate(graph.outputs)}
    if set(input_groups) & set(output_groups):
        raise ExportError("the graph's output is its input reshaped: nothing to compute")
    if len(output_groups) < len(graph.outputs):
        raise ExportError("two of the graph's outputs are one tensor reshaped: return it once")

    def can_overwrite(name: str, i: int) -> bool:
        members = groups.members(name)
        return groups.group[name] not in input_groups and max(end[m] for m in members) == i

    chosen: dict[int, str] = {}
    scratch_sizes: dict[int, int] = {}
    stage_output = patch.output if patch is not None else None
    for i, op in enumerate(graph.ops):
        out = op.output
        if not inplace or groups.group[out] in output_groups or out == stage_output:
            continue
        if isinstance(op, ir.Add):
            for name in op.inputs:
                if can_overwrite(name, i):
                    groups.join(name, out)
                    chosen[i] = "add"
                    break
        elif isinstance(op, ir.Conv2D) and op.depthwise:
            x = op.inputs[0]
            if graph[x].shape[3] == graph[out].shape[3] and can_overwrite(x, i):
                groups.join(x, out)
                chosen[i] = "depthwise"
                scratch_sizes[i] = sizes[x] // graph[x].shape[3]  # one channel (of a region)
        elif (
            _is_pointwise(graph, op)
            and can_overwrite(op.inputs[0], i)
            and _same_layout(patch, i, op.inputs[0], out)
        ):
            groups.join(op.inputs[0], out)
            chosen[i] = "pointwise"
            scratch_sizes[i] = graph[out].shape[3]  # one output pixel

    buffers: list[Buffer] = []
    for g in sorted(groups.rel, key=lambda g: min(start[m] for m in groups.rel[g])):
        kind = "input" if g in input_groups else "output" if g in output_groups else "arena"
        members = {
            m: Member(r, sizes[m], start[m], end[m])
            for m, r in sorted(groups.rel[g].items(), key=lambda kv: names.index(kv[0]))
        }
        port = input_groups.get(g, output_groups.get(g, 0))
        buffers.append(Buffer(members, kind, port=port))
    buffer_of = {m: i for i, b in enumerate(buffers) for m in b.members}
    for i, size in (scratch or {}).items():
        if size > 0:
            scratch_sizes[i] = max(size, scratch_sizes.get(i, 0))
    scratch_of: dict[int, int] = {}
    for i, size in sorted(scratch_sizes.items()):
        buffers.append(Buffer({f"scratch_op{i}": Member(0, size, i, i)}, "scratch"))
        scratch_of[i] = len(buffers) - 1

    arena = _place(buffers, alignment)
    plan = MemoryPlan(buffers, buffer_of, chosen, scratch_of, arena, 0, alignment, patch)
    plan.lower_bound = lower_bound(plan, len(graph.ops))
    return plan


def _same_layout(patch: PatchPlan | None, i: int, x: str, out: str) -> bool:
    """Do input and output of op ``i`` cover the same pixels in every patch?

    Outside a patch stage both hold whole feature maps. Inside, an input also read with a
    halo by another op holds a larger region, and an expanding pointwise conv run in place
    would then overwrite input pixels it has not read yet.
    """
    if patch is None or i >= patch.stage_ops:
        return True
    return all(r[x] == r[out] for r in patch.regions)


def _is_pointwise(graph: ir.Graph, op: ir.Op) -> bool:
    """A 1x1, stride 1, unpadded, non-depthwise conv."""
    return (
        isinstance(op, ir.Conv2D)
        and not op.depthwise
        and graph.kernel_of(op) == (1, 1)
        and op.stride == (1, 1)
        and op.padding == (0, 0, 0, 0)
    )


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _place(buffers: list[Buffer], alignment: int) -> int:
    """Greedy: largest buffer first, each at the lowest aligned offset free of conflicts.

    Returns the arena size. Candidate offsets are 0 and the (aligned) ends of placed members.
    """
    placed: list[Buffer] = []
    order = sorted(
        (b for b in buffers if b.kind in ("arena", "scratch")),
        key=lambda b: (-b.size, b.start, b.end),
    )
    arena = 0
    for buf in order:
        candidates = {0}
        for p in placed:
            for q in p.members.values():
                for m in buf.members.values():
                    if not (q.end < m.start or m.end < q.start):
                        candidates.add(_align(p.offset + q.rel + q.size - m.rel, alignment))
        for offset in sorted(c for c in candidates if c >= 0):
            if not any(buf.conflicts(p, offset) for p in placed):
                break
        buf.offset = offset
        placed.append(buf)
        arena = max(arena, offset + buf.size)
    return _align(arena, alignment)


def lower_bound(plan: MemoryPlan, n_ops: int) -> int:
    """The largest number of arena bytes in use during one op."""
    arena = [b for b in plan.buffers if b.kind in ("arena", "scratch")]
    return max((sum(b.live_bytes(i) for b in arena) for i in range(n_ops)), default=0)


# --------------------------------------------------------------------------------------
# patch-based execution
# --------------------------------------------------------------------------------------

_SPATIAL = (ir.Conv2D, ir.Pool2D, ir.Add)


def stage_candidates(graph: ir.Graph) -> list[int]:
    """The ``k`` for which ops ``[0, k)`` can run patch by patch.

    All of them spatial (conv, depthwise, pool, add) on feature maps, and only the last op's
    output is read after the stage.
    """
    found = []
    for k in range(1, len(graph.ops) + 1):
        op = graph.ops[k - 1]
        if not isinstance(op, _SPATIAL) or len(graph[op.output].shape) != 4:
            break
        if isinstance(op, ir.Pool2D) and op.kernel == graph[op.inputs[0]].shape[1:3]:
            break  # global pooling: every output needs the whole input
        produced = {o.output for o in graph.ops[:k]}
        leaks = {
            name
            for o in graph.ops[k:]
            for name in o.inputs
            if name in produced and name != op.output
        }
        if not leaks and not produced & set(graph.outputs):
            found.append(k)
    return found


def _needed(graph: ir.Graph, op: ir.Op, x: ir.Tensor, out: Region) -> Region:
    """The region of input ``x`` that ``op`` reads to compute ``out`` of its output."""
    if isinstance(op, ir.Add):
        return out
    kernel = graph.kernel_of(op)
    (sh, sw), (top, left) = op.stride, op.padding[:2]
    y_lo = max(0, out.y0 * sh - top)
    y_hi = min(x.shape[1], (out.y0 + out.h - 1) * sh - top + kernel[0])
    x_lo = max(0, out.x0 * sw - left)
    x_hi = min(x.shape[2], (out.x0 + out.w - 1) * sw - left + kernel[1])
    return Region(y_lo, x_lo, max(0, y_hi - y_lo), max(0, x_hi - x_lo))


def _splits(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b - a) for a, b in itertools.pairwise(edges) if b > a]


def patch_plan(graph: ir.Graph, stage_ops: int, grid: tuple[int, int]) -> PatchPlan:
    """Regions of every stage tensor for each patch of a ``grid`` over the stage output."""
    if stage_ops not in stage_candidates(graph):
        raise ExportError(
            f"ops [0, {stage_ops}) cannot run patch by patch (they must be convs, pools or adds "
            f"on feature maps and only the last one's output may be read afterwards); "
            f"possible: {stage_candidates(graph)}"
        )
    stage = graph.ops[:stage_ops]
    out_t = graph[stage[-1].output]
    regions = []
    for y0, h in _splits(out_t.shape[1], grid[0]):
        for x0, w in _splits(out_t.shape[2], grid[1]):
            need: dict[str, Region] = {stage[-1].output: Region(y0, x0, h, w)}
            for op in reversed(stage):
                for name in op.inputs:
                    need[name] = _needed(graph, op, graph[name], need[op.output]).union(
                        need.get(name)
                    )
            ordered = {name: need[name] for name in graph.inputs if name in need}
            ordered.update({op.output: need[op.output] for op in stage})
            regions.append(ordered)
    base = graph.macs()
    extra = 0
    for op in stage:
        if isinstance(op, ir.Conv2D):
            out = graph[op.output]
            per_pixel = graph.macs_of(op) // (out.shape[1] * out.shape[2])
            computed = sum(r[op.output].area for r in regions) * per_pixel
            extra += computed - graph.macs_of(op)
    return PatchPlan(stage_ops, grid, regions, extra / base if base else 0.0)


def search_patch(
    graph: ir.Graph,
    *,
    max_mac_overhead: float = 0.3,
    max_grid: int = 8,
    inplace: bool = True,
    alignment: int = 4,
    scratch: dict[int, int] | None = None,
) -> MemoryPlan:
    """The smallest-arena plan over patch stages and grids (n x n) within the MAC budget.

    Returns the plain plan when no patch plan is smaller. ``scratch``: see :func:`plan_memory`.
    """
    best = plan_memory(graph, inplace=inplace, alignment=alignment, scratch=scratch)
    for k in stage_candidates(graph):
        h, w = graph[graph.ops[k - 1].output].shape[1:3]
        for n in range(2, min(max_grid, h, w) + 1):
            patch = patch_plan(graph, k, (n, n))
            if patch.mac_overhead > max_mac_overhead:
                break  # finer grids only recompute more
            plan = plan_memory(
                graph, inplace=inplace, patch=patch, alignment=alignment, scratch=scratch
            )
            better = plan.arena_size < best.arena_size or (
                plan.arena_size == best.arena_size
                and best.patch is not None
                and patch.mac_overhead < best.patch.mac_overhead
            )
            if better:
                best = plan
    return best
