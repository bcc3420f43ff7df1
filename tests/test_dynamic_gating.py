"""Channel gating: skipped channels are not computed, sparse path equals the masked one."""

import pytest
import torch
from torch import nn

from edgeslim import ConfigError
from edgeslim.core.models import zoo
from edgeslim.dynamic import ChannelGating, count_macs, gate_channels_, gate_loss, gated_units


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        for g in gated_units(model).values():
            nn.init.normal_(g.gate.fc.weight)


def _dense(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The masked (multiply-by-zero) computation: training-mode path with BN in eval."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        out = model(x)
    model.eval()
    return out


@pytest.mark.parametrize("density", [0.25, 0.5])
def test_inverted_residual_gating_skips_for_real(density):
    model = zoo.create("mobilenetv2").eval()
    x = torch.randn(3, 1, 28, 28)
    full = count_macs(model, x[:1])
    log = gate_channels_(model, ChannelGating(density=density), calib=torch.randn(8, 1, 28, 28))
    assert set(log) == {f"blocks.{i}" for i in range(7)}
    _randomise(model)
    model.eval()
    with torch.no_grad():
        sparse = model(x)
    assert torch.allclose(sparse, _dense(model, x), atol=1e-4)
    units = gated_units(model)
    for name, unit in units.items():  # per sample: only the kept channels were computed
        assert unit.computed == 3 * log[name]["kept"]
    gated = count_macs(model, x[:1])
    assert gated < full * (density + 0.15)
    # the counted MACs shrink with the density (not multiply-by-zero)
    assert count_macs(model, x) == 3 * gated or count_macs(model, x) < 3 * full


def test_conv_gating_lenet_and_gate_loss():
    model = zoo.create("lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    full = count_macs(model, x[:1])
    gate_channels_(model, ChannelGating(layers=["conv1", "conv2"], density=0.5))
    _randomise(model)
    model.eval()
    with torch.no_grad():
        sparse = model(x)
    assert torch.allclose(sparse, _dense(model, x), atol=1e-5)
    assert count_macs(model, x[:1]) < 0.6 * full
    model.train()
    model(x)
    assert gate_loss(model).item() > 0


def test_profile_sees_the_dense_graph():
    from edgeslim.profiling import profile

    model = zoo.create("mobilenetv2")
    gate_channels_(model, ChannelGating(density=0.5))
    model.eval()
    assert profile(model, torch.randn(1, 1, 28, 28)).macs > 0  # traceable (masked path)


def test_gating_errors():
    with pytest.raises(ConfigError, match="density"):
        ChannelGating(density=0)
    with pytest.raises(ConfigError, match="no module 'nope'"):
        gate_channels_(zoo.create("lenet5"), ChannelGating(layers=["nope"]))
    with pytest.raises(ConfigError, match="no inverted-residual"):
        gate_channels_(zoo.create("lenet5"), ChannelGating())
    with pytest.raises(ConfigError, match="not a Conv2d"):
        gate_channels_(zoo.create("lenet5"), ChannelGating(layers=["fc1"]))
    with pytest.raises(ConfigError, match="grouped"):
        gate_channels_(zoo.create("mobilenetv2"), ChannelGating(layers=["blocks.1.block.1"]))


def test_density_sweep_and_schedule(mnist):
    from edgeslim.core.train import TrainConfig
    from edgeslim.dynamic import set_density, train_gates

    torch.manual_seed(0)
    model = zoo.create("lenet5")
    gate_channels_(model, ChannelGating(layers=["conv1", "conv2"], density=0.5))
    x = mnist.test.x[:4]
    model.eval()
    macs = {}
    for d in (0.25, 1.0):
        set_density(model, d)
        macs[d] = count_macs(model, x)
    set_density(model)
    assert macs[0.25] < count_macs(model, x) < macs[1.0]
    with pytest.raises(ConfigError, match="density"):
        set_density(model, 1.5)
    # the schedule: every channel at the first step, the configured density at the end
    seen = []
    gate = gated_units(model)["conv2"].gate
    handle = gate.register_forward_hook(lambda m, i, o: seen.append(m.k))
    cfg = TrainConfig(epochs=2, batch_size=50, lr=1e-3)
    train_gates(model, mnist.limit(200), cfg, anneal=0.5, progress=False)
    handle.remove()
    assert seen[0] == 50 and min(seen) == 25 and gate.k == 25
    assert seen.index(25) < len(seen) * 0.75  # reached the target half way, then held it
    with pytest.raises(ConfigError, match="anneal"):
        train_gates(model, mnist.limit(200), cfg, anneal=2.0)
