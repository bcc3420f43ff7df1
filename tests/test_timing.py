"""The one timer (core.timing) and the ONNX Runtime latency built on it (profiling.runtimes)."""

import pytest
import torch
from torch import nn

from edgeslim.core.errors import ConfigError, EdgeslimError
from edgeslim.core.timing import median_ms
from edgeslim.profiling.latency import batch_latency_ms, measure_latency_ms


def test_median_ms_runs_warmup_untimed_then_repeats_and_syncs():
    calls, syncs = [], []
    ms = median_ms(lambda: calls.append(1), 7, 3, sync=lambda: syncs.append(1))
    assert len(calls) == 10 and len(syncs) == 8  # once after warm-up, once per timed call
    assert isinstance(ms, float) and ms >= 0


@pytest.mark.parametrize(("repeats", "warmup", "match"), [(0, 1, "repeats"), (3, -1, "warmup")])
def test_median_ms_rejects_bad_counts(repeats, warmup, match):
    with pytest.raises(ConfigError, match=match):
        median_ms(lambda: None, repeats, warmup)
    with pytest.raises(ConfigError, match=match):
        measure_latency_ms(nn.Linear(2, 2), torch.rand(1, 2), repeats=repeats, warmup=warmup)


def test_torch_latency_of_a_batch_and_of_keyword_inputs():
    class Keywords(nn.Module):
        def forward(self, a, b):
            return a + b

    x = torch.rand(4, 3)
    assert batch_latency_ms(nn.Linear(3, 2), x, repeats=2, warmup=0) > 0
    assert batch_latency_ms(Keywords(), {"a": x, "b": x}, repeats=2, warmup=0) > 0


def test_ort_session_checks_and_times_tensor_and_keyword_inputs():
    pytest.importorskip("onnxruntime")
    from edgeslim.profiling.runtimes import ort_latency_ms, ort_outputs, ort_session

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b):
            return {"sum": self.fc(a + b), "a": a}

    torch.manual_seed(0)
    x = torch.rand(4, 3)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    session = ort_session(model, x)
    assert ort_outputs(session, x[:1])[0].shape == (1, 2)  # batch dimension dynamic
    assert ort_latency_ms(session, x, repeats=2, warmup=1) > 0
    kw = Keywords()
    session = ort_session(kw, {"a": x, "b": x})
    got = ort_outputs(session, {"a": x, "b": x})
    torch.testing.assert_close(torch.from_numpy(got[0]), kw(x, x)["sum"].detach())

    class Random(nn.Module):  # exports, but ONNX Runtime's numbers differ from PyTorch's
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(EdgeslimError, match="differs from PyTorch"):
        ort_session(Random(), x)
