"""The static memory planner: lifetimes, each in-place rule, greedy placement, lower bound,
patch-based execution. Plans of real models are also checked by running the generated C
(test_mcu_bitexact.py); here every rule is checked on small hand-built graphs."""

import numpy as np
import pytest
import torch

from edgeslim import zoo
from edgeslim.core.errors import ExportError
from edgeslim.export import int8
from edgeslim.export.c import hostbuild, planner
from edgeslim.export.c.planner import Buffer, Member, Region
from mcu_helpers import GraphBuilder, check_no_overlap


def test_lifetimes_io_outside_the_arena_and_lower_bound():
    b = GraphBuilder((1, 8, 8, 2))
    a = b.conv("a", b.input, 4)  # 256 B, live ops 0-1
    c = b.conv("c", a, 4)  # 256 B, live 1-2
    d = b.conv("d", c, 4)  # 256 B, live 2-3
    out = b.conv("out", d, 1)
    g = b.graph(out)
    plan = planner.plan_memory(g, inplace=False)
    assert plan.buffer(g.input).kind == "input" and plan.buffer(out).kind == "output"
    assert {plan.buffer(n).kind for n in (a, c, d)} == {"arena"}
    assert (plan.buffer(a).start, plan.buffer(a).end) == (0, 1)
    assert plan.lower_bound == 512  # two 256 B tensors live during each op
    assert plan.arena_size == 512  # a and d share, c elsewhere
    assert plan.offset(a) == plan.offset(d) != plan.offset(c)
    with pytest.raises(KeyError, match="caller's input"):
        plan.offset(g.input)
    check_no_overlap(g, plan)


def test_reshape_aliases_its_input():
    b = GraphBuilder((1, 6, 6, 2))
    a = b.conv("a", b.input, 4)
    r = b.reshape("r", a, (1, 144))
    out = b.fc("out", r, 10)
    g = b.graph(out)
    plan = planner.plan_memory(g, inplace=False)
    assert plan.buffer_of[a] == plan.buffer_of[r] and plan.offset(a) == plan.offset(r)
    assert plan.arena_size == 144


def test_add_writes_into_an_input_that_dies_there():
    b = GraphBuilder((1, 4, 4, 8))
    a = b.conv("a", b.input, 8)
    c = b.conv("c", a, 8)
    s = b.add("s", a, c)  # a and c both die here: the add writes into a
    out = b.conv("out", s, 2)
    g = b.graph(out)
    plan = planner.plan_memory(g)
    assert plan.inplace == {2: "add"}
    assert plan.offset(s) == plan.offset(a)
    assert plan.arena_size == 2 * 128
    assert planner.plan_memory(g, inplace=False).arena_size == 3 * 128
    check_no_overlap(g, plan)


def test_add_does_not_overwrite_an_input_read_later():
    b = GraphBuilder((1, 4, 4, 8))
    a = b.conv("a", b.input, 8)
    c = b.conv("c", a, 8)
    s = b.add("s", a, c)
    t = b.add("t", s, a)  # a is read again: s may only go into c
    out = b.conv("out", t, 2)
    g = b.graph(out)
    plan = planner.plan_memory(g)
    assert plan.inplace[2] == "add" and plan.offset(s) == plan.offset(c) != plan.offset(a)
    assert plan.inplace[3] == "add"
    check_no_overlap(g, plan)


def test_depthwise_in_place_with_a_per_channel_buffer():
    b = GraphBuilder((1, 8, 8, 4))
    a = b.conv("a", b.input, 16, k=1)  # 1024 B
    d = b.conv("d", a, 16, depthwise=True, stride=2)  # 256 B, written over a
    out = b.conv("out", d, 2)
    g = b.graph(out)
    plan = planner.plan_memory(g)
    assert plan.inplace[1] == "depthwise"
    assert plan.offset(d) == plan.offset(a)
    scratch = plan.buffers[plan.scratch[1]]
    assert scratch.kind == "scratch" and scratch.size == 64  # one 8x8 channel
    assert (scratch.start, scratch.end) == (1, 1)
    assert plan.arena_size == 1024 + 64
    assert planner.plan_memory(g, inplace=False).arena_size == 1024 + 256
    check_no_overlap(g, plan)


def test_depthwise_not_in_place_when_input_lives_on_or_channels_change():
    b = GraphBuilder((1, 8, 8, 4))
    a = b.conv("a", b.input, 8, k=1)
    d = b.conv("d", a, 8, depthwise=True)
    s = b.add("s", a, d)  # a read after the depthwise
    m = b.conv("m", s, 16, depthwise=True)  # depth multiplier 2
    out = b.conv("out", m, 2)
    plan = planner.plan_memory(b.graph(out))
    assert 1 not in plan.inplace and 3 not in plan.inplace
    assert plan.inplace[2] == "add"


