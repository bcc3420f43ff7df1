"""The generated C built with arm-none-eabi-gcc and run on QEMU's MPS2 boards.

Needs Debian's gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (installed by
.ci/run); skipped with the reason otherwise. The link-map parser and the refusals are
checked everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.export.c import arm, codegen, compress, export_c, hostbuild, plan_for
from edgeslim.export.int8 import reference
from mcu_helpers import GraphBuilder

needs_arm = pytest.mark.skipif(bool(arm.missing()), reason=f"no ARM run here: {arm.missing()}")


def _graph():
    rng = np.random.default_rng(0)
    b = GraphBuilder((1, 8, 8, 2))
    c1 = b.conv("c1", b.input, 8, k=3, act="relu")
    c2 = b.conv("c2", c1, 8, k=3, stride=2)
    s = b.add("res", c2, b.conv("c3", c2, 8, k=1, pad=(0, 0, 0, 0)), act="relu")
    flat = b.reshape("flat", s, (1, 4 * 4 * 8))
    g = b.graph(b.fc("fc", flat, 10))
    for name in ("c2_w", "fc_w"):
        w = g[name].data
        w[rng.random(w.shape) < 0.8] = 0
    return g


@needs_arm
@pytest.mark.parametrize("core", ["cortex-m4", "cortex-m7"])
def test_arm_build_on_qemu_is_bit_exact_with_the_host_build_and_the_reference(core):
    g = _graph()
    packed = compress.choose(g, {"c1": "codebook", "c2": "relative", "fc": "runs"})
    sources = codegen.generate(g, plan_for(g, packed=packed), packed)
    q = np.random.default_rng(1).integers(-128, 128, (4, 8, 8, 2)).astype(np.int8)
    with hostbuild.Build(sources) as host:
        host_out = host.run(q, 10)
    result = arm.build(g, sources, core, q)
    assert np.array_equal(result.run.outputs, host_out)
    assert np.array_equal(host_out, reference.run_batch(g, q).reshape(host_out.shape))
    assert result.model["rodata"] > 0 and result.model["text"] > 0
    assert result.model["bss"] >= plan_for(g, packed=packed).arena_size
    assert 0 < result.stack < 4096
    assert result.run.instructions_per_tick == pytest.approx(40.0, rel=0.01)  # 25 MHz, 1 ns
    assert min(result.run.instructions) > g.macs()  # at least one instruction per MAC
    assert "bit-exact on QEMU" in result.verified[0]


@needs_arm
def test_export_c_for_a_cortex_m_device_builds_and_runs_there(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    result = export_c(model, tmp_path, "stm32f446", calib=torch.rand(6, 16))
    assert result.arm is not None and result.arm.core == "cortex-m4"
    assert any("QEMU mps2-an386" in v for v in result.verified)
    assert "ARM build (cortex-m4, -Os): flash" in result.summary()
    assert (
        export_c(model, tmp_path / "b", "stm32f446", calib=torch.rand(6, 16), arm=False).arm is None
    )


def test_without_the_toolchain_arm_builds_are_skipped_or_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(arm, "toolchain", lambda: None)
    monkeypatch.setattr(arm, "qemu", lambda: None)
    assert "apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm" in (
        arm.missing()
    )
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    calib = torch.rand(4, 16)
    assert export_c(model, tmp_path / "a", "stm32f446", calib=calib).arm is None
    with pytest.raises(ExportError, match="no ARM build for stm32f446: arm-none-eabi-gcc"):
        export_c(model, tmp_path / "b", "stm32f446", calib=calib, arm=True)
    with pytest.raises(ExportError, match="supported: cortex-m4, cortex-m7"):
        arm.core_of("xtensa-lx7")


def test_link_map_sizes_are_attributed_to_the_model_object():
    text = """Linker script and memory map

 .text.fc_s8    0x00000100       0x40 model.o
 .text.main     0x00000140       0x20 arm_harness.o
 .rodata.w_fc_w
                0x00000200      0x100 model.o
 .bss.arena     0x20000000       0x80 model.o
 COMMON         0x20000080        0x4 model.o
 .data.x        0x20000084        0x8 /tmp/edgeslim-arm-x/model.o
"""
    assert arm._map_sizes(text, "model.o") == {"text": 64, "rodata": 256, "data": 8, "bss": 132}
