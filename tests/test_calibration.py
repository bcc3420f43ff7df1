import pytest
import torch

import edgeslim as es
from edgeslim.core.hooks import run_calibration


def test_calibration_sees_every_input_once_and_restores_the_model():
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300").train()
    x = torch.rand(130, 1, 28, 28)
    seen: dict[str, list[torch.Tensor]] = {"fc1": [], "fc2": []}

    def callback(name, module, inputs, output):
        assert not torch.is_grad_enabled() and not module.training
        seen[name].append(inputs[0])

    batches = run_calibration(
        model, x, {"fc1": model.fc1, "fc2": model.fc2}, callback, batch_size=64
    )
    assert batches == 3 and [len(t) for t in seen["fc1"]] == [64, 64, 2]
    assert torch.equal(torch.cat(seen["fc1"]), x.reshape(130, -1))
    expected = torch.relu(model.fc1(x.reshape(130, -1)))
    assert torch.allclose(torch.cat(seen["fc2"]), expected, atol=1e-6)
    assert model.training and not model.fc1._forward_hooks  # flags restored, hooks removed


def test_calibration_errors():
    model = es.load_model("zoo:lenet5")
    with pytest.raises(es.ShapeError, match=r"batch 0 of shape \(4, 3, 32, 32\)"):
        run_calibration(model, torch.zeros(4, 3, 32, 32), {}, lambda *a: None)
    with pytest.raises(es.ShapeError, match="non-empty"):
        run_calibration(model, torch.zeros(0, 1, 28, 28), {}, lambda *a: None)
    assert not model.conv1._forward_hooks