@pytest.mark.parametrize("cout", [4, 32])
def test_pointwise_conv_in_place_shrinking_and_expanding(cout):
    b = GraphBuilder((1, 8, 8, 2))
    a = b.conv("a", b.input, 16)  # 1024 B
    p = b.conv("p", a, cout, k=1)  # 1x1 over a dying input
    out = b.conv("out", p, 2)
    g = b.graph(out)
    plan = planner.plan_memory(g)
    assert plan.inplace[1] == "pointwise"
    assert plan.offset(p) == plan.offset(a)
    assert plan.buffers[plan.scratch[1]].size == cout  # one output pixel
    assert plan.arena_size == max(1024, 64 * cout) + cout
    check_no_overlap(g, plan)


def test_greedy_places_largest_first_at_the_lowest_free_offset():
    def buf(name, size, start, end):
        return Buffer({name: Member(0, size, start, end)})

    bufs = [buf("a", 40, 0, 1), buf("b", 100, 1, 2), buf("c", 60, 2, 3), buf("d", 50, 3, 4)]
    arena = planner._place(bufs, alignment=4)
    # b (largest) at 0; c conflicts with b -> 100; d conflicts with c only -> 0; a with b -> 100
    assert [x.offset for x in bufs] == [100, 0, 100, 0]
    assert arena == 160
    assert planner._place([buf("x", 3, 0, 0), buf("y", 3, 0, 0)], alignment=4) == 8


def test_patch_regions_follow_receptive_fields():
    b = GraphBuilder((1, 8, 8, 1))
    a = b.conv("a", b.input, 4)  # 3x3 s1 p1: 8x8
    c = b.conv("c", a, 4, stride=2)  # 3x3 s2 p1: 4x4
    out = b.fc("out", b.reshape("r", c, (1, 64)), 10)
    g = b.graph(out)
    assert planner.stage_candidates(g) == [1, 2]
    p = planner.patch_plan(g, 2, (2, 2))
    first, last = p.regions[0], p.regions[-1]
    assert first[c] == Region(0, 0, 2, 2)
    # c rows 0-1 read a rows 2*0-1 .. 2*1-1+2 = -1..3 -> 0..3; a rows 0-3 read input 0..4
    assert first[a] == Region(0, 0, 4, 4) and first[g.input] == Region(0, 0, 5, 5)
    assert last[c] == Region(2, 2, 2, 2) and last[a] == Region(3, 3, 5, 5)
    assert last[g.input] == Region(2, 2, 6, 6)
    # a is computed on patches of 4x4, 4x5, 5x4, 5x5: 81 pixels instead of 64, 36 MACs each
    assert p.mac_overhead == pytest.approx((81 - 64) * 36 / g.macs())
    plan = planner.plan_memory(g, patch=p)
    assert plan.buffer(a).size == 25 * 4 and plan.buffer(c).size == 64  # c held whole
    assert plan.buffer(c).start == 0
    check_no_overlap(g, plan)
    with pytest.raises(ExportError, match="cannot run patch by patch"):
        planner.patch_plan(g, 3, (2, 2))


def test_plans_of_zoo_models_never_overlap_and_patches_cut_the_peak():
    calib = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    g = int8.lower(zoo.create("mobilenetv2").eval(), calib)
    plain = planner.plan_memory(g, inplace=False)
    inplace = planner.plan_memory(g)
    patched = planner.search_patch(g, max_mac_overhead=0.1)
    for plan in (plain, inplace, patched):
        check_no_overlap(g, plan)
        assert plan.lower_bound <= plan.arena_size
    assert plain.arena_size == 64 * 28 * 28 + 16 * 28 * 28  # expand 1x1 of block 2
    assert inplace.arena_size == inplace.lower_bound < 0.85 * plain.arena_size
    assert patched.patch is not None and patched.patch.mac_overhead <= 0.1
    assert patched.arena_size < 0.65 * inplace.arena_size


def test_pointwise_in_place_needs_the_same_region_in_a_patch_stage():
    """An expanding 1x1 conv whose input another op reads with a halo must not run in place
    patch by patch (its input region is larger than its output region): checked by the plan
    and by running the generated C against the reference."""
    from edgeslim.export.c import codegen
    from edgeslim.export.int8 import reference

    b = GraphBuilder((1, 8, 8, 1))
    a = b.conv("a", b.input, 4)  # read by the 3x3 conv (with a halo) and by the 1x1 conv
    c = b.conv("c", a, 8)
    e = b.conv("e", a, 8, k=1)  # expanding 1x1, the last reader of a
    s = b.add("s", c, e)
    out = b.fc("out", b.reshape("r", s, (1, 512)), 10)
    g = b.graph(out)
    plan = planner.plan_memory(g, patch=planner.patch_plan(g, 4, (2, 2)))
    assert 2 not in plan.inplace
    assert planner.plan_memory(g).inplace[2] == "pointwise"  # whole maps: in place is fine
    check_no_overlap(g, plan)
    if hostbuild.compiler() is None:
        pytest.skip("no C compiler: plan checked, generated C not run")
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (2, 8, 8, 1))
    with hostbuild.Build(codegen.generate(g, plan)) as build:
        assert np.array_equal(build.run(q, 10), reference.run_batch(g, q))
