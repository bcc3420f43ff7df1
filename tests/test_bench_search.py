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


def test_cached_models_are_state_dicts_rebuilt_and_never_unpickled(bench, tmp_path):
    """The benchmark's int8 / recipe caches: a state dict + the accuracy, loaded into a
    cheaply rebuilt model (the same outputs as the model that was evaluated); a hostile
    pickle at the cache's path is refused, its payload never runs."""
    import os
    import pickle

    import torch

    import edgeslim as es
    from edgeslim.core.data.datasets import DataSplits, Split

    torch.manual_seed(0)
    x, y = torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,))
    data = DataSplits("t", Split(x, y), Split(x[:8], y[:8]), Split(x, y), 10)
    model = es.load_model("zoo:lenet5").eval()
    saved = tmp_path / "int8.sd.pt"
    calls = {"full": 0, "skeleton": 0}

    def count(kind, n):
        calls[kind] += 1
        return es.quantize(model, es.Int8PTQ(calibration="mse"), calib=data.calib(n))

    first, acc = bench.cached_model(saved, lambda: count("full", 48), lambda: 1 / 0, data)
    assert calls == {"full": 1, "skeleton": 0} and saved.exists()
    assert set(torch.load(saved, weights_only=True)) == {"state_dict", "acc"}
    again, acc2 = bench.cached_model(saved, lambda: 1 / 0, lambda: count("skeleton", 2), data)
    assert calls == {"full": 1, "skeleton": 1} and acc2 == acc
    assert torch.equal(again(x), first(x))  # the saved scales, not the skeleton's
    assert not torch.equal(count("skeleton", 2)(x), first(x))

    marker = tmp_path / "payload-ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Hostile(), "acc": 0.5}, saved)
    with pytest.raises(pickle.UnpicklingError):
        bench.int8_row(model, data, saved)
    assert not marker.exists()
