"""benchmarks/search.py's STM32F446 budgets and fit check (the benchmark's own logic)."""

from __future__ import annotations

import pytest

from conftest import import_benchmark
from edgeslim.search import Budget


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("search")  # benchmarks/search.py


def test_mcu_budgets_cap_half_the_dense_device_latency(bench):
    budgets = list(bench.budgets_for(1097.2).values())
    assert budgets[0].limits() == {
        "latency_ms": pytest.approx(548.6),
        "sram_kb": 128.0,
        "flash_kb": 512.0,
    }
    assert budgets[1].limits() == {"sram_kb": 128.0, "flash_kb": 512.0}
    assert all(b.target == "stm32f446" for b in budgets)
    assert next(iter(bench.budgets_for(1097.2))) == "stm32f446 + 548.6 ms (device model)"


def test_mcu_cost_ok_checks_every_limit_of_the_budget(bench):
    capped = Budget(max_sram_kb=128, max_flash_kb=512, max_latency_ms=100, target="stm32f446")
    free = Budget(max_sram_kb=128, max_flash_kb=512, target="stm32f446")
    cost = {"latency_ms": 150.0, "sram_kb": 20.0, "flash_kb": 40.0}
    assert not bench.mcu_cost_ok(cost, capped) and bench.mcu_cost_ok(cost, free)
    assert bench.mcu_cost_ok({**cost, "latency_ms": 99.0}, capped)
    assert not bench.mcu_cost_ok({**cost, "flash_kb": 513.0}, free)
    assert not bench.mcu_cost_ok({**cost, "sram_kb": 128.5}, free)
