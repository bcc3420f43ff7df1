"""The device latency model: work per op type, the fitted instruction model, `edgeslim fit`.

The fit itself is checked on synthetic counts (known coefficients); the shipped model's
error against QEMU is a benchmark (benchmarks/mcu_latency.py), not a test. The ARM half of
`fit_report` needs arm-none-eabi-gcc and qemu-system-arm (skipped with the reason otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.export.c import arm, compress, plan_for
from edgeslim.export.c.workload import workload
from edgeslim.profiling.devices import (
    FEATURES,
    Workload,
    fit_instructions,
    instruction_models,
    load_device,
)
from mcu_helpers import GraphBuilder

needs_arm = pytest.mark.skipif(bool(arm.missing()), reason=f"no ARM run here: {arm.missing()}")


def _graph():
    b = GraphBuilder((1, 8, 8, 4))
    c1 = b.conv("c1", b.input, 8, k=3, act="relu")  # 8x8x8 outputs, 9 taps, 4 channels
    d1 = b.conv("d1", c1, 8, k=3, depthwise=True)  # 8x8x8, 9 MACs each
    p = b.pool("p", d1, "max", 2, 2)  # 4x4x8 outputs, 4 taps
    s = b.add("s", p, p)
    flat = b.reshape("flat", s, (1, 128))
    return b.graph(b.fc("fc", flat, 10))


def test_workload_counts_each_op_type():
    g = _graph()
    w = workload(g)
    assert w.conv_macs == 512 * 9 * 4 and w.conv_taps == 512 * 9
    assert w.dw_macs == 512 * 9 and w.fc_macs == 1280 and w.packed_macs == 0
    assert w.outputs == 512 + 512 + 10  # requantized conv / depthwise / FC outputs
    assert w.elements == 128 * 4 + 128 + 128  # pool taps, add, reshape
    assert w.ops == 6 and w.macs == g.macs()
    doubled = w.scaled_macs(2.0)
    assert doubled.conv_macs == 2 * w.conv_macs and doubled.outputs == w.outputs


def test_workload_counts_stored_weights_of_compressed_layers():
    g = _graph()
    fc = g.ops[-1]
    w = g[fc.weight].data
    w[np.random.default_rng(0).random(w.shape) < 0.9] = 0
    packed = compress.choose(g, {"fc": "relative", "c1": "codebook"})
    work = workload(g, packed)
    assert work.fc_macs == 0 and work.conv_macs == 0 and work.conv_taps == 0
    assert work.packed_macs == 512 * 9 * 4 + np.count_nonzero(w)


def test_fit_recovers_known_coefficients_and_reports_leave_one_out_error():
    rng = np.random.default_rng(0)
    true = {"conv_macs": 8.0, "conv_taps": 20.0, "dw_macs": 16.0, "fc_macs": 6.0}
    true |= {"packed_macs": 40.0, "outputs": 45.0, "elements": 10.0, "ops": 300.0}
    samples = []
    for _ in range(24):
        w = Workload(**{k: int(rng.integers(0, 100_000)) for k in FEATURES})
        samples.append((w, round(sum(true[k] * getattr(w, k) for k in FEATURES))))
    fit = fit_instructions(samples)
    for k in FEATURES:
        assert fit.coefficients[k] == pytest.approx(true[k], rel=1e-3)
    assert max(fit.loo_error) < 1e-3 and len(fit.loo_error) == 24
    # a negative truth is clamped: coefficients stay >= 0
    neg = [(w, max(1, n - 50 * w.ops)) for w, n in samples]
    assert min(fit_instructions(neg).coefficients.values()) >= 0
    with pytest.raises(ConfigError, match="at least 2 samples"):
        fit_instructions(samples[:1])


def test_cortex_m_profiles_use_the_fitted_instruction_model():
    m4, m7 = load_device("stm32f446"), load_device("stm32f746")
    model = instruction_models()[m4.instruction_model]
    assert m7.instruction_model == m4.instruction_model
    assert all(v >= 0 for v in model.coefficients.values()) and model.error
    w = workload(_graph())
    cycles = model.instructions(w) * m4.cycles_per_instruction
    assert m4.latency_ms(w) == pytest.approx(cycles / (180 * 1e3))
    assert m4.latency_ms(1000) == pytest.approx(
        1000 * model.per_mac * m4.cycles_per_instruction / 180e3
    )
    assert m4.latency_bound_ms(w.macs) <= m4.latency_ms(w)  # the NAS tier-1 bound
    assert "fitted per op type on QEMU" in m4.latency_text()
    pi = load_device("rpi4")  # no instruction model: cycles per MAC
    assert pi.latency_ms(w) == pytest.approx(w.macs * pi.cycles_per_mac / 1.5e6)


def test_device_profile_needs_a_latency_model(tmp_path):
    base = "name: x\ncore: y\nsram_bytes: 1\nflash_bytes: 1\nclock_mhz: 1\n"
    for extra, message in (
        ("", "give 'cycles_per_mac' or 'instruction_model'"),
        ("instruction_model: thumb2-scalar-Os\n", "needs 'cycles_per_instruction'"),
    ):
        path = tmp_path / "d.yaml"
        path.write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_device(path)
    path.write_text(base + "instruction_model: nope\ncycles_per_instruction: 1\n")
    with pytest.raises(ConfigError, match="unknown instruction_model 'nope'"):
        load_device(path).latency_ms(10)


def _fit(monkeypatch=None):
    from edgeslim.export.devicefit import fit_report

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    return fit_report(model, torch.rand(4, 16), "stm32f446", name="mlp")


@needs_arm
def test_fit_reports_flash_and_sram_from_the_arm_build_and_qemu():
    report = _fit()
    assert "ARM link (cortex-m4, -Os)" in report.flash_source
    assert "stack measured on QEMU" in report.sram_source
    assert "estimate" not in report.flash_source + report.sram_source
    row = report.rows[0]
    assert row.instructions > row.macs and row.flash > 0
    assert row.sram > row.plan.arena_size + 16 + 4  # arena + measured stack + caller I/O


def test_fit_says_which_numbers_are_estimates_without_the_toolchain(monkeypatch):
    monkeypatch.setattr(arm, "toolchain", lambda: None)
    monkeypatch.setattr(arm, "qemu", lambda: None)
    report = _fit()
    assert "an estimate" in report.flash_source and "arm-none-eabi-gcc" in report.flash_source
    assert "stack not counted: an estimate" in report.sram_source
    assert report.rows[0].instructions is None
    caption = report.table().caption
    assert "an estimate" in caption and "thumb2-scalar-Os" in caption


def test_plan_for_patches_scale_the_workload():
    b = GraphBuilder((1, 32, 32, 3))
    c1 = b.conv("c1", b.input, 16, k=3, stride=1)
    c2 = b.conv("c2", c1, 16, k=3, stride=2)
    g = b.graph(b.fc("fc", b.reshape("f", c2, (1, 16 * 16 * 16)), 4))
    plan = plan_for(g, patch=True)
    if plan.patch is None:
        pytest.skip("no patch plan for this graph")
    assert workload(g, None, plan).conv_macs > workload(g).conv_macs
